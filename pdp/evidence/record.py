"""Identity assertion records and their hash: what one decision leaves as evidence, and how it is chained.

Each record's hash covers every other field, the previous record's hash
included, so altering, removing or reordering a record shows when the
chain is walked again (``pdp.evidence.store``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # types only: the log CLI imports this module and should not load the core and its crypto
    from pdp.core.admission import Admission
    from pdp.core.engine import Decision

log = logging.getLogger("mqtt_pdp.assertions")

GENESIS = "0" * 64


class AssertionRecord(NamedTuple):
    """A tuple, so that batches go to SQLite and JSON without per-field copying."""

    record_id: str
    node: str
    seq: int
    ts: float  # seconds since the epoch, UTC
    client_id: str | None
    device_id: str | None
    fingerprint: str | None
    serial: str | None
    issuer: str | None
    type: str | None
    location: str | None
    purpose: str | None
    owner: str | None
    status: str | None
    action: str  # connect | publish | subscribe | receive
    topic: str | None
    decision: str  # allow | deny
    rule_id: str | None
    reason: str
    policy_revision: str | None
    cache_tier: str | None  # l1 | index; None for connects
    latency_us: float | None
    peer: str | None
    prev_hash: str
    hash: str

    @property
    def timestamp(self) -> str:
        return datetime.fromtimestamp(self.ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")

    def to_json_dict(self) -> dict[str, Any]:
        data = self._asdict()
        data["timestamp"] = self.timestamp
        return data


FIELD_NAMES: tuple[str, ...] = AssertionRecord._fields


def _canonical(value: Any) -> str:
    if value is None:
        return "\x00"
    if type(value) is float:
        return repr(value)
    return str(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def chain_hash(values: Sequence[Any]) -> str:
    """SHA-256 over every field but the hash itself (the previous hash included), in record order."""
    return _digest("\x1f".join(map(_canonical, values)))


def record_hash(record: AssertionRecord) -> str:
    return chain_hash(record[:-1])


class Sink(Protocol):
    """Where records go. ``write`` either stores the whole batch or raises; it may be retried with the same records.

    ``batch_id`` names the broker's batch the records came from; a sink that can store it
    atomically with the records (SQLite) does, so that a restarted writer knows the batch was applied.
    """

    name: str

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None) -> None: ...

    def close(self) -> None: ...


class SinkError(Exception):
    pass


class Head(NamedTuple):
    """Where a node's chain ends in one place (a store, a spool, the head file), and which batch put it there."""

    seq: int
    hash: str
    batch_id: str | None = None
    source: str = ""


# What the per-message path captures: no formatting, no hashing, just references.
Peer = str | None  # "address:port", formatted once per session by the caller
Captured = tuple[float, "Admission | None", str | None, Peer, str, str | None, "Decision", str | None, int, str | None]
# What crosses to the writer: the session's identity fields by key, the rest per record.
# (ts, session key, client id, peer, action, topic, allowed, rule id, reason, tier, latency ns, policy revision)
Row = tuple[float, int, str | None, Peer, str, str | None, bool, str | None, str, str | None, int, str | None]
SessionFields = tuple[Any, ...]  # device_id, fingerprint, serial, issuer, type, location, purpose, owner, status


def session_fields(admission: Admission | None) -> SessionFields:
    identity = admission.identity if admission else None
    cert = identity.certificate if identity else (admission.certificate if admission else None)
    device = admission.device if admission else None
    return (
        device.device_id if device else (identity.device_id if identity else None),
        cert.fingerprint_sha256 if cert else None, cert.serial if cert else None, cert.issuer if cert else None,
        device.type if device else None, device.location if device else None,
        device.purpose if device else None, device.owner if device else None, device.status if device else None,
    )


