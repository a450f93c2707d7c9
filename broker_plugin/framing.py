"""A framing guard between a client's socket and amqtt's packet parser.

amqtt 0.12.1 parses packets straight off the socket and is lenient where MQTT
3.1.1 says the server MUST close the connection: an invalid UTF-8 topic becomes
the text ``"b'...'"``, a SUBSCRIBE asking for QoS 3 is granted (and every later
delivery to it fails), a packet of any declared size is read into memory, and a
client that stops sending (or stops half-way through a packet) is waited for
forever. The guard reads each packet whole first, checks it (``check_packet``,
pure), and only then lets amqtt parse it from memory; a packet that breaks the
protocol, is too large, or does not arrive in time ends the connection instead.

amqtt sees an ended connection as end of stream, so it runs its ordinary
abnormal-disconnect path (the will is published, [MQTT-3.1.2-8]).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from broker_plugin.amqtt_compat import ReaderAdapter, stream_of

log = logging.getLogger("mqtt_pdp.broker")

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
SERVER_ONLY = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
FLAGS_0010 = (PUBREL, SUBSCRIBE, UNSUBSCRIBE)  # [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1]
BODY_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
ACK_FIRST_BYTES = frozenset((PUBACK << 4, PUBREC << 4, PUBCOMP << 4))  # what FramingGuard.on_ack is offered
ACKS_PER_TURN = 32


class Malformed(Exception):
    """A packet the server must answer by closing the connection; ``str()`` is the reason, with the rule."""


class ConnectionEnded(Exception):
    """The guard ended the connection (violation, size, deadline); amqtt is shown end of stream."""


def _string(body: bytes, pos: int, what: str, *, utf8: bool = True) -> tuple[str, int]:
    """A length-prefixed field at ``pos``; strict UTF-8 without U+0000 unless it is binary data."""
    if pos + 2 > len(body):
        raise Malformed(f"{what}: length runs past the end of the packet")
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    if end > len(body):
        raise Malformed(f"{what}: runs past the end of the packet")
    if not utf8:
        return "", end
    try:
        text = body[pos + 2:end].decode("utf-8")  # strict: overlong forms and surrogates are refused
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not valid UTF-8 [MQTT-1.5.3-1]") from None
    if "\x00" in text:
        raise Malformed(f"{what} contains U+0000 [MQTT-1.5.3-2]")
    return text, end


def _packet_id(body: bytes, pos: int, kind: str) -> int:
    if pos + 2 > len(body):
        raise Malformed(f"{kind}: no packet identifier")
    if int.from_bytes(body[pos:pos + 2], "big") == 0:
        raise Malformed(f"{kind}: packet identifier 0 [MQTT-2.3.1-1]")
    return pos + 2


def _check_connect(body: bytes) -> None:
    _, pos = _string(body, 0, "protocol name")
    if pos + 4 > len(body):
        raise Malformed("CONNECT: variable header too short")
    level, flags = body[pos], body[pos + 1]
    if level != 4:
        return  # amqtt answers CONNACK 1 (unacceptable protocol version), [MQTT-3.1.2-2]
    if flags & 0x01:
        raise Malformed("CONNECT reserved flag is set [MQTT-3.1.2-3]")
    will, will_qos = bool(flags & 0x04), (flags >> 3) & 0x03
    if will_qos == 3:
        raise Malformed("CONNECT will QoS 3 [MQTT-3.1.2-14]")
    if not will and (will_qos or flags & 0x20):
        raise Malformed("CONNECT will QoS or retain set without a will [MQTT-3.1.2-13]")
    if not flags & 0x80 and flags & 0x40:
        raise Malformed("CONNECT password without user name [MQTT-3.1.2-22]")
    _, pos = _string(body, pos + 4, "client identifier")
    if will:
        _, pos = _string(body, pos, "will topic")
        _, pos = _string(body, pos, "will message", utf8=False)
    if flags & 0x80:
        _, pos = _string(body, pos, "user name")
    if flags & 0x40:
        _, pos = _string(body, pos, "password", utf8=False)
    if pos != len(body):
        raise Malformed("CONNECT: bytes after the last field")


def _check_publish(flags: int, body: bytes) -> None:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
    topic, pos = _string(body, 0, "PUBLISH topic")
    if "+" in topic or "#" in topic:
        raise Malformed(f"PUBLISH topic {topic!r} contains a wildcard [MQTT-3.3.2-2]")
    if qos:
        _packet_id(body, pos, "PUBLISH")


def _check_subscribe(body: bytes) -> None:
    pos = _packet_id(body, 0, "SUBSCRIBE")
    if pos == len(body):
        raise Malformed("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")
    while pos < len(body):
        _, pos = _string(body, pos, "SUBSCRIBE topic filter")
        if pos >= len(body):
            raise Malformed("SUBSCRIBE topic filter without requested QoS")
        if body[pos] > 2:
            raise Malformed(f"SUBSCRIBE requested QoS byte {body[pos]:#04x} [MQTT-3.8.3-4]")
        pos += 1


def _check_unsubscribe(body: bytes) -> None:
    pos = _packet_id(body, 0, "UNSUBSCRIBE")
    if pos == len(body):
        raise Malformed("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")
    while pos < len(body):
        _, pos = _string(body, pos, "UNSUBSCRIBE topic filter")


def check_packet(first_byte: int, body: bytes, *, connected: bool) -> None:
    """Raise Malformed unless a client may send this complete MQTT 3.1.1 packet in this state.

    Pure. Checks what amqtt 0.12.1 lets through although the server must close:
    order (CONNECT first and once), fixed-header flags, lengths, UTF-8 strings,
    wildcards in PUBLISH topics, QoS 3, and that each field ends where the packet does
    (so amqtt, parsing from memory, consumes exactly this packet).
    """
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind in (0, 15):
        raise Malformed(f"reserved packet type {kind} [MQTT-2.2.1]")
    if not connected and kind != CONNECT:
        raise Malformed(f"first packet is type {kind}, not CONNECT [MQTT-3.1.0-1]")
    if connected and kind == CONNECT:
        raise Malformed("second CONNECT [MQTT-3.1.0-2]")
    if kind in SERVER_ONLY:
        raise Malformed(f"{SERVER_ONLY[kind]} is sent only by servers")
    if kind != PUBLISH and flags != (0x02 if kind in FLAGS_0010 else 0):
        raise Malformed(f"packet type {kind} with reserved flags {flags:#03x} [MQTT-2.2.2-2]")
    expected = BODY_LENGTH.get(kind)
    if expected is not None and len(body) != expected:
        raise Malformed(f"packet type {kind} with remaining length {len(body)}, not {expected}")
    if kind == CONNECT:
        _check_connect(body)
    elif kind == PUBLISH:
        _check_publish(flags, body)
    elif kind == SUBSCRIBE:
        _check_subscribe(body)
    elif kind == UNSUBSCRIBE:
        _check_unsubscribe(body)


def packet_problem(first_byte: int, body: bytes, *, connected: bool) -> str | None:
    """``check_packet`` as a value: the reason the packet must close the connection, or None."""
    try:
        check_packet(first_byte, body, connected=connected)
    except Malformed as exc:
        return str(exc)
    return None


class FramingGuard(ReaderAdapter):
    """amqtt's reader for one connection: serves it only whole, checked packets, on time.

    Before CONNECT, the whole CONNECT packet must arrive within ``connect_timeout``.
    Then ``idle_limit`` (seconds, None for none) is how long the next packet may take
    to start: 1.5 times the client's keep-alive ([MQTT-3.1.2-24]); a packet that has
    started must be complete within ``packet_timeout``. Reading is
    done by a task of the guard's own, so a reader cancelled by amqtt's own timer
    never loses half a packet. ``on_end(reason)`` is called once when the guard
    ends the connection; it should drop the transport.

    Under load the next packet is usually already whole in the stream's buffer; it is then
    taken from there at once (``_take_buffered``), with no task, timer or await: what the
    deadlines guard against cannot happen to bytes that have arrived.
    """

    def __init__(self, inner: ReaderAdapter, *, max_packet_size: int, connect_timeout: float,
                 packet_timeout: float, on_end: Callable[[str], None]) -> None:
        self._inner = inner
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.packet_timeout = packet_timeout
        self.idle_limit: float | None = None
        self.connected = False
        self.ended: str | None = None  # why the guard ended the connection
        self._on_end = on_end
        self._buffer = memoryview(b"")
        self._framing: asyncio.Future[bytes | None] | None = None
        # Awaited before amqtt is handed a DISCONNECT or an end, so that the packets before it take effect
        # first (see broker_plugin.ordering); None until the broker sets it.
        self.settle: Callable[[], Awaitable[None]] | None = None
        # ``on_ack(kind, packet_id)``: offered each whole PUBACK, PUBREC and PUBCOMP first; True when it took
        # it (the connection's sender completed its flow), and amqtt never sees that packet.
        self.on_ack: Callable[[int, int], bool] | None = None
        stream = stream_of(inner)
        # asyncio.StreamReader's own buffer (CPython private, checked here; without it every packet is awaited)
        self._stream = stream if isinstance(getattr(stream, "_buffer", None), bytearray) else None
        # (and its wait for data, used in place of a task when nothing is buffered: ``_awaitable_in_place``)
        self._wait_in_place = self._stream is not None and callable(getattr(stream, "_wait_for_data", None)) \
            and all(hasattr(stream, name) for name in ("_waiter", "_eof", "_exception"))

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer:
            await self._next()
        if n < 0 or n > len(self._buffer):
            if n > len(self._buffer):  # amqtt wants more than the packet holds: check_packet missed a case
                self._end(f"packet shorter than its fields (parser asked for {n} bytes, {len(self._buffer)} left)")
                raise asyncio.IncompleteReadError(bytes(self._buffer), n)
            n = len(self._buffer)
        data, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        return data

    async def _next(self) -> None:
        """Put the next whole, checked packet for amqtt in ``_buffer``; IncompleteReadError when the
        connection ends. Acknowledgements ``on_ack`` takes are not put there: the next packet is read."""
        taken = 0
        while True:
            # One turn of the loop before each packet, as the awaited path gives, so the tasks handling the
            # previous packets progress before this one is looked at (between taken acknowledgements, which
            # start no task, one turn per ACKS_PER_TURN of them, so a flood of them cannot hold the loop).
            packet = await self._whole(taken % ACKS_PER_TURN == 0)
            if packet is None:
                return
            on_ack = self.on_ack
            if on_ack is None or len(packet) != 4 or packet[0] not in ACK_FIRST_BYTES \
                    or not on_ack(packet[0] >> 4, (packet[2] << 8) | packet[3]):
                break
            taken += 1
        if packet[0] >> 4 == DISCONNECT:
            await self._settled()
        self._buffer = memoryview(packet)

    async def _whole(self, turn: bool) -> bytes | None:
        """The next whole, checked packet; None if ``_buffer`` was filled meanwhile."""
        packet: bytes | None = None
        if self._framing is None:
            if turn:
                await asyncio.sleep(0)
                if self._buffer:
                    return None
            packet, ended = self._take()
            if packet is None and not ended and self._awaitable_in_place():
                # Nothing buffered: wait for bytes here, with no task (a cancelled wait consumes nothing), then
                # take the packet at once if it came whole, as it usually does. A task per packet and a timer per
                # byte of its header, below, were the guard's largest cost per QoS 1 delivery (an acknowledgement
                # each). A partial packet goes on below, with its deadlines from now on.
                try:
                    async with asyncio.timeout(self.idle_limit):
                        await self._stream._wait_for_data("read")  # type: ignore[union-attr]
                except TimeoutError:
                    self._end(self._idle_reason())
                    ended = True
                except ConnectionError:  # reset while waiting (the stream's exception): end of stream, as _read does
                    ended = True
                else:
                    packet, ended = self._take()
            if ended:
                await self._settled()
                raise asyncio.IncompleteReadError(b"", None)
        if packet is None:
            if self._framing is None:
                self._framing = asyncio.ensure_future(self._next_packet())
                # retrieved here even when amqtt's reader was cancelled and never asks again
                self._framing.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                packet = await asyncio.shield(self._framing)
            finally:
                if self._framing.done():
                    self._framing = None
            if packet is None:  # ended: amqtt sees end of stream
                await self._settled()
                raise asyncio.IncompleteReadError(b"", None)
        return packet

    async def _settled(self) -> None:
        if self.settle is not None:
            await self.settle()

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def _take_buffered(self) -> bytes | None:
        """The next packet if it is already whole in the stream's buffer (checked), else None.

        Anything unusual (too long a length field, a packet over the size limit, a stream error)
        is left to the awaited path, which handles it.
        """
        stream = self._stream
        if stream is None or stream._exception is not None or self.ended is not None:
            return None
        buffered = stream._buffer
        size = len(buffered)
        length, multiplier, pos = 0, 1, 1
        while True:
            if pos >= size or pos > 4:
                return None
            byte = buffered[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
        end = pos + length
        if length > self.max_packet_size or end > size:
            return None
        packet = bytes(buffered[:end])
        del buffered[:end]
        stream._maybe_resume_transport()
        try:
            check_packet(packet[0], packet[pos:], connected=self.connected)
        except Malformed as exc:
            self._end(str(exc))
            raise ConnectionEnded(str(exc)) from None
        self.connected = True
        return packet

    def _take(self) -> tuple[bytes | None, bool]:
        """``_take_buffered`` as (packet or None, whether the guard ended the connection)."""
        try:
            return self._take_buffered(), False
        except ConnectionEnded:
            return None, True

    def _idle_reason(self) -> str:
        return f"keep-alive expired: no packet within {self.idle_limit or 0:g} s [MQTT-3.1.2-24]"

    def _awaitable_in_place(self) -> bool:
        """Whether ``_whole`` may wait for the next packet's first bytes itself: a connected client, a stream
        with an empty buffer and nobody else waiting on it, not ended."""
        stream = self._stream
        return (stream is not None and self._wait_in_place and self.connected and self.ended is None
                and not stream._buffer and not stream._eof and stream._exception is None and stream._waiter is None)

    def cancel(self) -> None:
        """Stop reading (the connection is going away)."""
        if self._framing is not None and not self._framing.done():
            self._framing.cancel()

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self._on_end(reason)

    async def _read(self, n: int, deadline: float | None, what: str) -> bytes | None:
        """``n`` bytes, or None when the connection ended (deadline, end of stream). None rather than an
        exception: an exception kept in the framing future held its traceback, whose frames held the
        guard, the socket and asyncio's 256 KiB TLS buffer in a cycle until the next full collection
        (150 idle TLS connections closed at their deadline left +30-45 MB each time)."""
        try:
            if deadline is None:
                return await self._inner.read(n)
            # asyncio.timeout, not wait_for: wait_for wraps every read in a task of its own (Python 3.11),
            # several per packet, which halved single-stream throughput.
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())):
                return await self._inner.read(n)
        except TimeoutError:
            self._end(what)
        except (asyncio.IncompleteReadError, ConnectionError):  # end of stream: amqtt's ordinary path
            pass
        return None

    async def _next_packet(self) -> bytes | None:
        """The next whole, checked packet; None when the connection has ended."""
        if self.ended is not None:
            return None
        if not self.connected:
            deadline: float | None = time.monotonic() + self.connect_timeout
            idle_reason = late = f"no complete CONNECT within {self.connect_timeout:g} s"
            first = await self._read(1, deadline, idle_reason)
        else:
            idle = None if self.idle_limit is None else time.monotonic() + self.idle_limit
            first = await self._read(1, idle, self._idle_reason())
            deadline = time.monotonic() + self.packet_timeout
            late = f"packet not complete within {self.packet_timeout:g} s"
        if first is None:
            return None
        header = bytearray(first)
        length, multiplier = 0, 1
        for _ in range(4):
            byte = await self._read(1, deadline, late)
            if byte is None:
                return None
            header.append(byte[0])
            length += (byte[0] & 0x7F) * multiplier
            multiplier *= 128
            if not byte[0] & 0x80:
                break
        else:
            self._end("remaining length longer than 4 bytes [MQTT-2.2.3]")
            return None
        if length > self.max_packet_size:
            self._end(f"packet of {length} bytes exceeds max_packet_size {self.max_packet_size}")
            return None
        body = await self._read(length, deadline, late) if length else b""
        if body is None:
            return None
        problem = packet_problem(first[0], body, connected=self.connected)
        if problem is not None:
            self._end(problem)
            return None
        self.connected = True
        return bytes(header) + body
