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
import math
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

from broker_plugin.acknowledgement import (
    acknowledge,
    defer_pubacks,
    next_delivery,
    return_to_front,
    send_batched,
    stop_routing,
    taken_over,
)
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
    ListenerType,
    MachineError,
    MQTTError,
    NoDataError,
    OutgoingApplicationMessage,
    ReaderAdapter,
    RetainedApplicationMessage,
    Session,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WriterAdapter,
    abort_connection,
    abort_writer,
    check_amqtt,
    format_client_message,
    gen_client_id,
)
from broker_plugin.delivery import SessionSender, take_inflight
from broker_plugin.framing import FramingGuard
from broker_plugin.ordering import PublishTracker
from broker_plugin.plugin import CONN_KEY, DeviceAuthorizationPlugin, connection_of
from broker_plugin.subscriptions import FilterIndex
from broker_plugin.tls_capture import install as install_certificate_capture
from broker_plugin.tls_capture import presented_certificate
from pdp.evidence.text import field
from pdp.core.gateway import PREFIX as GATEWAY_PREFIX
from pdp.core.gateway import split as gateway_split
from pdp.core.admission import Admission
from pdp.core.enforcement import ConnId, Disconnect, DropSession, DropSubscription
from pdp.core.outbound import OutboundLimits
from pdp.core.ratelimit import ConnectRateLimit
from pdp.core.retained import RetainedLedger
from pdp.core.topics import TopicError, matches, validate_filter
from pdp.runtime.admin import AdminError

log = logging.getLogger("mqtt_pdp.broker")
STOP_HANDLER_TIMEOUT = 2.0
ROUTE_RUN = 64  # messages one connection's loop routes in a row from its queue before it looks at other work
KEEP_ALIVE_FACTOR = 1.5  # [MQTT-3.1.2-24]
# What a peer can make happen on its own connection; each ends that connection with one log line, no traceback.
class SessionRevoked(Exception):
    """A connection whose admission was revoked before its session started."""


PEER_ERRORS = (AMQTTError, MQTTError, NoDataError, OSError, EOFError, asyncio.TimeoutError, asyncio.IncompleteReadError)


def valid_filter(topic_filter: str) -> bool:
    try:
        validate_filter(topic_filter)
    except TopicError:
        return False
    return True


def tls_failure(exc: BaseException) -> str:
    """One line for why a TLS handshake failed: OpenSSL's verification message when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.verify_message} (certificate verify failed)"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, TimeoutError) or (isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc)):
        return "no TLS handshake within connect_timeout"  # asyncio aborts a slow handshake with that text
    return str(exc) or type(exc).__name__


class ConnectRefused(AMQTTError):
    """The CONNECT was answered with CONNACK 5; the service has logged why."""


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
        self._conn_of_handler: dict[int, ConnId] = {}  # id(handler) -> its connection, for the disconnect path
        self._retained_publishers: dict[str, Admission] = {}  # retained topic -> how its publisher was admitted
        self._filter_index = FilterIndex()
        self._session_filters: dict[str, set[str]] = {}  # client id -> its filters
        # Gateways' relay subscriptions 'gw/<child>/<filter>': the inner filters, and per inner filter the children
        # subscribed for, so a message on a child's topic also reaches the gateways acting for it (pdp.core.gateway).
        self._relay_index = FilterIndex()
        self._relay_children: dict[str, set[str]] = {}
        try:
            self.limits = self.authz.config.broker_limits()
        except ValueError as exc:
            raise BrokerError(f"plugin settings: {exc}") from exc
        self._queued_bytes: dict[str, int] = {}  # client id -> payload bytes queued for it while offline
        self._overflowing: set[str] = set()  # client ids whose offline queue overflow was logged this spell
        self.queued_dropped = 0  # queued messages dropped by the offline queue limits, since start
        self.refused_full = 0  # connections closed at once because their listener was full
        self.ended_by_guard = 0  # connections ended for a protocol violation, size or deadline
        self.tls_refused = 0  # TLS handshakes that failed (each logged with peer and reason)
        self._tls_contexts: dict[str, ssl.SSLContext] = {}  # listener -> the context its handshakes use
        self._senders: dict[str, SessionSender] = {}  # client id -> the sender of its live connection
        self._outbound_limits = OutboundLimits(self.limits.max_inflight_messages, self.limits.session_queue_messages,
                                               self.limits.session_queue_bytes)
        self.outbound_dropped = 0  # QoS 0 messages dropped from live sessions' full queues, since start
        self.slow_consumers = 0  # connections closed because their queue stayed full of QoS 1/2 messages
        self._connect_rate = ConnectRateLimit(self.limits.connect_rate, self.limits.connect_burst)
        self._rate_logged: set[str] = set()  # addresses whose rate overflow was logged (cleared when large)
        self.refused_rate = 0  # connections closed before any handshake: their address connected too often
        self._retained = RetainedLedger(self.limits.max_retained_messages, self.limits.max_retained_bytes,
                                        self.limits.max_retained_per_device, self.limits.max_retained_bytes_per_device)
        self.admin: Any = None  # the admin socket's server, when admin_socket is set

    # -- the operator's admin interface (broker_plugin.operations) ------------------------

    async def start(self) -> None:
        from broker_plugin.operations import start_operations

        try:  # first: a socket or port in use stops the start before any listener opens
            self.admin = await start_operations(self)
        except (OSError, ValueError, AdminError) as exc:
            if self.authz.service.metrics is not None:
                self.authz.service.metrics.close()
            raise BrokerError(str(exc)) from None
        try:
            await super().start()
        except BaseException:
            if self.admin is not None:
                await self.admin.close()
            if self.authz.service.metrics is not None:
                self.authz.service.metrics.close()
            raise

    async def shutdown(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        await super().shutdown()

    # -- TLS: require a client certificate at the handshake ------------------------------

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:  # type: ignore[override]
        context = Broker._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.authz.config.require_client_certificate:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        """A TCP listener with TLS accepts plain TCP and does the handshake itself (``stream_connected``):
        asyncio's own TLS server drops a failed handshake silently (expired, foreign CA, no
        certificate left no line anywhere); done here, each refusal is logged with its peer and reason."""
        if listener_type == ListenerType.TCP and ssl_context is not None:
            # The certificate of a failed handshake, for its record; established connections move to a twin context.
            install_certificate_capture(ssl_context, self._create_ssl_context(self.listeners_config[listener_name]))
            self._tls_contexts[listener_name] = ssl_context
            ssl_context = None
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        peer = writer.get_extra_info("peername")
        where = f"peer {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown peer"
        if isinstance(peer, tuple) and not self._connect_rate.allow(peer[0], asyncio.get_running_loop().time()):
            # Before the handshake: a flood from one address costs a socket accept, not TLS and admission.
            self.refused_rate += 1
            if peer[0] not in self._rate_logged:
                if len(self._rate_logged) >= 10_000:
                    self._rate_logged.clear()
                self._rate_logged.add(peer[0])
                log.warning("%s: connection rate over %g/s (burst %d) from this address: closing its new "
                            "connections (logged once per address)", where, self.limits.connect_rate,
                            self.limits.connect_burst)
            writer.transport.abort()
            return
        context = self._tls_contexts.get(listener_name)
        if context is not None:
            try:
                await writer.start_tls(context, ssl_handshake_timeout=self.limits.connect_timeout)
            except (TimeoutError, ssl.SSLError, OSError, EOFError) as exc:
                self.tls_refused += 1
                log.warning("TLS handshake refused: %s reason=%s", where, tls_failure(exc))
                self.authz.service.tls_refused(f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None,
                                               tls_failure(exc), presented_certificate(exc))
                if self.authz.service.metrics is not None:
                    self.authz.service.metrics.tls_refused(tls_failure(exc))
                writer.transport.abort()
                return
        await self._client_connected(listener_name, StreamReaderAdapter(reader), StreamWriterAdapter(writer))

    # -- every connection: a bounded slot, a framing guard, and an end on every path ---------

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """amqtt's connection start, with every path out releasing the listener slot.

        amqtt released the slot only for its own error types: a bad CONNECT followed by a
        TCP reset raised something else, and six such attempts locked a
        ``max_connections: 3`` listener for good. amqtt also queued connections beyond
        the limit (each holding a socket, unbounded); here they are closed at once.
        """
        server = self._servers.get(listener_name)
        if server is None:
            raise BrokerError(f"Invalid listener name '{listener_name}'")
        peer = writer.get_peer_info()
        where = f"peer {peer[0]}:{peer[1]}" if peer else "unknown peer"
        if server.semaphore is None:  # the listener set no max_connections: ours applies
            server.max_connections = self.limits.max_connections
            server.semaphore = asyncio.Semaphore(self.limits.max_connections)
        if server.semaphore.locked():
            self.refused_full += 1
            log.warning("listener %s full (%d connections): closing %s", listener_name, server.max_connections, where)
            abort_writer(writer)
            return
        await server.acquire_connection()  # does not wait: the semaphore is not locked
        guard = FramingGuard(reader, max_packet_size=self.limits.max_packet_size,
                             connect_timeout=self.limits.connect_timeout, packet_timeout=self.limits.packet_timeout,
                             on_end=lambda reason: self._guard_ended(writer, where, reason))
        session: Session | None = None
        try:
            if peer is None:
                log.warning("connection without peer address on listener %s: closed", listener_name)
                return
            try:
                handler, session = await self._initialize_client_session(guard, writer, peer[0], peer[1])
            except PEER_ERRORS as exc:
                if guard.ended is None:  # a refused CONNECT was logged once already, by the service
                    log.log(logging.DEBUG if isinstance(exc, ConnectRefused) else logging.WARNING,
                            "%s: no session: %s", where, exc or type(exc).__name__)
                return
            try:
                await self._handle_client_session(guard, writer, session, handler, server, listener_name)
            except SessionRevoked as exc:
                log.warning("%s (client %s): closed: %s", where, field(session.client_id or ""), exc)
            except PEER_ERRORS as exc:
                log.warning("%s (client %s): session ended: %s", where, session.client_id, exc or type(exc).__name__)
        except Exception:  # a bug, not the peer: say so once, with the traceback, and still free the slot
            log.exception("%s: connection failed", where)
        finally:
            guard.cancel()
            # Whatever happened, this connection is over: its socket must not outlive it (a no-op after a
            # clean end; after a revoked start amqtt never closed it, and the peer kept it open for good).
            abort_writer(writer)
            server.release_connection()

    def _guard_ended(self, writer: WriterAdapter, where: str, reason: str) -> None:
        """The framing guard ends a connection: drop the socket now (a hostile peer need not drain it)."""
        self.ended_by_guard += 1
        log.warning("%s: connection closed: %s", where, reason)
        abort_writer(writer)

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
        except OSError as exc:  # e.g. amqtt answering a bad CONNECT to a peer that has reset the connection
            raise AMQTTError(f"{where}: connection lost during CONNECT: {exc!r}") from exc
        except UnboundLocalError as exc:
            # amqtt 0.12.1 reads the peer's address after the CONNECT, and a peer already reset has none
            # (its remote_address is then unbound): a lost connection, not a bug of ours worth a traceback.
            raise AMQTTError(f"{where}: connection lost during CONNECT (peer address gone)") from exc

        admission, superseded = self.authz.admit_session(incoming, persistent=not incoming.clean_session)
        if not admission.allowed:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await writer.close()
            raise ConnectRefused(f"{where}: connection refused: {admission.reason}")
        for disconnect in superseded:  # [MQTT-3.1.4-2]: the previous connection of this client id goes first
            await self._take_over(disconnect.conn, incoming)

        session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions and self._sessions[incoming.client_id][0].clean_session:
            # The existing session was a clean one: it ends with its connection and is never resumed
            # [MQTT-3.1.2-6], even when the new connection arrives before the old one has gone.
            await self._delete_session(incoming.client_id)
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            # Same device (the client id is bound to the identity): resume, with this connection's credentials.
            session, old_handler = self._sessions[incoming.client_id]
            stop_routing(old_handler)  # before this connection queues anything: its loop routes from here
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
        if isinstance(reader, FramingGuard) and incoming.keep_alive > 0:
            # amqtt's own keep-alive timer only logs; the guard ends the connection (and the will goes out).
            reader.idle_limit = math.ceil(incoming.keep_alive * KEEP_ALIVE_FACTOR) + (delay if isinstance(delay, int) else 0)
        if isinstance(reader, FramingGuard):
            # With its keep-alive at 0, amqtt's handler skips what would only log: a wait_for (a task) around
            # every packet read and a timer re-armed after every packet written.
            session.keep_alive = 0
        return handler, session

    async def _take_over(self, conn: ConnId, incoming: Session) -> None:
        """Close a connection superseded by a new one of its client id; its will goes out, as for any
        connection that ends without DISCONNECT ([MQTT-3.1.2-8]; amqtt published none on a takeover).

        The old connection is already refused everything by the core, so the will is judged as the new
        connection's: the same device (the client id is bound to its identity), under the policy in force."""
        live = self._connections.get(conn)
        will = None
        if live is not None and live.session.will_flag and live.session.will_topic:
            old = live.session
            will = (old.will_topic, bytes(old.will_message or b""), old.will_qos or 0, bool(old.will_retain))
            old.will_flag = False  # published here, not again by the old connection's end
        await self._close_connection(conn)
        if will is None:
            return
        topic, message, qos, retain = will
        if not self.authz.allows(incoming, "will", topic):
            log.warning("will of %s on %r suppressed: not permitted", incoming.client_id, topic)
            return
        await self._broadcast_message(incoming, topic, message, qos)
        if retain:
            await self.retain_message(incoming, topic, message, qos)

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
            # Revoked between CONNECT and here: superseded by a simultaneous CONNECT of the same client id,
            # or its device changed meanwhile. Not a bug: the caller closes the connection.
            raise SessionRevoked("admission revoked before the session started")
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
        if isinstance(reader, FramingGuard):
            reader.settle = PublishTracker(handler, self.limits.packet_timeout).settled
        defer_pubacks(handler)  # a QoS 1 PUBACK only once the message is decided and routed
        handler.attach(client_session, reader, writer)
        client_id = client_session.client_id or ""
        previous = self._senders.pop(client_id, None)
        if previous is not None:  # a taken-over connection whose end has not run yet: its leftovers come first
            await self._retire_sender(previous, client_session)
        self._sessions[client_session.client_id] = (client_session, handler)  # type: ignore[index]
        self._connections[conn] = _Connection(client_session, handler)
        self._conn_of_handler[id(handler)] = conn
        redeliver = take_inflight(client_session)  # out of amqtt's sight: its retry drops them after 5 s
        if client_session.clean_session:
            redeliver = []
        # Checked again, as queued messages are: the policy or the device may have changed since they were sent.
        redeliver = [m for m in redeliver if self.authz.allows(client_session, "receive", m.topic, "queued")]
        sender = SessionSender(client_session, handler, self._outbound_limits,
                               lambda reason: self._slow_consumer(conn, client_session, handler, reason),
                               self._outbound_drop)
        self._senders[client_id] = sender
        if isinstance(reader, FramingGuard):
            reader.on_ack = sender.take_ack
        self._take_offline_queue(client_session)  # before anything live can be routed to the new connection
        ended = False
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
            )
            await handler.start()
            sender.start(redeliver)  # unacknowledged QoS 1/2 of the last connection first, with DUP=1
            await self._publish_session_retained_messages(client_session)
            for subscription in self._own_filters(client_session):
                await self._publish_retained_messages_for_subscription(subscription, client_session)
            ended = await self._client_message_loop(client_session, handler)
        finally:
            if isinstance(reader, FramingGuard) and reader.ended is not None:
                self.authz.service.ended(conn, client_session.client_id or "", reader.ended)
            if not ended:
                await self._end_session(client_session, handler)
            if self._senders.get(client_id) is sender:
                del self._senders[client_id]
                await self._retire_sender(sender, client_session)
            self._connections.pop(conn, None)
            self._conn_of_handler.pop(id(handler), None)
            self.authz.service.closed(conn)

    def _outbound_drop(self, count: int) -> None:
        self.outbound_dropped += count

    def _slow_consumer(self, conn: ConnId, session: Session, handler: BrokerProtocolHandler, reason: str) -> None:
        """A live session's queue is full of messages it does not take: end its connection (the will goes out)."""
        self.slow_consumers += 1
        log.warning("client %s: connection closed: %s", session.client_id, reason)
        self.authz.service.ended(conn, session.client_id or "", reason)
        abort_connection(handler)

    async def _retire_sender(self, sender: SessionSender, session: Session) -> None:
        """Stop a connection's sender. A persistent session keeps its unacknowledged messages (in
        ``inflight_out``, resent on reconnect) and its waiting QoS 1/2 ones (in the offline queue, bounded)."""
        leftovers = await sender.stop()
        if session.clean_session or self._sessions.get(session.client_id or "", (None, None))[0] is not session:
            return
        for item in leftovers:
            if item.qos:
                await self._retain_broadcast_message(
                    {"session": None, "topic": item.topic, "data": item.data}, item.qos, session)

    async def _end_session(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """End a session whose loop stopped without a disconnect being handled (an error, a close): amqtt
        returned from its loop there and left the socket open, acknowledging messages it never routed."""
        abort_connection(handler)
        try:
            if client_session.transitions.state == "connected" and self._sessions.get(
                    client_session.client_id or "", (None, None))[1] is handler:
                lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                lost.set_result(None)  # as a lost connection: the will, if any, goes out
                await self._handle_disconnect(client_session, handler, lost)
            else:
                await self._stop_handler(handler)
        except Exception:  # the connection is already gone; nothing else may keep its slot
            log.exception("ending the session of %s failed", client_session.client_id)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> bool:  # type: ignore[override]
        """amqtt's loop without ``logger.debug(repr(self._subscriptions))`` after every SUBSCRIBE: that
        string of every subscription in the broker is built whatever the log level, so subscribing
        cost grew with the fleet (10,000 devices: minutes of CPU). True when it handled the disconnect;
        otherwise the caller ends the session."""
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = next_delivery(handler)
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        consumed: asyncio.Future[Any] | None = None  # the last delivery future handled
        loop = asyncio.get_running_loop()
        connected = True
        handled = False
        try:
            while connected:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if disconnect_waiter in done:
                    # First route what the PUBLISHes before it queued (see broker_plugin.ordering), then
                    # end the session; as amqtt does, still handle the other waiters that completed with it.
                    queue = client_session.delivered_message_queue
                    while True:
                        if taken_over(handler):
                            break  # the new connection's loop routes the queue from here (stop_routing)
                        if not wait_deliver.done():
                            # Re-checked, not one wait of packet_timeout: the queue can empty meanwhile (amqtt
                            # clears a deleted session's queue; a connection taking the session over routes
                            # from it too), and the wait then held this connection 30 s (outside test).
                            deadline = loop.time() + self.limits.packet_timeout
                            while not wait_deliver.done() and not queue.empty() and loop.time() < deadline:
                                await asyncio.wait([wait_deliver], timeout=0.05)
                            if not wait_deliver.done():
                                break
                        if wait_deliver.cancelled() or wait_deliver.exception() or wait_deliver.result() is None:
                            break
                        consumed = wait_deliver
                        if not await self._handle_message_delivery(client_session, handler, wait_deliver.result()):
                            return handled
                        wait_deliver = next_delivery(handler)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                    handled = True
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done and wait_deliver.cancelled():  # taken over (stop_routing)
                    wait_deliver = next_delivery(handler)
                elif wait_deliver in done:
                    consumed = wait_deliver
                    if not await self._route_queued(client_session, handler, wait_deliver.result(), waiters):
                        return handled
                    wait_deliver = next_delivery(handler)
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        except asyncio.CancelledError:
            log.debug("client loop of %s cancelled", client_session.client_id)
        finally:
            for waiter in {*waiters, wait_deliver}:
                waiter.cancel()
            await asyncio.gather(*waiters, wait_deliver, return_exceptions=True)
            # A message this loop took from the session's queue and never routed goes back to its front: with
            # a persistent session taken over, the new connection's loop routes (and acknowledges) it. It was
            # dropped when the old loop's getter won it during the disconnect (outside test: 3 of 11 runs of
            # 200 takeovers lost one of the live connection's messages).
            if wait_deliver is not consumed and wait_deliver.done() and not wait_deliver.cancelled() \
                    and wait_deliver.exception() is None and wait_deliver.result() is not None:
                return_to_front(client_session.delivered_message_queue, wait_deliver.result())
        return handled

    async def _route_queued(self, client_session: Session, handler: BrokerProtocolHandler, first: Any,
                            waiters: list[asyncio.Future[Any]]) -> bool:
        """Route ``first`` and then what its PUBLISH's read queued behind it, up to ``ROUTE_RUN`` messages, without
        a getter task and an ``asyncio.wait`` per message; their PUBACKs go out together at the end, one
        write per connection. Stops early when another waiter (disconnect, subscribe, unsubscribe) is done
        and the loop sees it (as amqtt's loop, a SUBSCRIBE read after PUBLISHes can take effect before some
        of them are routed; MQTT orders PUBLISHes only), and at once when the session was taken over: the new
        connection's loop routes its queue from then on (``stop_routing``). False when the connection must
        close."""
        queue = client_session.delivered_message_queue
        batch: dict[Any, list[bytes]] = {}
        try:
            message, routed = first, 0
            while True:
                if not await self._handle_message_delivery(client_session, handler, message, batch):
                    return False
                routed += 1
                if routed >= ROUTE_RUN or queue.empty() or any(waiter.done() for waiter in waiters[:3]) \
                        or not handler._is_attached() or taken_over(handler):
                    return True
                message = queue.get_nowait()  # routed next: nothing taken is left behind
        finally:
            send_batched(batch)

    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       app_message: Any, batch: dict[Any, list[bytes]] | None = None) -> bool:
        """amqtt's, except that a ``$`` or empty topic is refused and recorded and the session goes on
        (amqtt returned from the loop there, leaving a connection that acknowledged and never routed),
        and that a QoS 1 message is acknowledged here, once decided and routed (``broker_plugin.acknowledgement``).
        False only for what must close the connection (a wildcard topic, which the framing guard already
        refuses before amqtt parses it)."""
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message)
        if app_message is None:
            return True
        if "#" in app_message.topic or "+" in app_message.topic:
            log.warning("%s published to %r: wildcard in a topic name [MQTT-3.3.2-2], closing",
                        client_session.client_id, app_message.topic)
            return False  # not acknowledged: the connection closes
        await self._route(client_session, app_message)
        acknowledge(app_message, batch)  # decided (and recorded), then refused or routed: the publisher may forget it
        return True

    async def _route(self, client_session: Session, app_message: Any) -> None:
        topic = app_message.topic
        # The core refuses '$' topics whatever the policy; the policy side refuses an empty topic as invalid.
        relay: tuple[str, str] | None = None
        if topic.startswith(GATEWAY_PREFIX):  # a gateway publishing for a child (pdp.core.gateway)
            allowed, relay = self.authz.publish_relay(client_session, topic)
        else:
            allowed = self.authz.allows(client_session, "publish", topic)
        if not allowed:
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message)
        if relay is not None:  # delivered as the child's topic; a relayed message is never retained
            await self._broadcast_message(client_session, relay[1], app_message.data, app_message.qos)
            return
        await self._broadcast_message(client_session, topic, app_message.data, app_message.qos)
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)

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
        its publisher's current rights, sent by the session's sender: in order, at most its in-flight window
        of QoS 1/2 unacknowledged, each waiting for its acknowledgement as long as the connection lives.
        amqtt started a task per retained message, all at once, and gave up on a QoS 1/2 one not acknowledged
        within 5 s (a traceback in the log). Offered as backlog, outside the live queue's limits: a filter
        that matches many retained messages must not make its subscriber a slow consumer; at most one per
        topic waits (``OutboundQueue.offer_retained``), so the retained store's limits bound them."""
        topic_filter, qos = subscription
        sender = self._senders.get(session.client_id or "")
        if sender is None or sender.session is not session:
            return
        publishers = self._retained_publishers
        waiting = sender.queue.retained_waiting
        for topic, retained in list(self._retained_messages.items()):
            # One still waiting for this session is not decided (and recorded) again: it is sent once.
            if retained.data and matches(topic_filter, topic) and not waiting(topic) \
                    and self.authz.allows(session, "receive", topic, "retained", publishers.get(topic)):
                sender.offer_retained(topic, bytes(retained.data), min(qos, qos if retained.qos is None else retained.qos))

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """amqtt's, remembering which device published what it retains (served only while that device may),
        within the retained store's limits (``RetainedLedger``)."""
        if topic_name is not None:
            publisher = self.authz.publisher(source_session)
            owner = (publisher.device.device_id if publisher is not None and publisher.device is not None
                     else (source_session.client_id if source_session is not None else None)) or ""
            refused = self._retained.refuses(topic_name, len(data or b""), owner)
            if refused is not None:
                if self._retained.first_refusal(owner):
                    log.warning("retained store: %s not retained for %s (%s); further refusals for this device "
                                "are counted, not logged, until it retains again", topic_name, owner or "the broker",
                                refused)
                data = b""  # removes the topic's earlier retained message, as an empty retained PUBLISH does
            else:
                self._retained.store(topic_name, len(data or b""), owner)
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is None:
            return
        if topic_name in self._retained_messages:
            publisher = self.authz.publisher(source_session)
            if publisher is not None:
                self._retained_publishers[topic_name] = publisher
            else:
                self._retained_publishers.pop(topic_name, None)
        else:
            self._retained_publishers.pop(topic_name, None)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Messages queued while offline are checked again: the policy may have changed meanwhile. They go
        out with RETAIN=0: they reach the session as ordinary deliveries ([MQTT-3.3.1-9]; amqtt set 1).
        The hardened session start has already handed them to the sender (``_take_offline_queue``) before
        anything live could be; this catches what a stock path queued."""
        if self._get_handler(session) is None:
            return
        self._take_offline_queue(session)

    def _take_offline_queue(self, session: Session) -> None:
        """The offline queue into the session's sender, in one synchronous step: ahead of any live message."""
        sender = self._senders.get(session.client_id or "")
        self._queued_bytes.pop(session.client_id or "", None)
        self._overflowing.discard(session.client_id or "")
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            if sender is not None and self.authz.allows(session, "receive", queued.topic, "queued"):
                sender.offer_backlog(queued.topic, bytes(queued.data or b""), queued.qos or 0)

    # -- offline queues: bounded in messages and bytes, oldest dropped first ------------------

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        """amqtt's queueing for an offline session, bounded: amqtt queued without limit, so one device that
        never came back could hold any amount of memory. Beyond either limit the oldest message goes
        (the newest state is usually what a device needs on return); counted, logged once per spell."""
        client_id = target_session.client_id or ""
        queue = target_session.retained_messages
        data = broadcast["data"] or b""
        limits = self.limits
        if queue.empty() or client_id not in self._queued_bytes:
            self._queued_bytes[client_id] = sum(len(m.data or b"") for m in list(queue._queue))  # type: ignore[attr-defined]
        if len(data) > limits.offline_queue_bytes:
            self._overflow(client_id, 1)
            return
        dropped = 0
        while not queue.empty() and (queue.qsize() >= limits.offline_queue_messages
                                     or self._queued_bytes[client_id] + len(data) > limits.offline_queue_bytes):
            oldest = queue.get_nowait()
            self._queued_bytes[client_id] -= len(oldest.data or b"")
            dropped += 1
        if dropped:
            self._overflow(client_id, dropped)
        queue.put_nowait(RetainedApplicationMessage(broadcast["session"], broadcast["topic"], data, qos))
        self._queued_bytes[client_id] += len(data)

    def _overflow(self, client_id: str, dropped: int) -> None:
        self.queued_dropped += dropped
        if client_id not in self._overflowing:
            self._overflowing.add(client_id)
            log.warning("offline queue of %s is full (%d messages or %d bytes): dropping its oldest messages",
                        client_id, self.limits.offline_queue_messages, self.limits.offline_queue_bytes)

    # -- will: checked again when it would be published (hole 2) ----------------------------

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: Any) -> None:
        conn = self._conn_of_handler.get(id(handler))  # not a scan: mass disconnects stay linear
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
        if not valid_filter(subscription[0]):  # amqtt refuses these before asking: the PDP refuses and records
            self.authz.allows(session, "subscribe", subscription[0])
            return 0x80
        result = await super().add_subscription(subscription, session)
        if result != 0x80:
            self._filter_index.add(subscription[0])
            self._session_filters.setdefault(session.client_id or "", set()).add(subscription[0])
            relay = gateway_split(subscription[0])
            if relay is not None:
                child_id, inner = relay
                self._relay_index.add(inner)
                self._relay_children.setdefault(inner, set()).add(child_id)
        return result

    def _forget_relay(self, wire_filter: str) -> None:
        """A relay filter nobody holds any more leaves the relay index."""
        relay = gateway_split(wire_filter)
        if relay is None or wire_filter in self._subscriptions:
            return
        child_id, inner = relay
        children = self._relay_children.get(inner)
        if children is not None:
            children.discard(child_id)
            if not children:
                del self._relay_children[inner]
                self._relay_index.remove(inner)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        self.authz.unsubscribed(session, a_filter)
        self._session_filters.get(session.client_id or "", set()).discard(a_filter)
        self._forget_relay(a_filter)
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
                self._forget_relay(topic_filter)

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
            qos = min(broadcast["qos"], sub_qos) if "qos" in broadcast else sub_qos  # [MQTT-3.8.4-6]
            if not allows(target, "receive", topic):
                continue
            connected = target.transitions.state == "connected"
            if not connected:
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, target)
                continue
            self._deliver(target, topic, broadcast["data"], qos, running_tasks)
        if self._relay_children and not topic.startswith(GATEWAY_PREFIX):
            await self._relay_broadcast(broadcast, topic, running_tasks)

    async def _relay_broadcast(self, broadcast: dict[str, Any], topic: str,
                               running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """A message on a child's topic, to each gateway holding 'gw/<child>/<filter>' for a filter that matches:
        delivered as 'gw/<child>/<topic>', judged (the gateway's and the child's receive) like any delivery."""
        allows = self.authz.allows
        deliveries = []
        for inner in self._relay_index.match(topic):
            for child_id in sorted(self._relay_children.get(inner, ())):
                wire_topic = f"{GATEWAY_PREFIX}{child_id}/{topic}"
                deliveries += [(wire_topic, target, sub_qos) for target, sub_qos in
                               self._subscriptions.get(f"{GATEWAY_PREFIX}{child_id}/{inner}", [])]
        for wire_topic, target, sub_qos in deliveries:  # taken in one synchronous step, as _subscribers_of
            qos = min(broadcast["qos"], sub_qos) if "qos" in broadcast else sub_qos  # [MQTT-3.8.4-6]
            if not allows(target, "receive", wire_topic):
                continue
            if target.transitions.state != "connected":
                if not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
                    await self._retain_broadcast_message({**broadcast, "topic": wire_topic}, qos, target)
                continue
            self._deliver(target, wire_topic, broadcast["data"], qos, running_tasks)

    def _deliver(self, target: Session, topic: str, data: Any, qos: int | None,
                 running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """To a live session: through its sender's bounded queue (``broker_plugin.delivery``)."""
        sender = self._senders.get(target.client_id or "")
        if sender is not None and sender.session is target:
            sender.offer(topic, bytes(data or b""), qos or 0)
            return
        handler = self._get_handler(target)  # not this broker's own connection handling (none expected)
        if handler is not None:
            running_tasks.append(asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False)))

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

    async def _cleanup_session(self, client_id: str) -> None:
        self._queued_bytes.pop(client_id, None)
        self._overflowing.discard(client_id)
        await super()._cleanup_session(client_id)

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
