"""Identity from certificates (pure): SPIFFE URI SAN or CN, validity window, trust domain, safe ids."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from pdp import pki
from pdp.core.identity import (
    IdentityRefused,
    IdentitySettings,
    derive_identity,
    identity_from_der,
    read_certificate,
)

NOW = datetime.now(UTC)
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
        (["spiffe://t.example/device/sens*"], "contains '*' (the client id pattern's wildcard)"),
        # exactly one URI SAN: an extra identity is refused, not ignored
        (["spiffe://t.example/device/a", "spiffe://evil.example/device/a"],
         "URI SAN 'spiffe://evil.example/device/a' beside the device's SPIFFE id"),
        (["spiffe://t.example/device/a", "https://t.example/a"], "URI SAN 'https://t.example/a' beside"),
        (["https://t.example/a", "spiffe://t.example/device/a"], "URI SAN 'https://t.example/a' beside"),
        (["spiffe://evil.example/device/a", "spiffe://other.example/device/a"],
         "foreign trust domain evil.example, other.example"),
        # one identity, one spelling
        (["SPIFFE://t.example/device/a"], "is not in lower case"),
        (["spiffe://T.Example/device/a"], "is not in lower case"),
        (["spiffe://t.example/device/a", "Spiffe://T.EXAMPLE/device/a"], "several device identities"),
        (["spiffe://t.example/device/a?x=1"], "query part"),
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


def test_lower_case_spiffe_id_of_a_differently_written_trust_domain_setting_is_accepted() -> None:
    """The setting's spelling does not matter; the certificate's must be the canonical one."""
    issued = pki.issue_device(CA, "dev-1", "t.example")
    assert identity_from_der(der(issued), IdentitySettings(trust_domain="T.Example"), NOW).device_id == "dev-1"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"is_ca": True}, "certificate is a CA certificate (basic constraints CA:TRUE), not a device certificate"),
        ({"usage": ExtendedKeyUsageOID.SERVER_AUTH}, "extended key usage does not include clientAuth"),
        ({"usage": ExtendedKeyUsageOID.CODE_SIGNING}, "extended key usage does not include clientAuth"),
    ],
)
def test_device_certificates_are_client_auth_leaves(kwargs: dict, reason: str) -> None:
    with pytest.raises(IdentityRefused, match=re.escape(reason)):
        identity_from_der(der(pki.issue_device(CA, "dev-1", "t.example", **kwargs)), SETTINGS, NOW)


def test_a_leaf_without_extended_key_usage_is_accepted() -> None:
    issued = pki.issue_device(CA, "dev-1", "t.example", usage=None)
    cert = read_certificate(der(issued))
    assert (cert.is_ca, cert.extended_key_usage) == (False, None)
    assert derive_identity(cert, SETTINGS, NOW).device_id == "dev-1"
