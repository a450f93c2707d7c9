"""A development PKI: a CA, a broker certificate and device certificates with chosen ids.

For trying the broker out and for tests. Not for production: keys are written
unencrypted and nothing tracks issuance or revocation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Certificates start an hour before they are issued, as Let's Encrypt's do: a device or broker whose clock is
# behind still accepts them. (Five minutes made unit tests that judge at their module's import time flaky
# once a loaded suite reached them more than five minutes later: the certificate was "not yet valid".)
BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        cert_path.write_bytes(self.cert_pem())
        key_path.touch(mode=0o600, exist_ok=True)
        key_path.write_bytes(self.key_pem())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             not_before: datetime, not_after: datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def make_ca(common_name: str = "mqtt-pdp development CA", days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        _builder(_name(common_name), _name(common_name), key, now - BACKDATE, now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def _leaf(ca: Issued, common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier | None,
          not_before: datetime, not_after: datetime, *, is_ca: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.cert.subject, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def issue_server(ca: Issued, hostnames: tuple[str, ...] = ("localhost",), days: int = 825) -> Issued:
    now = datetime.now(timezone.utc)
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    san += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    return _leaf(ca, hostnames[0], san, ExtendedKeyUsageOID.SERVER_AUTH, now - BACKDATE, now + timedelta(days=days))


def spiffe_id(trust_domain: str, device_id: str) -> str:
    return f"spiffe://{trust_domain}/device/{device_id}"


def issue_device(
    ca: Issued,
    device_id: str,
    trust_domain: str = "example.org",
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    days: int = 30,
    uris: list[str] | None = None,
    common_name: str | None = None,
    usage: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.CLIENT_AUTH,
    is_ca: bool = False,
) -> Issued:
    """A client certificate whose URI SAN is the device's SPIFFE ID (or ``uris`` exactly, for tests).

    ``usage`` (extended key usage; None for no EKU extension) and ``is_ca`` exist so that tests can
    make the certificates a device must not be able to use."""
    now = datetime.now(timezone.utc)
    start = not_before or now - BACKDATE
    end = not_after or now + timedelta(days=days)
    names = uris if uris is not None else [spiffe_id(trust_domain, device_id)]
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in names]
    return _leaf(ca, common_name or device_id, san, usage, start, end, is_ca=is_ca)


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC private key")
    return Issued(key, cert)


def fingerprint(issued: Issued) -> str:
    return issued.cert.fingerprint(hashes.SHA256()).hex()


def make_crl(ca: Issued, revoked_serials: list[int], days: int = 7) -> x509.CertificateRevocationList:
    """A CRL of ``ca`` revoking the given serial numbers (development and tests)."""
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + timedelta(days=days))
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=1)).build()
        )
    return builder.sign(ca.key, hashes.SHA256())
