"""The weekly governance reports: identities that outlive their purpose, shown as findings.

Pure: each report takes the registry's devices, the facts read from the assertion
log (``LogFacts``) and the time, and returns its findings as rows (dicts), most
urgent first. Reading the log is ``pdp.governance.facts``; printing and exit
codes are ``pdp.cli.report_commands``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pdp.registry.device import Device


@dataclass(frozen=True)
class Sighting:
    """The newest admitted connect of a device, as the log has it."""

    ts: float
    fingerprint: str | None
    serial: str | None
    issuer: str | None


@dataclass(frozen=True)
class CertificateUse:
    """Everything the log says about one certificate over the period."""

    fingerprint: str
    devices: frozenset[str]
    client_ids: frozenset[str]
    hosts: frozenset[str]
    connects: int
    last_ts: float
    shared_records: int = 0  # shared-certificate records the brokers wrote
    shared_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogFacts:
    last_seen: Mapping[str, Sighting] = field(default_factory=dict)  # device id -> newest admitted connect
    certificates: Mapping[str, CertificateUse] = field(default_factory=dict)  # fingerprint -> its use


def iso(ts: float | datetime | None) -> str | None:
    if ts is None:
        return None
    moment = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def expiring(devices: Iterable[Device], facts: LogFacts, now: datetime, days: float) -> list[dict[str, Any]]:
    """Bound certificates whose notAfter (read by bind-cert) falls within ``days``, already expired included,
    with when the device last presented each; devices not retired."""
    horizon = now + timedelta(days=days)
    rows = []
    for device in devices:
        if device.status == "retired":
            continue
        for binding in device.bindings:
            if binding.expires is None or binding.expires > horizon:
                continue
            seen = facts.certificates.get(binding.fingerprint)
            rows.append({
                "device_id": device.device_id, "owner": device.owner, "status": device.status,
                "fingerprint": binding.fingerprint, "serial": binding.serial, "issuer": binding.issuer,
                "expires": iso(binding.expires), "days_left": round((binding.expires - now).total_seconds() / 86400, 1),
                "last_seen": iso(seen.last_ts) if seen else None,
            })
    return sorted(rows, key=lambda r: (r["days_left"], r["device_id"]))


def unseen(devices: Iterable[Device], facts: LogFacts, now: datetime, days: float) -> list[dict[str, Any]]:
    """Active devices never seen, or not seen for ``days``: an identity nobody uses is one to retire."""
    cutoff = (now - timedelta(days=days)).timestamp()
    rows = []
    for device in devices:
        if device.status != "active":
            continue
        seen = facts.last_seen.get(device.device_id)
        if seen is not None and seen.ts >= cutoff:
            continue
        rows.append({"device_id": device.device_id, "owner": device.owner, "type": device.type,
                     "location": device.location, "last_seen": iso(seen.ts) if seen else None,
                     "days_unseen": round((now.timestamp() - seen.ts) / 86400, 1) if seen else None})
    return sorted(rows, key=lambda r: (r["last_seen"] is not None, r["last_seen"] or "", r["device_id"]))


def unbound(devices: Iterable[Device], facts: LogFacts, now: datetime) -> list[dict[str, Any]]:
    """Active devices with no certificate bound: any certificate the CA issues for their id admits them.

    A binding whose window has closed does not count."""
    rows = []
    for device in devices:
        if device.status != "active":
            continue
        if any(not device.binding_closed(fp, now) for fp in device.fingerprints):
            continue
        seen = facts.last_seen.get(device.device_id)
        rows.append({"device_id": device.device_id, "owner": device.owner, "type": device.type,
                     "last_fingerprint": seen.fingerprint if seen else None,
                     "last_seen": iso(seen.ts) if seen else None})
    return sorted(rows, key=lambda r: r["device_id"])


def shared(facts: LogFacts) -> list[dict[str, Any]]:
    """Certificates on more than one connection at a time or address in a window (the brokers' shared-certificate
    records), or admitted for more than one device or client id over the period."""
    rows = []
    for use in facts.certificates.values():
        if not use.shared_records and len(use.devices) <= 1 and len(use.client_ids) <= 1:
            continue
        rows.append({"fingerprint": use.fingerprint, "devices": sorted(use.devices),
                     "client_ids": sorted(use.client_ids), "addresses": sorted(use.hosts),
                     "shared_records": use.shared_records, "connects": use.connects, "last_seen": iso(use.last_ts),
                     "example": use.shared_reasons[0] if use.shared_reasons else None})
    return sorted(rows, key=lambda r: (-r["shared_records"], -len(r["client_ids"]), r["fingerprint"]))


def untrusted(devices: Iterable[Device], facts: LogFacts, trusted_issuers: frozenset[str]) -> list[dict[str, Any]]:
    """Devices (not retired) whose last certificate was issued by a CA no longer in the trusted set: they will
    be refused at their next connect, or are still connected on a session from before the CA was dropped."""
    rows = []
    for device in devices:
        if device.status == "retired":
            continue
        seen = facts.last_seen.get(device.device_id)
        if seen is None or seen.issuer is None or seen.issuer in trusted_issuers:
            continue
        rows.append({"device_id": device.device_id, "owner": device.owner, "status": device.status,
                     "issuer": seen.issuer, "fingerprint": seen.fingerprint, "serial": seen.serial,
                     "last_seen": iso(seen.ts)})
    return sorted(rows, key=lambda r: r["device_id"])
