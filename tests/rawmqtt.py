"""A deliberately minimal MQTT 3.1.1 client on a raw TLS socket, for attacks a well-behaved client will not make.

paho reconnects by itself and follows the protocol; an attacker's old connection
does neither: it stays open after being superseded and keeps sending.
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

from tests.support import WAIT, Credentials


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _remaining_length(len(body)) + body


def connect_packet(client_id: str, clean: bool = True, keepalive: int = 60,
                   will: tuple[str, bytes, int, bool] | None = None, level: int = 4) -> bytes:
    flags = 0x02 if clean else 0x00
    payload = _string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _string(topic) + _string(message)
    return packet(0x10, _string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive) + payload)


def publish_packet(topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1) -> bytes:
    header = _string(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return packet(0x30 | (qos << 1), header + payload)


def subscribe_packet(filters: list[tuple[str | bytes, int]], packet_id: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + b"".join(_string(f) + bytes([q]) for f, q in filters))


PINGREQ = b"\xc0\x00"


class RawClient:
    def __init__(self, port: int, creds: Credentials, ca_file: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(creds.cert), str(creds.key))
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")

    def connect(self, client_id: str, clean: bool = True, keepalive: int = 60,
                will: tuple[str, bytes, int, bool] | None = None) -> int:
        """Send CONNECT; the CONNACK return code."""
        self.sock.sendall(connect_packet(client_id, clean, keepalive, will))
        connack = self._read_exactly(4)
        assert connack[0] == 0x20, connack
        return connack[3]

    def send(self, data: bytes) -> bool:
        """Send raw bytes; False when the broker has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def read_packet(self, timeout: float = WAIT) -> bytes:
        """The next whole packet the broker sends (fixed header included)."""
        self.sock.settimeout(timeout)
        first = self._read_exactly(1)
        length, multiplier, header = 0, 1, bytearray(first)
        while True:
            byte = self._read_exactly(1)[0]
            header.append(byte)
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        return bytes(header) + (self._read_exactly(length) if length else b"")

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed or hostile peer does."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass

    def publish(self, topic: str | bytes, payload: bytes) -> bool:
        """Send a QoS 0 PUBLISH; False when the broker has closed the connection."""
        try:
            self.sock.sendall(publish_packet(topic, payload))
        except OSError:
            return False
        return True

    def closed_by_peer(self, timeout: float = WAIT) -> bool:
        """True when the broker closes the connection within the bound (anything it sends first is read and dropped)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            return True

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed before a complete packet")
            data += chunk
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
