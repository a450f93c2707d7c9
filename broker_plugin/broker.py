"""The broker we ship: amqtt 0.12.1 with its authorization holes closed.

Each override names the hole it closes (see README, "amqtt bypasses closed").
It is glue: amqtt's calls become events of the enforcement core
(``pdp.core.enforcement``, through the plugin's service), and the actions that
come back become amqtt calls. Private methods of ``amqtt.broker.Broker`` are
overridden, so amqtt is pinned exactly, every amqtt name comes through
``broker_plugin.amqtt_compat``, and ``check_amqtt`` refuses an amqtt whose
internals are not the ones patched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

from broker_plugin.amqtt_compat import (
    NOT_AUTHORIZED,
    QOS_1,
    QOS_2,
    Action,
    AMQTTError,
    BaseAuthPlugin,
    BaseTopicPlugin,
    Broker,
    BrokerError,
    BrokerEvents,
    BrokerProtocolHandler,
    ConnackPacket,
    DisconnectPacket,
    ListenerConfig,
    MachineError,
    MQTTError,
    NoDataError,
    OutgoingApplicationMessage,
    ReaderAdapter,
    Session,
    WriterAdapter,
    abort_connection,
    check_amqtt,
    format_client_message,
    gen_client_id,
)
from broker_plugin.plugin import CONN_KEY, DeviceAuthorizationPlugin, connection_of
from broker_plugin.subscriptions import FilterIndex
from pdp.core.enforcement import ConnId, Disconnect, DropSession, DropSubscription
from pdp.core.topics import matches

log = logging.getLogger("mqtt_pdp.broker")
STOP_HANDLER_TIMEOUT = 2.0


@dataclass
class _Connection:
    session: Session
    handler: BrokerProtocolHandler


class HardenedBroker(Broker):
    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        check_amqtt()
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
        self.authz.set_closer(self._carry_out, self._abort_now)
        self.authz.broker_reports_closes = True
        self._connections: dict[ConnId, _Connection] = {}  # every admitted connection with a running handler
        self._retained_publishers: dict[str, str] = {}  # retained topic -> the device that published it
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

        admission, superseded = self.authz.admit_session(incoming, persistent=not incoming.clean_session)
        if not admission.allowed:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise AMQTTError(f"{where}: connection refused: {admission.reason}")
        for disconnect in superseded:  # [MQTT-3.1.4-2]: the previous connection of this client id goes first
            await self._close_connection(disconnect.conn)

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
            session.attributes[CONN_KEY] = incoming.attributes[CONN_KEY]
            session.parent = 1
        else:
            incoming.parent = 0

        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        conn = connection_of(session)
        return conn is not None and self.authz.service.enforcer.revoked(conn) is None

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

        conn = connection_of(client_session)
        assert conn is not None
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)  # type: ignore[index]
        self._connections[conn] = _Connection(client_session, handler)
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
            )
            await handler.start()
            await self._publish_session_retained_messages(client_session)
            for subscription in self._own_filters(client_session):
                await self._publish_retained_messages_for_subscription(subscription, client_session)
            await self._client_message_loop(client_session, handler)
        finally:
            self._connections.pop(conn, None)
            self.authz.service.closed(conn)

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
        """Retained messages for a filter the session holds, each checked as a receive (hole 1) and against
        its publisher's current rights."""
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        publishers = self._retained_publishers
        tasks = [
            asyncio.ensure_future(handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True))
            for topic, retained in list(self._retained_messages.items())
            if matches(topic_filter, topic)
            and self.authz.allows(session, "receive", topic, "retained", publishers.get(topic))
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """amqtt's, remembering which device published what it retains: served only while that device may."""
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        if topic_name in self._retained_messages:
            publisher = self.authz.device_id(source_session)
            if publisher is not None:
                self._retained_publishers[topic_name] = publisher
            else:
                self._retained_publishers.pop(topic_name, None)
        else:
            self._retained_publishers.pop(topic_name, None)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while offline are checked again: the policy may have changed meanwhile."""
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if self.authz.allows(session, "receive", queued.topic, "queued"):
                tasks.append(asyncio.ensure_future(handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    # -- will: checked again when it would be published (hole 2) ----------------------------

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: Any) -> None:
        conn = next((c for c, live in self._connections.items() if live.handler is handler), None)
        if conn is not None and self.authz.service.enforcer.connection_of(client_session.client_id or "") != conn:
            # A superseded connection of a resumed session: the session, its will and its state now belong to
            # the new connection, so this one only stops (amqtt would publish the new will and mark the
            # session disconnected under the new connection).
            await self._stop_handler(handler)
            return
        graceful = isinstance(disconnect_waiter.result(), DisconnectPacket)  # amqtt publishes no will then
        if client_session.will_flag and not graceful and not (
            client_session.will_topic and self.authz.allows(client_session, "will", client_session.will_topic)
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
        self.authz.unsubscribed(session, a_filter)
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

    # -- carrying out the core's disconnects ----------------------------------------------------

    def _abort_now(self, conn: ConnId) -> None:
        live = self._connections.get(conn)
        if live is not None:
            abort_connection(live.handler)

    async def _close_connection(self, conn: ConnId) -> None:
        """Close one connection's socket; the core already denies it everything."""
        live = self._connections.get(conn)
        if live is not None:
            abort_connection(live.handler)
            await self._stop_handler(live.handler)

    async def _carry_out(self, action: Disconnect | DropSession | DropSubscription) -> None:
        """End what the policy no longer admits: no will, no kept subscriptions or queue."""
        if isinstance(action, DropSubscription):
            session, _ = self._sessions.get(action.client_id, (None, None))
            if session is not None and connection_of(session) == action.conn:
                self._del_subscription(action.topic_filter, session)
            return
        if isinstance(action, DropSession):
            session, _ = self._sessions.get(action.client_id, (None, None))
            if session is not None and session.transitions.state != "connected":
                await self._cleanup_session(action.client_id)
            return
        live = self._connections.get(action.conn)
        if live is not None:
            live.session.will_flag = False
            abort_connection(live.handler)
        session, _ = self._sessions.get(action.client_id, (None, None))
        if session is not None and connection_of(session) == action.conn:
            await self._cleanup_session(action.client_id)
        await self._close_connection(action.conn)
