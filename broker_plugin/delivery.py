"""One sender per live connection: deliveries go through the session's bounded queue (``pdp.core.outbound``).

amqtt started a task per delivery that wrote, drained and waited 5 s for the
acknowledgement, then forgot the message: a subscriber that stopped reading made
tasks (each holding its message) pile up without bound, and a QoS 1/2 message not
acknowledged within 5 s, or when the connection dropped, was never delivered again.
Here each connection's deliveries are sent in order, at most ``inflight_messages``
QoS 1/2 flows are open (each waits for its acknowledgement as long as the connection
lives: MQTT 3.1.1 resends only on reconnect, [MQTT-4.4.0-1]), and when the
connection ends the unacknowledged messages stay in the session's ``inflight_out``
so the next connection of a persistent session sends them again with DUP=1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from broker_plugin.amqtt_compat import (
    BrokerProtocolHandler,
    OutgoingApplicationMessage,
    PubackPacket,
    PubcompPacket,
    PubrecPacket,
    PubrelPacket,
    Session,
    StreamWriterAdapter,
)
from pdp.core.outbound import OutboundLimits, OutboundQueue, Outgoing
from pdp.evidence.text import field

log = logging.getLogger("mqtt_pdp.broker")
ACK_NAMES = {4: "PUBACK", 5: "PUBREC", 7: "PUBCOMP"}


class SessionSender:
    """Sends a live session's deliveries through its bounded queue; ``on_overflow(reason)`` ends the connection.

    No task per message: a message is written as soon as the queue lets it go (whole packets, in
    order, synchronously, so they never interleave with amqtt's own writes), and a QoS 1/2 flow
    goes on from a callback on its acknowledgement. Only when the socket's write buffer is over its
    high-water mark does one task wait for it to drain; meanwhile messages wait in the queue, where
    the limits apply. (amqtt's task per delivery cost about 1.5x the broker CPU per message of
    this.) amqtt's ``PACKET_SENT`` plugin event is not fired for these packets.
    """

    def __init__(self, session: Session, handler: BrokerProtocolHandler, limits: OutboundLimits,
                 on_overflow: Callable[[str], None], on_drop: Callable[[int], None] | None = None) -> None:
        self.session = session
        self.handler = handler
        self.queue = OutboundQueue(limits)
        self.dropped = 0  # QoS 0 messages dropped for this connection
        self.overflowed = False
        self._on_overflow = on_overflow
        self._on_drop = on_drop
        writer = handler.writer
        stream = getattr(writer, "_writer", None) if isinstance(writer, StreamWriterAdapter) else None
        self._transport: asyncio.BaseTransport | None = getattr(stream, "transport", None)
        self._draining: asyncio.Task[None] | None = None
        self._flows: dict[int, asyncio.Future[Any]] = {}  # packet id -> the acknowledgement it waits for
        self._started = False
        self._stopped = False
        self._logged = False
        self.unexpected_acks = 0  # acknowledgements nothing waited for (take_ack)

    def start(self, redeliver: list[OutgoingApplicationMessage]) -> None:
        """Begin sending: first the unacknowledged messages of the previous connection (same packet ids,
        reserved again in ``inflight_out`` before anything else can take one), then what was offered."""
        first = []
        for message in redeliver:
            self.session.inflight_out[message.packet_id] = message
            first.append(Outgoing(message.topic, bytes(message.data or b""), message.qos or 1, False, message))
        for item in reversed(first):  # ahead of anything offered meantime, in their original order
            self.queue.offer_backlog(item, first=True)
        self._started = True
        self._pump()

    def offer_backlog(self, topic: str, data: bytes, qos: int) -> None:
        """A message queued while the session was offline: bounded by the offline limits already."""
        if not self._stopped:
            self.queue.offer_backlog(Outgoing(topic, data, qos))
            self._pump()

    def offer_retained(self, topic: str, data: bytes, qos: int) -> None:
        """A retained message for a new subscription, unless one of its topic still waits (``OutboundQueue``)."""
        if not self._stopped and self.queue.offer_retained(Outgoing(topic, data, qos, True)):
            self._pump()

    def offer(self, topic: str, data: bytes, qos: int, retain: bool = False) -> None:
        if self.overflowed or self._stopped:
            return
        offered = self.queue.offer(Outgoing(topic, data, qos, retain))
        if offered.dropped:
            self.dropped += offered.dropped
            if self._on_drop is not None:
                self._on_drop(offered.dropped)
            self._log_once()
        if offered.overflow:
            self.overflowed = True
            self._on_overflow(
                f"slow consumer: {self.queue.held_messages} messages / {self.queue.held_bytes} bytes held "
                f"(limits {self.queue.limits.queue_messages} / {self.queue.limits.queue_bytes})")
            return
        self._pump()

    def _log_once(self) -> None:
        if not self._logged:
            self._logged = True
            log.warning("outbound queue of %s is full (%d messages or %d bytes): dropping its oldest QoS 0 messages",
                        self.session.client_id, self.queue.limits.queue_messages, self.queue.limits.queue_bytes)

    async def stop(self) -> list[Outgoing]:
        """Stop sending; what never went out, oldest first. Unacknowledged flows stay in ``inflight_out``."""
        self._stopped = True
        for ack in list(self._flows.values()):
            ack.cancel()
        if self._draining is not None:
            self._draining.cancel()
            await asyncio.gather(self._draining, return_exceptions=True)
        # Resends not yet sent again are still in inflight_out: the next connection resends them. Retained messages
        # for a subscription go too: a persistent session's next connection gets them again, as retained (they came
        # back twice, once as queued with RETAIN=0, and filled the offline queue: an outside attack).
        return [item for item in self.queue.drain() if item.resend is None and not item.retain]

    # -- writing ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Write what the queue lets go now, until it has nothing or the socket's buffer is full."""
        if not self._started or self._stopped or self._draining is not None \
                or getattr(self.handler.writer, "is_closed", False):
            return
        queue = self.queue
        while True:
            item = queue.next_to_send()
            if item is None:
                return
            if item.qos:
                self._begin_flow(item)
            else:
                self.handler.writer.write(publish_bytes(item.topic, item.data, item.retain))
                queue.sent(item)
            if self._buffer_full():
                self._draining = asyncio.ensure_future(self._drain())
                return

    def _write(self, packet: Any) -> None:
        self.handler.writer.write(packet.to_bytes())

    def _buffer_full(self) -> bool:
        transport = self._transport
        if transport is None:
            return True  # not a socket stream (websocket): drain after every write, as amqtt does
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]  # type: ignore[attr-defined]

    async def _drain(self) -> None:
        try:
            await self.handler.writer.drain()
        except (OSError, RuntimeError):  # the connection is going away; its end retires this sender
            return
        finally:
            self._draining = None
        self._pump()

    # -- QoS 1/2 flows, driven by their acknowledgements ----------------------------------------

    def _begin_flow(self, item: Outgoing) -> None:
        session, handler = self.session, self.handler
        message = item.resend
        if not isinstance(message, OutgoingApplicationMessage):
            message = OutgoingApplicationMessage(session.next_packet_id, item.topic, item.qos, item.data, item.retain)
        session.inflight_out[message.packet_id] = message
        if item.qos == 2 and message.pubrec_packet is not None:  # PUBREC came before: resume with PUBREL
            self._send_pubrel(item, message)
            return
        self._expect(item, message, handler._puback_waiters if item.qos == 1 else handler._pubrec_waiters)
        # The message's own fields, as amqtt's build_publish_packet took them (a resend keeps its RETAIN flag).
        handler.writer.write(publish_bytes(message.topic, bytes(message.data or b""), bool(message.retain),
                                           message.qos or item.qos, message.packet_id, item.resend is not None))

    def _expect(self, item: Outgoing, message: OutgoingApplicationMessage, waiters: dict[int, Any]) -> None:
        """Wait for the next acknowledgement of this flow: the connection's guard completes the future
        (``take_ack``); amqtt's reader would, for a reader without the guard."""
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[message.packet_id] = ack
        self._flows[message.packet_id] = ack
        ack.add_done_callback(lambda done: self._acknowledged(done, item, message, waiters))

    def _acknowledged(self, ack: asyncio.Future[Any], item: Outgoing, message: OutgoingApplicationMessage,
                      waiters: dict[int, Any]) -> None:
        packet_id = message.packet_id
        if waiters.get(packet_id) is ack:
            del waiters[packet_id]
        if self._flows.get(packet_id) is ack:
            del self._flows[packet_id]
        if ack.cancelled() or ack.exception() is not None:
            self.queue.sent(item)  # the connection is going away; the message stays in inflight_out
            return
        if item.qos == 2 and message.pubrec_packet is None:
            message.pubrec_packet = ack.result()
            self._send_pubrel(item, message)
            return
        if item.qos == 1:
            message.puback_packet = ack.result()
        else:
            message.pubcomp_packet = ack.result()
        self.session.inflight_out.pop(packet_id, None)
        self.queue.sent(item)
        self._pump()

    def take_ack(self, kind: int, packet_id: int) -> bool:
        """A PUBACK (4), PUBREC (5) or PUBCOMP (7) the connection's guard has read whole: completes the flow
        waiting for it and returns True. Taking it here skips, per acknowledgement, amqtt's parse from the
        stream, its PACKET_RECEIVED event (not fired for these) and a task running its handler, which only
        completed this same future: about a third of the broker's CPU per QoS 1 delivery.

        One that nothing waits for (an unknown packet id, a duplicate) is taken too: amqtt's handler only
        logged a warning for each, a line per packet a client chose to send (25,000 PUBACKs, 25,000 lines,
        in an outside attack); here the first is logged, and the rest counted in ``unexpected_acks``. One
        that amqtt's own waiter of that kind waits for goes to amqtt's reader (False), as before."""
        handler = self.handler
        if kind == 4:
            waiters, packet = handler._puback_waiters, PubackPacket
        elif kind == 5:
            waiters, packet = handler._pubrec_waiters, PubrecPacket
        else:
            waiters, packet = handler._pubcomp_waiters, PubcompPacket
        waiter = waiters.get(packet_id)
        if waiter is not None and waiter is not self._flows.get(packet_id):
            return False  # amqtt's own
        if waiter is None or waiter.done():  # unknown, or a duplicate of one taken in this same read
            self.unexpected_acks += 1
            if self.unexpected_acks == 1:
                log.warning("client %s sent a %s for packet id %d, which nothing waits for: ignored (further "
                            "ones on this connection are not logged)", field(self.session.client_id or ""),
                            ACK_NAMES.get(kind, kind), packet_id)
            return True
        waiter.set_result(packet.build(packet_id))
        return True

    def _send_pubrel(self, item: Outgoing, message: OutgoingApplicationMessage) -> None:
        message.pubrel_packet = PubrelPacket.build(message.packet_id)
        self._expect(item, message, self.handler._pubcomp_waiters)
        self._write(message.pubrel_packet)


def publish_bytes(topic: str, data: bytes, retain: bool, qos: int = 0, packet_id: int = 0, dup: bool = False) -> bytes:
    """A PUBLISH as amqtt's ``PublishPacket.build(...).to_bytes()`` writes it, byte for byte (a test compares
    them at every QoS, DUP and RETAIN): no packet object is needed, as nothing reads one back (a resend is
    encoded again, with DUP=1, by ``SessionSender._begin_flow``). amqtt's objects cost about 4 us a QoS 0
    delivery (a fifth of the broker's CPU per delivered message at 10x10 QoS 0) and more at QoS 1."""
    name = topic.encode("utf-8")
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    length = 2 + len(name) + len(data) + (2 if qos else 0)
    if length < 128:
        header = bytes((first, length))
    else:
        encoded = bytearray((first,))
        while True:
            length, digit = divmod(length, 128)
            encoded.append(digit | 0x80 if length else digit)
            if not length:
                break
        header = bytes(encoded)
    if qos:
        return b"".join((header, len(name).to_bytes(2, "big"), name, packet_id.to_bytes(2, "big"), data))
    return b"".join((header, len(name).to_bytes(2, "big"), name, data))


def take_inflight(session: Session) -> list[OutgoingApplicationMessage]:
    """The session's unacknowledged outgoing messages, removed so amqtt's own retry (5 s, then dropped)
    does not see them; ``SessionSender.start`` puts them back and sends them again."""
    messages = [m for m in session.inflight_out.values() if isinstance(m, OutgoingApplicationMessage)]
    session.inflight_out.clear()
    return messages
