"""The lifecycle of a device identity: which changes are allowed from which status, and what they produce.

Pure: each function takes the device as the registry has it and returns the new
device, or raises ``TransitionRefused`` with a sentence for the operator. The
CLI writes the result and records the before and after.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from pdp.core.identity import device_id_problem
from pdp.core.topics import level_value_problem
from pdp.registry.device import ATTRIBUTE_FIELDS, CertBinding, Device

MAX_BOUND = 2  # the certificate in use and its successor, during a rotation

# status -> the statuses a command may move it to; retired is final.
TRANSITIONS: dict[str, dict[str, str]] = {
    "activate": {"provisioned": "active", "suspended": "active"},
    "suspend": {"active": "suspended", "provisioned": "suspended"},
    "retire": {"provisioned": "retired", "active": "retired", "suspended": "retired"},
}


class TransitionRefused(ValueError):
    """A change the device's lifecycle does not allow; the message says why and what would."""


def _live(device: Device, what: str) -> None:
    if device.status == "retired":
        raise TransitionRefused(f"device {device.device_id!r} is retired; retirement is final, so it cannot {what} "
                                "(register a new device id instead)")


def register(device_id: str, attributes: dict[str, str], status: str = "provisioned", gateway: str = "") -> Device:
    if status not in ("provisioned", "active"):
        raise TransitionRefused(f"a new device starts provisioned or active, not {status!r}")
    for name, value in {"id": device_id, **attributes}.items():
        problem = device_id_problem(value) if name == "id" else level_value_problem(value)
        if problem is not None:
            raise TransitionRefused(f"{name} {value!r} {problem}")
    missing = [name for name in ATTRIBUTE_FIELDS if not attributes.get(name)]
    if missing:
        raise TransitionRefused(f"a new device needs {', '.join(missing)}")
    if gateway and (device_id_problem(gateway) is not None or gateway == device_id):
        raise TransitionRefused(f"gateway {gateway!r} is not a valid gateway device id for {device_id!r}")
    return Device(device_id, attributes["type"], attributes["location"], attributes["purpose"], attributes["owner"],
                  status, gateway=gateway)


def change_status(device: Device, command: str) -> Device:
    """``activate``, ``suspend`` or ``retire``."""
    allowed = TRANSITIONS[command]
    if device.status == "retired":
        raise TransitionRefused(f"device {device.device_id!r} is retired; retirement is final and cannot be undone "
                                "(register a new device id instead)")
    if device.status not in allowed:
        target = {"activate": "active", "suspend": "suspended", "retire": "retired"}[command]
        if device.status == target:
            raise TransitionRefused(f"device {device.device_id!r} is already {target}")
        raise TransitionRefused(f"device {device.device_id!r} is {device.status}; {command} applies to "
                                f"{' or '.join(sorted(allowed))} devices")
    return replace(device, status=allowed[device.status])


def transfer(device: Device, owner: str) -> Device:
    _live(device, "change owner")
    problem = level_value_problem(owner)
    if problem is not None:
        raise TransitionRefused(f"owner {owner!r} {problem}")
    if owner == device.owner:
        raise TransitionRefused(f"device {device.device_id!r} is already owned by {owner!r}")
    return replace(device, owner=owner)


def bind(device: Device, binding: CertBinding, now: datetime) -> Device:
    """Add a certificate; at most ``MAX_BOUND`` (old and new during a rotation), each bound to one device."""
    _live(device, "be bound to a certificate")
    if binding.fingerprint in device.fingerprints:
        raise TransitionRefused(f"certificate {binding.fingerprint} is already bound to {device.device_id!r}")
    if binding.expires is not None and binding.expires <= now:
        raise TransitionRefused(f"certificate {binding.fingerprint} expired at {binding.expires.isoformat()}")
    if binding.not_after is not None and binding.not_after <= now:
        raise TransitionRefused(f"--not-after {binding.not_after.isoformat()} is already past")
    open_bindings = [fp for fp in device.fingerprints if not device.binding_closed(fp, now)]
    if len(open_bindings) >= MAX_BOUND:
        raise TransitionRefused(f"device {device.device_id!r} already has {len(open_bindings)} certificates bound "
                                f"(at most {MAX_BOUND}: the old and the new during a rotation); unbind one first, "
                                "or give the old one a --not-after when binding its successor")
    return replace(device, fingerprints=device.fingerprints | {binding.fingerprint},
                   bindings=(*device.bindings, binding))


def close_binding(device: Device, fingerprint: str, not_after: datetime) -> Device:
    """Give an existing binding a window end (the old certificate during a rotation)."""
    _live(device, "change a certificate binding")
    if fingerprint not in device.fingerprints:
        raise TransitionRefused(f"certificate {fingerprint} is not bound to {device.device_id!r}")
    old = device.binding(fingerprint) or CertBinding(fingerprint)
    new = replace(old, not_after=not_after)
    bindings = tuple(new if b.fingerprint == fingerprint else b for b in device.bindings)
    if device.binding(fingerprint) is None:
        bindings = (*bindings, new)
    return replace(device, bindings=bindings)


def unbind(device: Device, fingerprint: str) -> Device:
    """Remove a certificate. Not the last one of an active device: a device with no bound certificate admits
    any certificate the CA issues for its id, so unbinding it would widen, not narrow, who can connect."""
    if fingerprint not in device.fingerprints:
        raise TransitionRefused(f"certificate {fingerprint} is not bound to {device.device_id!r}")
    if device.fingerprints == {fingerprint} and device.status in ("active", "provisioned"):
        raise TransitionRefused(f"{fingerprint} is the last certificate bound to {device.device_id!r}; without it "
                                "any certificate the CA issues for this id would be accepted. Bind its successor "
                                "first, or suspend or retire the device")
    return replace(device, fingerprints=device.fingerprints - {fingerprint},
                   bindings=tuple(b for b in device.bindings if b.fingerprint != fingerprint))


def describe(device: Device | None) -> dict[str, object] | None:
    """The device as the administrative record's before/after (JSON-ready)."""
    if device is None:
        return None
    legacy = sorted(device.fingerprints - {b.fingerprint for b in device.bindings})
    return {
        "id": device.device_id, **device.attributes(), "status": device.status,
        **({"gateway": device.gateway} if device.gateway else {}),
        "certificates": [
            {"fingerprint": fp} for fp in legacy
        ] + [
            {"fingerprint": b.fingerprint, "serial": b.serial, "issuer": b.issuer,
             "expires": b.expires.isoformat() if b.expires else None,
             "not_after": b.not_after.isoformat() if b.not_after else None}
            for b in device.bindings
        ],
    }
