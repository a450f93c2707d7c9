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


def connect_packet(client_id: str, clean: bool = True, keepalive: int = 60) -> bytes:
    flags = 0x02 if clean else 0x00
    return packet(0x10, _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _string(client_id))


def publish_packet(topic: str | bytes, payload: bytes) -> bytes:
    return packet(0x30, _string(topic) + payload)


class RawClient:
    def __init__(self, port: int, creds: Credentials, ca_file: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(str(creds.cert), str(creds.key))
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")

    def connect(self, client_id: str, clean: bool = True) -> int:
        """Send CONNECT; the CONNACK return code."""
        self.sock.sendall(connect_packet(client_id, clean))
        connack = self._read_exactly(4)
        assert connack[0] == 0x20, connack
        return connack[3]

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
