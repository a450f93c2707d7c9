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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdp.core.topics import level_value_problem

IdentitySource = Literal["uri-san", "cn"]
SPIFFE_SCHEME = "spiffe://"
DEVICE_PATH = "device/"
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string


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
    is_ca: bool = False  # basic constraints CA:TRUE
    # dotted OIDs of the extended key usage extension; None when the certificate has none
    extended_key_usage: tuple[str, ...] | None = None


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
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        raise IdentityRefused(f"malformed certificate extension: {exc}") from exc
    try:
        eku: tuple[str, ...] | None = tuple(
            oid.dotted_string for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = None
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
        is_ca=is_ca,
        extended_key_usage=eku,
    )


def device_certificate_problem(cert: CertificateInfo) -> str | None:
    """Why ``cert`` cannot be a device's own certificate, or None.

    A device certificate is a leaf used for TLS client authentication. OpenSSL lets a
    CA certificate (CA:TRUE) of the trusted CA through as a client certificate, so a
    sub-CA's key would be a device identity, and any certificate it signed could
    follow; an extended key usage without clientAuth means the issuer meant the key
    for something else (a server, code signing).
    """
    if cert.is_ca:
        return "certificate is a CA certificate (basic constraints CA:TRUE), not a device certificate"
    if cert.extended_key_usage is not None and CLIENT_AUTH not in cert.extended_key_usage:
        return "certificate's extended key usage does not include clientAuth"
    return None


def _spiffe_domain(uri: str) -> str | None:
    """The trust domain of a ``spiffe://`` URI in any letter case; None for any other URI."""
    if uri[:len(SPIFFE_SCHEME)].lower() != SPIFFE_SCHEME:
        return None
    return uri[len(SPIFFE_SCHEME):].partition("/")[0]


def _device_id_from_uris(uris: tuple[str, ...], trust_domain: str) -> str:
    """The device id of the certificate's one URI SAN, which must be a SPIFFE id of ``trust_domain``.

    Exactly one URI SAN: an extra identity beside the device's (another trust domain's
    SPIFFE id, an ``https://`` URI) is an identity some other relying party would accept
    for this key, so the certificate is refused rather than the extra name ignored.
    Scheme and trust domain are recognised in any case (so ``SPIFFE://TEST.EXAMPLE``
    is seen as an attempt at ours) and then must be lower case, as the SPIFFE ID
    format requires: one identity has one spelling.
    """
    ours = trust_domain.lower()
    domains = [_spiffe_domain(uri) for uri in uris]
    if all(domain is None for domain in domains):
        raise IdentityRefused("no SPIFFE URI SAN in certificate")
    if len(uris) > 1:
        if sum(1 for d in domains if d is not None and d.lower() == ours) > 1:
            raise IdentityRefused("several device identities in certificate")
        others = [uri for uri, d in zip(uris, domains) if d is None or d.lower() != ours]
        if len(others) < len(uris):
            raise IdentityRefused(f"URI SAN {others[0]!r} beside the device's SPIFFE id: exactly one URI SAN is accepted")
        raise IdentityRefused(f"foreign trust domain {', '.join(sorted({d for d in domains if d is not None}))}")
    uri, domain = uris[0], domains[0]
    assert domain is not None
    if domain.lower() != ours:
        raise IdentityRefused(f"foreign trust domain {domain}")
    if not uri.startswith(SPIFFE_SCHEME) or domain != ours:
        raise IdentityRefused(f"SPIFFE id {uri!r} is not in lower case (scheme and trust domain must be)")
    path = uri[len(SPIFFE_SCHEME) + len(domain) + 1:]
    if not path.startswith(DEVICE_PATH):
        raise IdentityRefused(f"SPIFFE ID path is not /{DEVICE_PATH}<device-id>")
    if "?" in path:
        raise IdentityRefused("SPIFFE ID has a query part")
    return path[len(DEVICE_PATH):]


def device_id_problem(device_id: str) -> str | None:
    """Why a device id cannot be used, or None.

    An id is bound into topic patterns (so it must be a valid topic level) and into client ids, where a
    trailing '*' is the pattern's wildcard: a registered device 'sens*' could claim 'sensor-1' and take
    over its session. So '*' is refused anywhere in an id.
    """
    problem = level_value_problem(device_id)
    if problem is None and "*" in device_id:
        return "contains '*' (the client id pattern's wildcard)"
    return problem


def derive_identity(cert: CertificateInfo, settings: IdentitySettings, now: datetime) -> DeviceIdentity:
    """The device identity the certificate proves at ``now``, or IdentityRefused."""
    if now < cert.not_before:
        raise IdentityRefused("certificate not yet valid", cert)
    if now > cert.not_after:
        raise IdentityRefused("certificate expired", cert)
    problem = device_certificate_problem(cert)
    if problem is not None:
        raise IdentityRefused(problem, cert)
    try:
        if settings.source == "cn":
            if cert.common_name is None:
                raise IdentityRefused("certificate has no single subject CN")
            device_id = cert.common_name
        else:
            device_id = _device_id_from_uris(cert.uris, settings.trust_domain)
    except IdentityRefused as refused:
        raise IdentityRefused(refused.reason, cert) from None
    problem = device_id_problem(device_id)
    if problem is not None:
        raise IdentityRefused(f"invalid device id {device_id!r}: {problem}", cert)
    return DeviceIdentity(device_id=device_id, certificate=cert)


def identity_from_der(der: bytes | None, settings: IdentitySettings, now: datetime) -> DeviceIdentity:
    if not der:
        raise IdentityRefused("no client certificate")
    return derive_identity(read_certificate(der), settings, now)
