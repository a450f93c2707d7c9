"""The connect decision: who is this client, may it be connected at all, and may its will be published.

Pure: the caller passes the certificate bytes, the registry, the rules and the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from pdp.core.crl import NO_REVOCATIONS, RevocationList
from pdp.core.engine import Decision
from pdp.core.gateway import PREFIX as GATEWAY_PREFIX
from pdp.core.identity import (
    CertificateInfo,
    DeviceIdentity,
    IdentityRefused,
    IdentitySettings,
    identity_from_der,
)
from pdp.core.topics import TopicError, level_value_problem, validate_topic
from pdp.registry.device import Device, Registry

ADMITTED = "identity verified"
Decider = Callable[[Device, str, str], Decision]


class SettingsError(ValueError):
    """A configuration value that cannot work; the message names the setting."""


# A will is published by the broker after the connection is gone, outside the gateway relay's checks (is this
# the child's gateway, is the child active, may the child publish the inner topic): an outside attack had one
# gateway inject messages for another gateway's child through its will. So a will is never relayed.
WILL_NOT_RELAYED = "a will cannot be relayed for a gateway's child"


@dataclass(frozen=True)
class AdmissionSettings:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    # '{device_id}' must appear once; a trailing '*' allows any suffix, e.g. '{device_id}-*'.
    client_id_pattern: str = "{device_id}"
    # Plain-TCP clients have no certificate; only with this opt-in is the client id
    # taken as the (unverified) device id. Meant for lab use, never production.
    allow_plain_tcp: bool = False

    def __post_init__(self) -> None:
        pattern = self.client_id_pattern
        if pattern.count("{device_id}") != 1:
            raise SettingsError(f"client_id pattern {pattern!r} must contain '{{device_id}}' exactly once")
        if "*" in pattern[:-1]:
            raise SettingsError(f"client_id pattern {pattern!r}: '*' is only allowed at the end")
        if self.identity.source not in ("uri-san", "cn"):
            raise SettingsError(f"identity source {self.identity.source!r} is not 'uri-san' or 'cn'")
        if not self.identity.trust_domain or "/" in self.identity.trust_domain:
            raise SettingsError(f"trust domain {self.identity.trust_domain!r} must be a non-empty host name")


@dataclass(frozen=True)
class ConnectRequest:
    client_id: str
    certificate_der: bytes | None
    tls: bool
    will_topic: str | None = None


@dataclass(frozen=True)
class Admission:
    allowed: bool
    reason: str
    identity: DeviceIdentity | None = None
    device: Device | None = None
    rule_id: str | None = None
    certificate: CertificateInfo | None = None  # also when the certificate was refused, for the record


def client_id_permitted(pattern: str, device_id: str, client_id: str) -> bool:
    expected = pattern.replace("{device_id}", device_id)
    if expected.endswith("*"):
        return client_id.startswith(expected[:-1])
    return client_id == expected


def client_id_prefix(pattern: str, device_id: str) -> str | None:
    """What every client id of the device starts with under a ``*`` pattern; None for an exact pattern."""
    expected = pattern.replace("{device_id}", device_id)
    return expected[:-1] if expected.endswith("*") else None


def client_id_overlap(pattern: str, device_ids: Iterable[str]) -> tuple[str, str] | None:
    """Two devices whose client ids the pattern lets collide (the first could claim the second's), or None.

    With ``{device_id}-*``, device ``valve-1`` may use ``valve-1-b-main``, which is also a client id
    of ``valve-1-b``: it could take over that device's session. A collision exists exactly when one
    device's prefix is a prefix of another's; after sorting, such a pair is adjacent to a witness.
    """
    prefixes = sorted((prefix, device_id) for device_id in device_ids
                      if (prefix := client_id_prefix(pattern, device_id)) is not None)
    for (shorter, first), (longer, second) in zip(prefixes, prefixes[1:]):
        if longer.startswith(shorter):
            return first, second
    return None


BINDING_CLOSED = "certificate binding window closed"


def device_problem(device: Device | None, identity: DeviceIdentity | None, now: datetime | None = None) -> str | None:
    """Why a registered device (with this certificate) may not be connected now, or None.

    ``now`` also checks the binding's window (a rotated-out certificate); without it only the binding itself.
    """
    if device is None:
        return "unknown device"
    if device.status != "active":
        return f"device {device.status}"
    if device.fingerprints and (identity is None or identity.certificate.fingerprint_sha256 not in device.fingerprints):
        return "certificate not bound to device"
    if now is not None and identity is not None and device.binding_closed(identity.certificate.fingerprint_sha256, now):
        return BINDING_CLOSED
    return None


def admit(
    request: ConnectRequest,
    settings: AdmissionSettings,
    registry: Registry,
    decide: Decider,
    now: datetime,
    revocations: RevocationList = NO_REVOCATIONS,
) -> Admission:
    identity: DeviceIdentity | None = None
    if request.certificate_der is None and not request.tls:
        if not settings.allow_plain_tcp:
            return Admission(False, "plain TCP not allowed")
        problem = level_value_problem(request.client_id)
        if problem is not None:
            return Admission(False, f"invalid device id {request.client_id!r}: {problem}")
        device_id = request.client_id
    else:
        try:
            identity = identity_from_der(request.certificate_der, settings.identity, now)
        except IdentityRefused as refused:
            return Admission(False, refused.reason, certificate=refused.certificate)
        revoked = revocations.reason(identity.certificate)
        if revoked is not None:
            return Admission(False, revoked, identity, registry.lookup(identity.device_id))
        device_id = identity.device_id

    device = registry.lookup(device_id)
    problem = device_problem(device, identity, now)
    if problem is not None or device is None:
        return Admission(False, problem or "unknown device", identity, device)
    if not client_id_permitted(settings.client_id_pattern, device_id, request.client_id):
        return Admission(False, "client id mismatch", identity, device)
    if request.will_topic is not None:
        try:
            validate_topic(request.will_topic)
        except TopicError as exc:
            return Admission(False, f"invalid will topic: {exc}", identity, device)
        if request.will_topic.startswith("$"):
            return Admission(False, "will topic starts with '$'", identity, device)
        if request.will_topic.startswith(GATEWAY_PREFIX):
            return Admission(False, f"will topic not permitted ({WILL_NOT_RELAYED})", identity, device)
        will = decide(device, "publish", request.will_topic)
        if not will.allowed:
            return Admission(False, f"will topic not permitted ({will.reason})", identity, device, will.rule_id)
    return Admission(True, ADMITTED, identity, device)
