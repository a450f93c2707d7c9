"""Certificate revocation lists: which (issuer, serial) pairs the CA has revoked.

Pure: the caller passes the bytes of each CRL file. A CRL revokes only
certificates of its own issuer, so an entry is keyed by issuer and serial;
a certificate is revoked when its issuer's CRL lists its serial.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from pdp.core.identity import CertificateInfo
from pdp.errors import SourceError

PEM_MARKER = b"-----BEGIN X509 CRL-----"


@dataclass(frozen=True)
class RevocationList:
    revoked: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (issuer RFC 4514, serial hex)
    next_updates: tuple[tuple[str, datetime | None], ...] = ()  # (path, nextUpdate) of each CRL read
    revision: str = ""

    def reason(self, certificate: CertificateInfo) -> str | None:
        """Why the certificate may not be used (it is on its issuer's CRL), or None."""
        if (certificate.issuer, certificate.serial) in self.revoked:
            return "certificate revoked (CRL)"
        return None

    def stale(self, now: datetime) -> list[str]:
        """CRL files whose nextUpdate has passed: the CA has published (or should have) a newer one."""
        return [path for path, next_update in self.next_updates if next_update is not None and next_update < now]

    def __len__(self) -> int:
        return len(self.revoked)


NO_REVOCATIONS = RevocationList()


def _split(data: bytes, path: str) -> list[x509.CertificateRevocationList]:
    try:
        if PEM_MARKER in data:
            end = b"-----END X509 CRL-----"
            blocks = [part + end for part in data.split(end) if PEM_MARKER in part]
            return [x509.load_pem_x509_crl(block[block.index(PEM_MARKER):]) for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError as exc:
        raise SourceError(path, None, f"not a PEM or DER CRL: {exc}") from None


def parse_crls(files: Sequence[tuple[str, bytes]]) -> RevocationList:
    """Every revoked (issuer, serial) of the given CRL files; SourceError names a file that is not a CRL."""
    revoked: set[tuple[str, str]] = set()
    next_updates: list[tuple[str, datetime | None]] = []
    digest = hashlib.sha256()
    for path, data in files:
        if not data.strip():
            raise SourceError(path, None, "CRL file is empty")
        digest.update(hashlib.sha256(data).digest())
        for crl in _split(data, path):
            issuer = crl.issuer.rfc4514_string()
            revoked.update((issuer, format(entry.serial_number, "x")) for entry in crl)
            next_updates.append((path, crl.next_update_utc))
    return RevocationList(frozenset(revoked), tuple(next_updates), digest.hexdigest()[:12] if files else "")


def merge_crls(parts: Sequence[RevocationList]) -> RevocationList:
    """The CRL files read one by one (each keeps its own last good version), as one list."""
    parts = [part for part in parts if part.revision]
    if not parts:
        return NO_REVOCATIONS
    if len(parts) == 1:
        return parts[0]
    revoked: set[tuple[str, str]] = set()
    for part in parts:
        revoked |= part.revoked
    digest = hashlib.sha256("\0".join(part.revision for part in parts).encode()).hexdigest()[:12]
    return RevocationList(frozenset(revoked), tuple(u for part in parts for u in part.next_updates), digest)
