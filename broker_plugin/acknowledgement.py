"""A QoS 1 PUBLISH is acknowledged once it has been decided and routed, not when it is read.

amqtt sends the PUBACK as soon as it has queued an incoming message for routing. A
broker killed (-9) with messages in that queue had acknowledged them, so their
publishers never resent them, and they were neither decided nor recorded: the log's
gap record could not account for them (an outside test saw 1,058-2,388 per kill at
full load), and the queue itself grew without bound while publishers outran routing.
Here the PUBACK goes out after the broker has judged the message (its decision is
captured for the log, whatever it was) and handed it to the subscribers' queues; a
message still queued when the connection or the broker ends is not acknowledged, so
its publisher sends it again [MQTT-4.4.0-1]. PUBACKs keep the order of the PUBLISHes
[MQTT-4.6.0-2]: messages are routed in the order they were queued. QoS 2 is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broker_plugin.amqtt_compat import INCOMING, BrokerProtocolHandler, PubackPacket


class Owed:
    """Held in an incoming message's ``puback_packet`` slot (amqtt's messages take no other attribute) until
    the PUBACK is sent: the connection that read the PUBLISH, which alone may acknowledge it. A persistent
    session taken over mid-burst has two loops routing from its one queue for a while; acknowledging on the
    loop's own connection sent PUBACKs for the new connection's messages to the old one (a paho device's
    window then never emptied) and the old connection's packet ids to the new one (found by an outside test)."""

    __slots__ = ("handler",)

    def __init__(self, handler: BrokerProtocolHandler) -> None:
        self.handler = handler


def defer_pubacks(handler: BrokerProtocolHandler) -> None:
    """Incoming QoS 1 messages are queued for routing without their PUBACK (``acknowledge`` sends it)."""
    original = handler._handle_qos1_message_flow

    async def flow(app_message: Any) -> None:
        if app_message.direction != INCOMING or handler.session is None or app_message.puback_packet is not None:
            await original(app_message)  # outgoing, or what amqtt refuses itself
            return
        app_message.puback_packet = Owed(handler)
        await handler.session.delivered_message_queue.put(app_message)

    handler._handle_qos1_message_flow = flow  # type: ignore[method-assign]


def acknowledge(app_message: Any, batch: dict[Any, list[bytes]] | None = None) -> None:
    """The PUBACK of a routed (or refused) incoming QoS 1 message: once, on the connection that read it, and
    only while that connection lives. With ``batch``, kept there per connection for ``send_batched``."""
    owed = app_message.puback_packet
    if not isinstance(owed, Owed):
        return
    app_message.puback_packet = puback = PubackPacket.build(app_message.packet_id)
    writer = owed.handler.writer
    if batch is not None:
        batch.setdefault(writer, []).append(puback.to_bytes())
        return
    _write(writer, puback.to_bytes())


def send_batched(batch: dict[Any, list[bytes]]) -> None:
    """The PUBACKs of messages routed in one go, one write per connection (one TLS record, one send)."""
    for writer, parts in batch.items():
        _write(writer, b"".join(parts))
    batch.clear()


def _write(writer: Any, data: bytes) -> None:
    if writer is None or getattr(writer, "is_closed", False):
        return
    try:
        writer.write(data)
    except (OSError, RuntimeError):  # the connection is going away: the publisher resends on its next one
        pass


def next_delivery(handler: BrokerProtocolHandler) -> asyncio.Future[Any]:
    """The message loop's next message from the session's queue; once the session is taken over
    (``stop_routing``), a future that never completes: the new connection's loop routes the queue."""
    if getattr(handler, "_pdp_taken_over", False):
        return asyncio.get_running_loop().create_future()
    getter = asyncio.ensure_future(handler.mqtt_deliver_next_message())
    handler._pdp_getter = getter  # type: ignore[attr-defined]
    return getter


def stop_routing(handler: BrokerProtocolHandler) -> None:
    """A persistent session is taken over: its old connection's loop takes nothing more from the session's
    queue. Its getter, cancelled before the new connection queues anything, leaves in the queue what it
    may have been woken for. Two loops routing from one queue took the new connection's first message
    in the old loop and routed it after the new loop's next ones (found by an outside attack: 1-4
    takeovers in 30, PUBACKs and deliveries 40001 before 40000)."""
    handler._pdp_taken_over = True  # type: ignore[attr-defined]
    getter = getattr(handler, "_pdp_getter", None)
    if getter is not None and not getter.done():
        getter.cancel()


def taken_over(handler: BrokerProtocolHandler) -> bool:
    return bool(getattr(handler, "_pdp_taken_over", False))


def return_to_front(queue: asyncio.Queue[Any], message: Any) -> None:
    """Put a message taken from a session's routing queue back where it was, first (asyncio's queue has no
    such call: its deque and getters, as of Python 3.11-3.13)."""
    queue._queue.appendleft(message)  # type: ignore[attr-defined]
    queue._unfinished_tasks += 1  # type: ignore[attr-defined]
    queue._finished.clear()  # type: ignore[attr-defined]
    queue._wakeup_next(queue._getters)  # type: ignore[attr-defined]
