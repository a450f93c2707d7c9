"""The broker we ship: amqtt 0.12.1 with its authorization holes closed.

Each override names the hole it closes (see README, "amqtt bypasses closed").
Private methods of ``amqtt.broker.Broker`` are overridden, so amqtt is pinned
exactly in pyproject.toml and ``check_amqtt_version`` refuses any other version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from importlib.metadata import version
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage, Session
from amqtt.utils import format_client_message, gen_client_id
from transitions import MachineError

from broker_plugin.plugin import PEER_KEY, SESSION_KEY, DeviceAuthorizationPlugin, session_admission
from broker_plugin.subscriptions import FilterIndex

log = logging.getLogger("mqtt_pdp.broker")
AMQTT_VERSION = "0.12.1"
STOP_HANDLER_TIMEOUT = 2.0


def check_amqtt_version() -> None:
    installed = version("amqtt")
    if installed != AMQTT_VERSION:
        raise BrokerError(f"HardenedBroker patches amqtt {AMQTT_VERSION}, but amqtt {installed} is installed")


class HardenedBroker(Broker):
    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        check_amqtt_version()
        super().__init__(config, **kwargs)
        authz = [p for p in self.plugins_manager.plugins if isinstance(p, DeviceAuthorizationPlugin)]
        others = [
            type(p).__name__ for p in self.plugins_manager.plugins
            if isinstance(p, (BaseAuthPlugin, BaseTopicPlugin)) and not isinstance(p, DeviceAuthorizationPlugin)
        ]
        if len(authz) != 1:
            raise BrokerError("HardenedBroker needs exactly one broker_plugin.plugin.DeviceAuthorizationPlugin in 'plugins'")
        if others:
            raise BrokerError(f"HardenedBroker decides all access itself; remove these auth/topic plugins: {', '.join(others)}")
        self.authz: DeviceAuthorizationPlugin = authz[0]
        self.authz.set_revoker(self.revoke_session)
        self._filter_index = FilterIndex()
        self._session_filters: dict[str, set[str]] = {}  # client id -> its filters

    # -- TLS: require a client certificate at the handshake ------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:  # type: ignore[override]
        context = Broker._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.authz.config.require_client_certificate:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # -- connect: authorize before touching any existing session (hole 3) -----------------

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        where = format_client_message(address=remote_address, port=remote_port)
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(f"{where}: cannot read CONNECT: {exc}") from exc
        except MQTTError:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await writer.close()
            raise

        admission = self.authz.admit_session(incoming)
        if not admission.allowed:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"{where}: connection refused: {admission.reason}")

        session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            # Same device (the client id is bound to the identity): resume, with this connection's credentials.
            session, _ = self._sessions[incoming.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password", "remote_address", "remote_port", "ssl_object"):
                setattr(session, name, getattr(incoming, name))
            session.attributes[SESSION_KEY] = admission
            session.attributes[PEER_KEY] = incoming.attributes.get(PEER_KEY)
            session.parent = 1
        else:
            incoming.parent = 0

        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        admission = session_admission(session)
        return admission is not None and admission.allowed

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        """amqtt's session start, except that retained messages go only to this session's own filters (hole 4)."""
        if not await self._authenticate(client_session, self.listeners_config[listener_name]):
            raise BrokerError("session reached the message loop without admission")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    # Take-over by the same device: the client id is bound to the certificate identity.
                    log.info("client %s reconnected, taking over its session", client_session.client_id)
                    _, old_handler = self._sessions[client_session.client_id]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    break
                await asyncio.sleep(1)

        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)  # type: ignore[index]
        await handler.mqtt_connack_authorize(True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        for subscription in self._own_filters(client_session):
            await self._publish_retained_messages_for_subscription(subscription, client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's loop without ``logger.debug(repr(self._subscriptions))`` after every SUBSCRIBE: that
        string of every subscription in the broker is built whatever the log level, so subscribing
        cost grew with the fleet (10,000 devices: minutes of CPU)."""
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        connected = True
        try:
            while connected:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if disconnect_waiter in done:  # then, as amqtt does, still handle what arrived with it
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        return
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        except asyncio.CancelledError:
            log.debug("client loop of %s cancelled", client_session.client_id)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # -- every topic check goes straight to the PDP, synchronously ----------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        return self.authz.allows(session, str(action), topic)

    def _own_filters(self, session: Session) -> list[tuple[str, int]]:
        """(filter, qos) of the session's subscriptions, without scanning every filter in the broker."""
        out = []
        for topic_filter in self._session_filters.get(session.client_id or "", ()):
            for sub_session, qos in self._subscriptions.get(topic_filter, ()):
                if sub_session.client_id == session.client_id:
                    out.append((topic_filter, qos))
                    break
        return out

    # -- retained messages: on subscribe and on reconnect (holes 1 and 4) ----------------

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        """Retained messages for a filter the session holds, each checked as a receive (hole 1)."""
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = [
            asyncio.ensure_future(handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True))
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter) and self.authz.allows(session, "receive", topic)
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while offline are checked again: the policy may have changed meanwhile."""
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if self.authz.allows(session, "receive", queued.topic):
                tasks.append(asyncio.ensure_future(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    # -- will: checked again when it would be published (hole 2) ----------------------------

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: Any) -> None:
        if client_session.will_flag and not (
            client_session.will_topic and self.authz.allows(client_session, "publish", client_session.will_topic)
        ):
            log.warning("will of %s on %r suppressed: not permitted", client_session.client_id, client_session.will_topic)
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    # -- subscriptions: indexed, so delivery cost does not grow with every filter in the broker --

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        result = await super().add_subscription(subscription, session)
        if result != 0x80:
            self._filter_index.add(subscription[0])
            self._session_filters.setdefault(session.client_id or "", set()).add(subscription[0])
        return result

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        self._session_filters.get(session.client_id or "", set()).discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Only the session's own filters: amqtt scans every filter, which made mass disconnects quadratic."""
        for topic_filter in self._session_filters.pop(session.client_id or "", set()):
            subscribers = self._subscriptions.get(topic_filter)
            if subscribers is None:
                continue
            remaining = [(s, qos) for s, qos in subscribers if s.client_id != session.client_id]
            if remaining:
                self._subscriptions[topic_filter] = remaining
            else:
                del self._subscriptions[topic_filter]
                self._filter_index.remove(topic_filter)

    def _subscribers_of(self, topic: str) -> list[tuple[Session, int]]:
        """Every (session, qos) whose filter selects ``topic``, taken in one synchronous step."""
        subscriptions = self._subscriptions
        if len(self._filter_index) != len(subscriptions):
            self._filter_index.rebuild(list(subscriptions))  # a filter added or removed behind our back
        targets: list[tuple[Session, int]] = []
        for topic_filter in self._filter_index.match(topic):
            subscribers = subscriptions.get(topic_filter)
            if subscribers:
                targets.extend(subscribers)
        return targets

    # -- delivery: snapshot the subscribers before anything can yield (hole 6) -------------

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        targets = self._subscribers_of(topic)
        allows = self.authz.allows
        for target, sub_qos in targets:
            qos = broadcast.get("qos", sub_qos)
            if not allows(target, "receive", topic):
                continue
            connected = target.transitions.state == "connected"
            if not connected:
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target)
                continue
            handler = self._get_handler(target)
            if handler is not None:
                running_tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    # -- stopping a session never hangs -------------------------------------------------------

    async def _stop_handler(self, handler: BrokerProtocolHandler) -> None:
        """amqtt's stop, bounded: on Python 3.11 a cancellation of the reader can be lost inside
        ``asyncio.wait_for`` and ``handler.stop()`` then waits forever (seen at shutdown under QoS 1)."""
        stopping = asyncio.ensure_future(super()._stop_handler(handler))
        for _ in range(3):
            done, _ = await asyncio.wait({stopping}, timeout=STOP_HANDLER_TIMEOUT)
            if done:
                stopping.result()
                return
            reader = getattr(handler, "_reader_task", None)
            if reader is not None and not reader.done():
                reader.cancel()
        log.warning("a client handler did not stop; abandoning it")
        stopping.cancel()

    # -- revocation on reload -----------------------------------------------------------

    async def revoke_session(self, client_id: str, reason: str) -> None:
        """End a session the policy no longer admits: no will, no kept subscriptions or queue."""
        session, _ = self._sessions.get(client_id, (None, None))
        if session is None:
            return
        session.will_flag = False
        session.attributes[SESSION_KEY] = None
        await self._cleanup_session(client_id)
