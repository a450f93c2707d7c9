"""One sender per live connection: deliveries go through the session's bounded queue (``pdp.core.outbound``).

amqtt started a task per delivery that wrote, drained and waited 5 s for the
acknowledgement, then forgot the message: a subscriber that stopped reading made
tasks (each holding its message) pile up without bound, and a QoS 1/2 message not
acknowledged within 5 s, or when the connection dropped, was never delivered again.
Here one task per connection sends in order, keeps at most ``inflight_messages``
QoS 1/2 flows open (each waits for its acknowledgement as long as the connection
lives: MQTT 3.1.1 resends only on reconnect, [MQTT-4.4.0-1]), and when the
connection ends the unacknowledged messages stay in the session's ``inflight_out``
so the next connection of a persistent session sends them again with DUP=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from broker_plugin.amqtt_compat import (
    BrokerProtocolHandler,
    OutgoingApplicationMessage,
    PublishPacket,
    PubrelPacket,
    Session,
)
from pdp.core.outbound import OutboundLimits, OutboundQueue, Outgoing

log = logging.getLogger("mqtt_pdp.broker")


class SessionSender:
    """Sends a live session's deliveries through its bounded queue; ``on_overflow(reason)`` ends the connection."""

    def __init__(self, session: Session, handler: BrokerProtocolHandler, limits: OutboundLimits,
                 on_overflow: Callable[[str], None], on_drop: Callable[[int], None] | None = None) -> None:
        self.session = session
        self.handler = handler
        self.queue = OutboundQueue(limits)
        self.dropped = 0  # QoS 0 messages dropped for this connection
        self.overflowed = False
        self._on_overflow = on_overflow
        self._on_drop = on_drop
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # an in-flight flow completed
        self._task: asyncio.Task[None] | None = None
        self._flows: set[asyncio.Task[None]] = set()
        self._logged = False

    def start(self, redeliver: list[OutgoingApplicationMessage]) -> None:
        """Begin sending: first the unacknowledged messages of the previous connection (same packet ids,
        reserved again in ``inflight_out`` before anything else can take one), then what was offered."""
        first = []
        for message in redeliver:
            self.session.inflight_out[message.packet_id] = message
            first.append(Outgoing(message.topic, bytes(message.data or b""), message.qos or 1, False, message))
        for item in reversed(first):  # ahead of anything offered meantime, in their original order
            self.queue.waiting.appendleft(item)
            self.queue.held_messages += 1
            self.queue.held_bytes += item.size
        self._task = asyncio.ensure_future(self._run())
        self._wake.set()

    def offer(self, topic: str, data: bytes, qos: int, retain: bool = False) -> None:
        if self.overflowed:
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
        self._wake.set()

    def _log_once(self) -> None:
        if not self._logged:
            self._logged = True
            log.warning("outbound queue of %s is full (%d messages or %d bytes): dropping its oldest QoS 0 messages",
                        self.session.client_id, self.queue.limits.queue_messages, self.queue.limits.queue_bytes)

    async def stop(self) -> list[Outgoing]:
        """Stop sending; what never went out, oldest first. Unacknowledged flows stay in ``inflight_out``."""
        tasks = [t for t in (self._task, *self._flows) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return [item for item in self.queue.drain() if item.resend is None or item.qos]

    async def _run(self) -> None:
        queue = self.queue
        while True:
            item = queue.next_to_send()
            if item is None:
                self._wake.clear()
                self._room.clear()
                if queue.waiting:  # blocked on in-flight room
                    await self._room.wait()
                else:
                    await self._wake.wait()
                continue
            if not item.qos:
                try:
                    await self.handler._send_packet(PublishPacket.build(item.topic, item.data, None, False, 0, item.retain))
                finally:
                    queue.sent(item)
                continue
            flow = asyncio.ensure_future(self._flow(item))
            self._flows.add(flow)
            flow.add_done_callback(self._flow_done)
            await asyncio.sleep(0)  # the flow takes the write lock now, ahead of the next message: order kept

    def _flow_done(self, flow: asyncio.Task[None]) -> None:
        self._flows.discard(flow)
        if not flow.cancelled() and flow.exception() is not None:
            log.debug("delivery to %s ended: %r", self.session.client_id, flow.exception())

    async def _flow(self, item: Outgoing) -> None:
        """One QoS 1/2 delivery to its end; on connection loss the message stays in ``inflight_out``."""
        handler, session = self.handler, self.session
        message = item.resend
        if not isinstance(message, OutgoingApplicationMessage):
            message = OutgoingApplicationMessage(session.next_packet_id, item.topic, item.qos, item.data, item.retain)
            session.inflight_out[message.packet_id] = message
        packet_id = message.packet_id
        loop = asyncio.get_running_loop()
        done = False
        try:
            if item.qos == 1 or message.pubrec_packet is None:
                waiters = handler._puback_waiters if item.qos == 1 else handler._pubrec_waiters
                waiter = waiters[packet_id] = loop.create_future()
                packet = message.build_publish_packet(dup=item.resend is not None)
                await handler._send_packet(packet)
                message.publish_packet = packet
                ack = await waiter
                if item.qos == 1:
                    message.puback_packet = ack
                else:
                    message.pubrec_packet = ack
            if item.qos == 2:
                waiter = handler._pubcomp_waiters[packet_id] = loop.create_future()
                message.pubrel_packet = PubrelPacket.build(packet_id)
                await handler._send_packet(message.pubrel_packet)
                message.pubcomp_packet = await waiter
            done = True
        finally:
            for waiters in (handler._puback_waiters, handler._pubrec_waiters, handler._pubcomp_waiters):
                waiters.pop(packet_id, None)
            if done:
                session.inflight_out.pop(packet_id, None)
            self.queue.sent(item)
            self._room.set()


def take_inflight(session: Session) -> list[OutgoingApplicationMessage]:
    """The session's unacknowledged outgoing messages, removed so amqtt's own retry (5 s, then dropped)
    does not see them; ``SessionSender.start`` puts them back and sends them again."""
    messages = [m for m in session.inflight_out.values() if isinstance(m, OutgoingApplicationMessage)]
    session.inflight_out.clear()
    return messages


async def stop_quietly(sender: SessionSender) -> list[Outgoing]:
    with contextlib.suppress(Exception):
        return await sender.stop()
    return []
