"""The certificate a client presented in a TLS handshake that failed, for the refusal's record.

Python's ``ssl`` (3.11) gives no access to the peer's certificate unless the handshake
succeeded, yet the refusals worth recording are exactly the failed ones (expired,
foreign CA, wrong key usage). OpenSSL's message callback sees every handshake message,
the client's Certificate message included (decrypted, in TLS 1.3 too), so the first
certificate of that message is kept on the connection's ``SSLObject``; when the
handshake then fails, ``do_handshake`` attaches it to the exception that asyncio's
``start_tls`` raises. The callback runs for every TLS record during the handshake only:
once it is done the connection moves to a context without it.
"""

from __future__ import annotations

import ssl
from typing import Any

_HANDSHAKE = 22  # TLS content type
_CERTIFICATE = 11  # handshake message type
_TLS13 = 0x0304


def first_certificate(message: bytes, version: int) -> bytes | None:
    """The first DER certificate of a Certificate handshake message (with its 4-byte header), or None."""
    body = message[4:]
    for tls13 in ((True, False) if version == _TLS13 else (False, True)):
        pos = 0
        if tls13:  # certificate_request_context<0..255>
            if not body:
                continue
            pos = 1 + body[0]
        if len(body) < pos + 6:
            continue
        total = int.from_bytes(body[pos:pos + 3], "big")
        if total == 0 or pos + 3 + total != len(body):
            continue
        size = int.from_bytes(body[pos + 3:pos + 6], "big")
        der = body[pos + 6:pos + 6 + size]
        if size and len(der) == size and der[:1] == b"\x30":
            return bytes(der)
    return None


def _on_message(conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes) -> None:
    if content_type == _HANDSHAKE and msg_type == _CERTIFICATE and direction == "read":
        try:
            conn.presented_certificate = first_certificate(data, version)
        except Exception:  # noqa: BLE001 - never let evidence capture break a handshake
            pass


class CapturingSSLObject(ssl.SSLObject):
    presented_certificate: bytes | None = None
    after_handshake: ssl.SSLContext | None = None  # the same configuration without the message callback

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            exc.presented_certificate = self.presented_certificate  # type: ignore[attr-defined]
            raise
        if self.after_handshake is not None:
            # Done with the handshake: a context without the callback (CPython then removes it from this
            # connection), so records of established connections cost nothing extra.
            self.context = self.after_handshake


def install(context: ssl.SSLContext, after_handshake: ssl.SSLContext | None = None) -> None:
    """Keep the certificate a client presents, on the SSLObjects of this (server) context. With
    ``after_handshake`` (configured like ``context``), connections move to it once their handshake is done."""
    context.sslobject_class = type("CapturingSSLObject", (CapturingSSLObject,), {"after_handshake": after_handshake})
    # The C-level setter: ssl.SSLContext's own wraps each call in enum conversions, several times dearer.
    ssl._ssl._SSLContext._msg_callback.__set__(context, _on_message)  # type: ignore[attr-defined]


def presented_certificate(exc: BaseException) -> bytes | None:
    return getattr(exc, "presented_certificate", None)
