"""The framing guard on a real asyncio stream, without a socket: acknowledgements taken for the connection's
sender, packets waited for in place, deadlines kept, nothing lost to a cancelled read."""

from __future__ import annotations

import asyncio

import pytest

from broker_plugin.amqtt_compat import StreamReaderAdapter
from broker_plugin.framing import ACKS_PER_TURN, FramingGuard

PINGREQ = b"\xc0\x00"


def publish(topic: str, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    return bytes((0x30, len(body))) + body


def make_guard(stream: asyncio.StreamReader, ended: list[str], *, packet_timeout: float = 5.0) -> FramingGuard:
    guard = FramingGuard(StreamReaderAdapter(stream), max_packet_size=1024, connect_timeout=5.0,
                         packet_timeout=packet_timeout, on_end=ended.append)
    guard.connected = True  # past CONNECT
    return guard


def test_acknowledgements_the_sender_takes_never_reach_amqtt() -> None:
    async def scenario() -> None:
        stream, ended, offered = asyncio.StreamReader(), [], []
        guard = make_guard(stream, ended)
        guard.on_ack = lambda kind, packet_id: offered.append((kind, packet_id)) or packet_id != 2
        stream.feed_data(b"\x40\x02\x00\x01" + b"\x50\x02\x00\x02" + b"\x70\x02\x01\x03" + PINGREQ)
        assert await guard.read(-1) == b"\x50\x02\x00\x02"  # not taken (no flow waits for it): amqtt's, as before
        assert await guard.read(-1) == PINGREQ
        assert offered == [(4, 1), (5, 2), (7, 259)]
        assert ended == []

    asyncio.run(scenario())


def test_a_flood_of_taken_acknowledgements_still_lets_the_loop_turn() -> None:
    async def scenario() -> None:
        stream, ended = asyncio.StreamReader(), []
        guard = make_guard(stream, ended)
        guard.on_ack = lambda kind, packet_id: True
        turns = 0

        async def other_work() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.ensure_future(other_work())
        await asyncio.sleep(0)
        before = turns
        stream.feed_data(b"".join(b"\x40\x02" + (i % 65535 + 1).to_bytes(2, "big") for i in range(3200)) + PINGREQ)
        assert await guard.read(-1) == PINGREQ
        other.cancel()
        assert turns - before >= 3200 // ACKS_PER_TURN - 1

    asyncio.run(scenario())


def test_a_packet_waited_for_in_place_arrives_whole_in_pieces_and_after_a_cancelled_read() -> None:
    async def scenario() -> None:
        stream, ended = asyncio.StreamReader(), []
        guard = make_guard(stream, ended)
        first = asyncio.ensure_future(guard.read(-1))
        await asyncio.sleep(0.05)
        first.cancel()  # amqtt's reader cancelled while waiting: nothing was consumed
        with pytest.raises(asyncio.CancelledError):
            await first
        packet = publish("a/b", b"payload")
        reading = asyncio.ensure_future(guard.read(-1))
        for i in range(len(packet)):  # one byte at a time
            await asyncio.sleep(0.01)
            stream.feed_data(packet[i:i + 1])
        assert await asyncio.wait_for(reading, 5) == packet
        stream.feed_data(PINGREQ)
        assert await guard.read(-1) == PINGREQ
        assert ended == []

    asyncio.run(scenario())


def test_keep_alive_and_packet_deadlines_hold_while_waiting_in_place() -> None:
    async def scenario() -> None:
        stream, ended = asyncio.StreamReader(), []
        guard = make_guard(stream, ended)
        guard.idle_limit = 0.2
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(guard.read(-1), 5)
        assert ended and ended[0].startswith("keep-alive expired")

        stream, ended = asyncio.StreamReader(), []
        guard = make_guard(stream, ended, packet_timeout=0.2)
        stream.feed_data(publish("a/b", b"payload")[:4])  # a packet that starts and never ends
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(guard.read(-1), 5)
        assert ended and ended[0].startswith("packet not complete")

    asyncio.run(scenario())


def test_end_of_stream_while_waiting_in_place_is_end_of_stream_for_amqtt() -> None:
    async def scenario() -> None:
        stream, ended = asyncio.StreamReader(), []
        guard = make_guard(stream, ended)
        reading = asyncio.ensure_future(guard.read(-1))
        await asyncio.sleep(0.02)
        stream.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(reading, 5)
        assert ended == []  # the client's own end, not the guard's

    asyncio.run(scenario())


def test_a_reset_while_waiting_in_place_settles_first_and_is_end_of_stream_for_amqtt() -> None:
    """As on the task path: the packets before the end take effect first (``settle``), and amqtt sees an
    end of stream, not the reset (an outside attack found the reset passed straight through)."""
    async def scenario() -> None:
        stream, ended, settled = asyncio.StreamReader(), [], []
        guard = make_guard(stream, ended)

        async def settle() -> None:
            settled.append(True)

        guard.settle = settle
        reading = asyncio.ensure_future(guard.read(-1))
        await asyncio.sleep(0.02)
        stream.set_exception(ConnectionResetError("reset by peer"))
        with pytest.raises(asyncio.IncompleteReadError):
            await asyncio.wait_for(reading, 5)
        assert settled == [True]

    asyncio.run(scenario())
