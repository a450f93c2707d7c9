"""What one live session may hold of messages on their way to it, and what gives when it holds too much.

A subscriber that stops reading (or stops acknowledging) must not make the broker
hold an unbounded number of messages for it: amqtt started a task per delivery, each
holding its message, and they piled up behind a socket nobody drained (+54 MB for
20,000 QoS 1 messages). Here each live session has one bounded queue, Mosquitto-like:

- at most ``inflight_messages`` QoS 1/2 messages are sent and not yet acknowledged;
  the rest wait, in order;
- everything held for the session (waiting and in flight) is at most
  ``queue_messages`` messages and ``queue_bytes`` payload bytes;
- beyond either, the oldest waiting QoS 0 message is dropped (QoS 0 promises
  nothing), repeatedly; if only QoS 1/2 messages are left and the queue is still over,
  the session is a slow consumer and the broker disconnects it (a persistent
  session keeps what it held, within the offline queue limits).

Pure and synchronous: the broker's sender (``broker_plugin.delivery``) does the I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class OutboundLimits:
    inflight_messages: int
    queue_messages: int
    queue_bytes: int


@dataclass(slots=True)
class Outgoing:
    """One message for the session; ``resend`` for an unacknowledged one from a previous connection
    (its ``packet_id`` and ``state`` are kept: it goes out again with DUP=1 [MQTT-4.4.0-1])."""

    topic: str
    data: bytes
    qos: int
    retain: bool = False
    resend: object | None = None  # the amqtt message being redelivered, opaque here
    backlog: bool = False  # carried over from while the session was offline (or a resend): see OutboundQueue

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Offered:
    dropped: int  # QoS 0 messages dropped to make room (possibly the offered one)
    overflow: bool  # still over the limits with only QoS 1/2 waiting: disconnect the slow consumer


TAKEN = Offered(0, False)


class OutboundQueue:
    """The messages held for one live session; counts and bytes cover waiting and in-flight ones.

    A reconnecting session's backlog (its offline queue and its unacknowledged messages) is already
    bounded by the offline limits; it is held on top of the live limits, never counted against them,
    or a full offline queue would make every reconnect an overflow (and the client reconnect forever).
    """

    def __init__(self, limits: OutboundLimits) -> None:
        self.limits = limits
        self.waiting: deque[Outgoing] = deque()
        self.inflight = 0
        self.held_messages = 0
        self.held_bytes = 0
        self.backlog_messages = 0
        self.backlog_bytes = 0
        self._waiting_qos0 = 0  # waiting QoS 0 messages that may be dropped: live ones, not backlog
        self._retained_waiting: set[str] = set()  # topics of retained messages offered for a subscription, not sent

    def offer_backlog(self, item: Outgoing, *, first: bool = False) -> None:
        """Take a message carried over from before this connection; no limit applies (see the class)."""
        item.backlog = True
        if first:
            self.waiting.appendleft(item)
        else:
            self.waiting.append(item)
        self._held(item, +1)  # never dropped, so not among the droppable QoS 0 messages (_waiting_qos0)

    def offer_retained(self, item: Outgoing) -> bool:
        """A retained message for a new subscription, as backlog, unless one of its topic is still waiting:
        the session gets it once. Without this, each SUBSCRIBE again queued a copy of every matching retained
        message behind a client that did not acknowledge (an outside attack: 300 SUBSCRIBEs of '#' to 7,000
        retained messages held 2.1M copies, +380 MB). So the waiting retained messages of a session are at
        most the retained store's topics. False when not taken."""
        if item.topic in self._retained_waiting:
            return False
        item.retain = True
        self._retained_waiting.add(item.topic)
        self.offer_backlog(item)
        return True

    def retained_waiting(self, topic: str) -> bool:
        return topic in self._retained_waiting

    def offer(self, item: Outgoing) -> Offered:
        """Take a message; make room by dropping the oldest waiting QoS 0 messages; say if that was not enough."""
        self.waiting.append(item)
        self._held(item, +1)
        if not item.qos:
            self._waiting_qos0 += 1
        if not self._over():
            return TAKEN  # the common case, per delivery: no new (frozen, so slow to make) Offered
        dropped = 0
        while self._over() and self._waiting_qos0:
            self._drop_oldest_qos0()
            dropped += 1
        return Offered(dropped, self._over())

    def next_to_send(self) -> Outgoing | None:
        """The next waiting message that may go now (QoS 1/2 only while in-flight room is left), or None."""
        if not self.waiting:
            return None
        head = self.waiting[0]
        if head.qos and self.inflight >= self.limits.inflight_messages:
            return None
        self.waiting.popleft()
        if head.retain:
            self._retained_waiting.discard(head.topic)
        if head.qos:
            self.inflight += 1
        elif not head.backlog:
            self._waiting_qos0 -= 1
        return head

    def sent(self, item: Outgoing) -> None:
        """A QoS 0 message was written, or a QoS 1/2 one completed its flow: it is no longer held."""
        if item.qos:
            self.inflight -= 1
        self._held(item, -1)

    def drain(self) -> list[Outgoing]:
        """Everything still waiting, oldest first, and empty the queue (the connection is going away)."""
        items = list(self.waiting)
        for item in items:
            self._held(item, -1)
        self.waiting.clear()
        self._waiting_qos0 = 0
        self._retained_waiting.clear()
        return items

    def _over(self) -> bool:
        return (self.held_messages - self.backlog_messages > self.limits.queue_messages
                or self.held_bytes - self.backlog_bytes > self.limits.queue_bytes)

    def _held(self, item: Outgoing, sign: int) -> None:
        self.held_messages += sign
        self.held_bytes += sign * item.size
        if item.backlog:
            self.backlog_messages += sign
            self.backlog_bytes += sign * item.size

    def _drop_oldest_qos0(self) -> None:
        for index, item in enumerate(self.waiting):
            if not item.qos and not item.backlog:
                del self.waiting[index]
                self._waiting_qos0 -= 1
                self._held(item, -1)
                return
