"""Device identity from a verified client certificate.

The identity always comes from the certificate, never from what the client
claims in CONNECT. Pure functions: the caller passes the DER bytes and the time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from pdp.core.topics import level_value_problem

IdentitySource = Literal["uri-san", "cn"]
SPIFFE_SCHEME = "spiffe://"
DEVICE_PATH = "device/"


class IdentityRefused(Exception):
    """The certificate does not establish a device identity we accept; ``reason`` says why."""

    def __init__(self, reason: str, certificate: CertificateInfo | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate


@dataclass(frozen=True)
class CertificateInfo:
    """What we record about the presented certificate, for binding and for evidence."""

    fingerprint_sha256: str
    serial: str
    issuer: str
    subject: str
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...]
    common_name: str | None


@dataclass(frozen=True)
class IdentitySettings:
    trust_domain: str = "example.org"
    source: IdentitySource = "uri-san"


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    certificate: CertificateInfo


def normalize_fingerprint(text: str) -> str:
    """Lower-case hex without separators or a ``sha256:`` prefix, so registry entries compare equal."""
    cleaned = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(cleaned) != 64 or any(ch not in "0123456789abcdef" for ch in cleaned):
        raise ValueError(f"not a SHA-256 fingerprint: {text!r}")
    return cleaned


def read_certificate(der: bytes) -> CertificateInfo:
    """Parse a DER certificate; a malformed one is refused, not raised as a crash."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, TypeError) as exc:
        raise IdentityRefused(f"malformed certificate: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    except ValueError as exc:
        raise IdentityRefused(f"malformed certificate extension: {exc}") from exc
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = cns[0].value if len(cns) == 1 else None
    return CertificateInfo(
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        serial=format(cert.serial_number, "x"),
        issuer=cert.issuer.rfc4514_string(),
        subject=cert.subject.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        uris=uris,
        common_name=common_name if isinstance(common_name, str) else None,
    )


def _device_id_from_uris(uris: tuple[str, ...], trust_domain: str) -> str:
    spiffe = [uri for uri in uris if uri.lower().startswith(SPIFFE_SCHEME)]
    if not spiffe:
        raise IdentityRefused("no SPIFFE URI SAN in certificate")
    ours: list[str] = []
    foreign: list[str] = []
    for uri in spiffe:
        rest = uri[len(SPIFFE_SCHEME):]
        domain, _, path = rest.partition("/")
        (ours if domain.lower() == trust_domain.lower() else foreign).append(path)
    if not ours:
        domains = sorted({u[len(SPIFFE_SCHEME):].partition("/")[0] for u in spiffe})
        raise IdentityRefused(f"foreign trust domain {', '.join(domains)}")
    if len(ours) > 1:
        raise IdentityRefused("several device identities in certificate")
    path = ours[0]
    if not path.startswith(DEVICE_PATH):
        raise IdentityRefused(f"SPIFFE ID path is not /{DEVICE_PATH}<device-id>")
    return path[len(DEVICE_PATH):]


def derive_identity(cert: CertificateInfo, settings: IdentitySettings, now: datetime) -> DeviceIdentity:
    """The device identity the certificate proves at ``now``, or IdentityRefused."""
    if now < cert.not_before:
        raise IdentityRefused("certificate not yet valid", cert)
    if now > cert.not_after:
        raise IdentityRefused("certificate expired", cert)
    try:
        if settings.source == "cn":
            if cert.common_name is None:
                raise IdentityRefused("certificate has no single subject CN")
            device_id = cert.common_name
        else:
            device_id = _device_id_from_uris(cert.uris, settings.trust_domain)
    except IdentityRefused as refused:
        raise IdentityRefused(refused.reason, cert) from None
    problem = level_value_problem(device_id)
    if problem is not None:
        raise IdentityRefused(f"invalid device id {device_id!r}: {problem}", cert)
    return DeviceIdentity(device_id=device_id, certificate=cert)


def identity_from_der(der: bytes | None, settings: IdentitySettings, now: datetime) -> DeviceIdentity:
    if not der:
        raise IdentityRefused("no client certificate")
    return derive_identity(read_certificate(der), settings, now)
