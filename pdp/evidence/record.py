"""Identity assertion records and their hash: what one decision leaves as evidence, and how it is chained.

Each record's hash covers every other field, the previous record's hash
included, so altering, removing or reordering a record shows when the
chain is walked again (``pdp.evidence.store``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
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
    ``body`` is the batch's rows as ``encode_batch`` wrote them; a sink may store that instead of the records
    (SQLite, indexed later), or ignore it.
    """

    name: str

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None,
              body: bytes | None = None) -> None: ...

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


def chain_hashes(node: str, seq: int, prev: str, rows: Sequence[Row], sessions: dict[int, SessionFields]
                 ) -> list[str]:
    """The hash of each record of a batch as it chains after ``(seq, prev)``, without building the records.

    What the writer needs while the store keeps the batch whole (``pending``): the hash its chain ends at.
    Building the records as well cost a fifth to a quarter more (microbenchmark, 1,000-record batches);
    ``ChainedBatch`` builds them only for a sink that takes records.
    """
    canon = _canonical
    # _canonical inlined for str (as is) and None (U+0000): a bench batch has a session per record.
    texts = {key: "\x1f".join([v if v.__class__ is str else ("\x00" if v is None else canon(v)) for v in values])
             for key, values in sessions.items()}
    hashes: list[str] = []
    append = hashes.append
    sha = hashlib.sha256
    for ts, key, client_id, peer, action, topic, allowed, rule_id, reason, tier, latency_ns, revision in rows:
        seq += 1
        latency = round(latency_ns / 1000, 3) if tier else None
        # _canonical inlined for the common types (str as is, None as U+0000): a call per field was a
        # fifth of the writer's time per record. The text is the same; record_hash pins it in the tests.
        prev = sha("\x1f".join((
            f"{node}:{seq}", node, str(seq), repr(ts),
            client_id if client_id.__class__ is str else canon(client_id), texts[key], action,
            topic if topic.__class__ is str else canon(topic), _verdict(allowed),
            rule_id if rule_id.__class__ is str else canon(rule_id), reason,
            revision if revision.__class__ is str else canon(revision),
            tier if tier.__class__ is str else canon(tier),
            "\x00" if latency is None else repr(latency),
            peer if peer.__class__ is str else canon(peer), prev,
        )).encode("utf-8", "surrogatepass")).hexdigest()
        append(prev)
    return hashes


def _verdict(allowed: bool | None) -> str:
    return "allow" if allowed else ("deny" if allowed is not None else "lost")  # None: a gap record


def _records(node: str, seq: int, prev: str, rows: Sequence[Row], sessions: dict[int, SessionFields],
             hashes: Sequence[str]) -> list[AssertionRecord]:
    records = []
    make = AssertionRecord._make
    for (ts, key, client_id, peer, action, topic, allowed, rule_id, reason, tier, latency_ns, revision), digest \
            in zip(rows, hashes):
        seq += 1
        records.append(make((f"{node}:{seq}", node, seq, ts, client_id, *sessions[key], action, topic,
                             _verdict(allowed), rule_id, reason, revision, tier,
                             round(latency_ns / 1000, 3) if tier else None, peer, prev, digest)))
        prev = digest
    return records


def chained(node: str, seq: int, prev: str, rows: Sequence[Row], sessions: dict[int, SessionFields]
            ) -> list[AssertionRecord]:
    """The records of a batch as they chain after ``(seq, prev)``; their text hashed here equals ``chain_hash``.

    Deterministic: the same rows from the same head give the same records, so a batch written again after a
    crash duplicates records exactly or not at all, and a batch stored compactly (``pending``, indexed later)
    turns into exactly the records whose hashes the writer chained and signed.
    """
    return _records(node, seq, prev, rows, sessions, chain_hashes(node, seq, prev, rows, sessions))


class ChainedBatch(Sequence[AssertionRecord]):
    """A batch's records as ``chained`` gives them, built only when a sink reads past the first and last:
    a store that keeps the batch whole needs only those two, and the hashes."""

    def __init__(self, node: str, seq: int, prev: str, rows: Sequence[Row], sessions: dict[int, SessionFields]
                 ) -> None:
        if not rows:
            raise ValueError("an empty batch")
        self._args = (node, seq, prev, rows, sessions)
        self.hashes = chain_hashes(node, seq, prev, rows, sessions)
        self._built: list[AssertionRecord] | None = None

    def _one(self, index: int) -> AssertionRecord:
        node, seq, prev, rows, sessions = self._args
        before = prev if index == 0 else self.hashes[index - 1]
        return _records(node, seq + index, before, rows[index:index + 1], sessions, self.hashes[index:index + 1])[0]

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        if self._built is None and isinstance(index, int) and index in (0, -1, len(self) - 1):
            return self._one(index % len(self))
        if self._built is None:
            self._built = _records(*self._args, self.hashes)
        return self._built[index]

    def __iter__(self) -> Iterator[AssertionRecord]:
        if self._built is None:
            self._built = _records(*self._args, self.hashes)
        return iter(self._built)


def encode_batch(rows: Sequence[Row], sessions: dict[int, SessionFields]) -> bytes:
    """A batch as the store keeps it until it is indexed: JSON, never pickle (the database is not trusted
    when it is read back). orjson costs 0.06 us a record where the standard library's json costs 1.1; it
    refuses lone surrogates, which the standard library escapes."""
    import orjson

    body = [rows, [[key, fields] for key, fields in sessions.items()]]
    try:
        return orjson.dumps(body)
    except TypeError:
        import json

        return json.dumps(body, separators=(",", ":")).encode()


_ROW_TYPES: tuple[tuple[type, ...], ...] = (
    (float, int), (int,), (str, type(None)), (str, type(None)), (str,), (str, type(None)), (bool, type(None)),
    (str, type(None)), (str,), (str, type(None)), (int,), (str, type(None)),
)
_FIELD_TYPES = (str, int, type(None))


def decode_batch(body: bytes) -> tuple[list[Row], dict[int, SessionFields]]:
    """Raises ValueError on anything but a batch ``encode_batch`` wrote (the database may have been edited):
    each value of the type the writer gives it, integers within SQLite's, times finite."""
    import orjson

    try:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            import json

            data = json.loads(body)
        raw_rows, raw_sessions = data
        sessions: dict[int, SessionFields] = {}
        for key, fields in raw_sessions:
            fields = tuple(fields)
            if type(key) is not int or len(fields) != 9 or not all(
                    type(v) in _FIELD_TYPES and (type(v) is not int or -2**63 <= v < 2**63) for v in fields):
                raise ValueError("a session of another shape")
            sessions[key] = fields
        rows = []
        for raw in raw_rows:
            row = tuple(raw)
            if len(row) != 12 or not all(type(v) in kinds for v, kinds in zip(row, _ROW_TYPES)):
                raise ValueError("a row of another shape")
            ts, key, latency = row[0], row[1], row[10]
            if key not in sessions or not -2**63 <= latency < 2**63 or not math.isfinite(ts) or abs(ts) >= 2**53:
                raise ValueError("a row with values out of range")
            rows.append(row)
        return rows, sessions  # type: ignore[return-value]
    except (TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as exc:
        raise ValueError(f"not a stored batch: {exc}") from None
