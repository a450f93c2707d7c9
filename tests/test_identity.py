"""Identity from certificates (pure): SPIFFE URI SAN or CN, validity window, trust domain, safe ids."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from pdp import pki
from pdp.core.identity import (
    IdentityRefused,
    IdentitySettings,
    derive_identity,
    identity_from_der,
    read_certificate,
)

NOW = datetime.now(timezone.utc)
CA = pki.make_ca("unit CA")
SETTINGS = IdentitySettings(trust_domain="t.example")


def der(issued: pki.Issued) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return issued.cert.public_bytes(Encoding.DER)


def test_spiffe_identity_and_evidence_fields() -> None:
    issued = pki.issue_device(CA, "dev-1", "t.example")
    identity = identity_from_der(der(issued), SETTINGS, NOW)
    assert identity.device_id == "dev-1"
    assert identity.certificate.fingerprint_sha256 == pki.fingerprint(issued)
    assert identity.certificate.serial == format(issued.cert.serial_number, "x")
    assert identity.certificate.issuer == "CN=unit CA"


@pytest.mark.parametrize(
    ("at", "reason"),
    [(NOW + timedelta(days=40), "certificate expired"), (NOW - timedelta(days=1), "certificate not yet valid")],
)
def test_validity_window(at: datetime, reason: str) -> None:
    cert = read_certificate(der(pki.issue_device(CA, "dev-1", "t.example", days=30)))
    with pytest.raises(IdentityRefused, match=reason):
        derive_identity(cert, SETTINGS, at)


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "no SPIFFE URI SAN"),
        (["https://t.example/device/x"], "no SPIFFE URI SAN"),
        (["spiffe://evil.example/device/x"], "foreign trust domain evil.example"),
        (["spiffe://t.example/workload/x"], "path is not /device/"),
        (["spiffe://t.example/device/a", "spiffe://t.example/device/b"], "several device identities"),
        (["spiffe://t.example/device/a+b"], "contains '+'"),
    ],
)
def test_refused_uris(uris: list[str], reason: str) -> None:
    with pytest.raises(IdentityRefused, match=re.escape(reason)):
        identity_from_der(der(pki.issue_device(CA, "x", uris=uris)), SETTINGS, NOW)


def test_common_name_source() -> None:
    issued = pki.issue_device(CA, "x", uris=[], common_name="dev-cn")
    assert identity_from_der(der(issued), IdentitySettings(source="cn"), NOW).device_id == "dev-cn"


def test_no_or_malformed_certificate() -> None:
    with pytest.raises(IdentityRefused, match="no client certificate"):
        identity_from_der(None, SETTINGS, NOW)
    with pytest.raises(IdentityRefused, match="malformed certificate"):
        identity_from_der(b"\x30\x03garbage", SETTINGS, NOW)
