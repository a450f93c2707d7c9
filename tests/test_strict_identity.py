"""Strict device identities over real TLS (issue 10, item C); the pure rules are in tests/test_identity.py.

Certificates the broker's CA signed but that must not be device identities (a CA
certificate, extra or mis-cased URI SANs) get CONNACK 5 with the reason logged;
certificates TLS itself refuses are each logged once, with peer and reason.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from pdp import pki
from tests.support import TRUST_DOMAIN, WAIT, Credentials, TestPki, wait_for


@pytest.fixture
def broker_settings():
    return {"connect_timeout": 1.0}


def control(connect) -> None:
    """Positive control: a certificate issued the ordinary way is admitted and exchanges a message."""
    sensor = connect("sensor-1")
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
    connect("dash-1").publish("sites/plant-a/sensor-1/cmd", b"c")
    assert sensor.next_message().payload == b"c"


@pytest.mark.parametrize(
    ("name", "kwargs", "reason"),
    [
        ("ca-true", {"is_ca": True}, "certificate is a CA certificate (basic constraints CA:TRUE), not a device certificate"),
        ("extra-https", {"uris": [pki.spiffe_id(TRUST_DOMAIN, "sensor-1"), "https://evil.example/x"]},
         "URI SAN 'https://evil.example/x' beside the device's SPIFFE id: exactly one URI SAN is accepted"),
        ("extra-foreign", {"uris": [pki.spiffe_id(TRUST_DOMAIN, "sensor-1"), pki.spiffe_id("evil.example", "sensor-1")]},
         "URI SAN 'spiffe://evil.example/device/sensor-1' beside the device's SPIFFE id: exactly one URI SAN is accepted"),
        ("upper-scheme", {"uris": [f"SPIFFE://{TRUST_DOMAIN}/device/sensor-1"]},
         f"SPIFFE id 'SPIFFE://{TRUST_DOMAIN}/device/sensor-1' is not in lower case (scheme and trust domain must be)"),
        ("upper-domain", {"uris": [f"spiffe://{TRUST_DOMAIN.upper()}/device/sensor-1"]},
         f"SPIFFE id 'spiffe://{TRUST_DOMAIN.upper()}/device/sensor-1' is not in lower case (scheme and trust domain must be)"),
    ],
)
def test_certificates_of_our_ca_that_are_not_device_identities_are_refused(connect, test_pki, refused_reason,
                                                                          name, kwargs, reason):
    creds = test_pki.save(f"strict-{name}", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN, **kwargs))
    connect("sensor-1", creds=creds, expect=5)
    assert refused_reason("sensor-1") == reason
    control(connect)


# -- TLS-level refusals: each logged once, with the peer and the reason -----------------------------


def tls_attempt(port: int, ca_file: Path, creds: Credentials | None) -> int:
    """One TLS connection presenting ``creds``; returns the client's local port (the peer the broker logs)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if creds is not None:
        context.load_cert_chain(str(creds.cert), str(creds.key))
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    local_port = raw.getsockname()[1]
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.recv(1)  # TLS 1.3: the server judges the client certificate after the client's side is done
    except (ssl.SSLError, OSError):
        pass
    finally:
        raw.close()
    return local_port


def write(tmp_path: Path, name: str, issued: pki.Issued) -> Credentials:
    creds = Credentials(tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem", pki.fingerprint(issued))
    issued.write(creds.cert, creds.key)
    return creds


def refused_certificates(tmp_path: Path, test_pki: TestPki) -> dict[str, tuple[Credentials | None, str]]:
    """Certificates a TLS listener must refuse, each with the reason OpenSSL gives (and no certificate)."""
    now = datetime.now(UTC)
    ca = test_pki.ca
    return {
        "expired": (write(tmp_path, "expired", pki.issue_device(
            ca, "sensor-1", TRUST_DOMAIN, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))),
            "certificate has expired"),
        "not-yet-valid": (write(tmp_path, "future", pki.issue_device(
            ca, "sensor-1", TRUST_DOMAIN, not_before=now + timedelta(days=1), not_after=now + timedelta(days=9))),
            "certificate is not yet valid"),
        "wrong-key-usage": (write(tmp_path, "server-eku", pki.issue_device(
            ca, "sensor-1", TRUST_DOMAIN, usage=ExtendedKeyUsageOID.SERVER_AUTH)), "unsuitable certificate purpose"),
        "foreign-ca": (write(tmp_path, "rogue", pki.issue_device(pki.make_ca("rogue CA"), "sensor-1", TRUST_DOMAIN)),
                       "unable to get local issuer certificate"),
        "self-signed": (write(tmp_path, "self", pki.make_ca("sensor-1")), "self-signed certificate"),
        "none": (None, "peer did not return a certificate"),
    }


def test_every_tls_refusal_is_logged_once_with_peer_and_reason(broker, connect, test_pki, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.broker")
    cases = refused_certificates(tmp_path, test_pki)
    ports = {name: tls_attempt(broker.port, test_pki.ca_file, creds) for name, (creds, _) in cases.items()}

    def lines(port: int) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if re.search(rf"^TLS handshake refused: peer 127\.0\.0\.1:{port} reason=", r.getMessage())]

    wait_for(lambda: all(lines(port) for port in ports.values()), "every refusal logged")
    for name, (_, reason) in cases.items():
        [line] = lines(ports[name])  # once
        assert reason in line, (name, line)
    assert broker.run(lambda: broker.broker.tls_refused) == len(cases)
    control(connect)  # the same listener admits a good certificate


def test_a_connection_that_never_starts_tls_is_closed_and_logged(broker, connect, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.broker")
    with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as sock:
        port = sock.getsockname()[1]
        assert sock.recv(1) == b""  # closed by the broker after connect_timeout
    wait_for(lambda: any(f"peer 127.0.0.1:{port} reason=no TLS handshake within connect_timeout" in r.getMessage()
                         for r in caplog.records), "the refusal logged")
    control(connect)
