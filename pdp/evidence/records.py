"""Identity assertions: one record per decision, chained per broker so that tampering shows.

The per-message path only appends a tuple to a queue (``AssertionRecorder.decision``);
a background task turns tuples into records, extends the hash chain and hands
batches to the sinks, which spool to disk when they cannot write.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import pickle
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Protocol

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
Captured = tuple[float, Admission | None, str | None, Peer, str, str | None, Decision, str | None, int, str | None]
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


class BatchWriter(Protocol):
    """Takes batches in order; ``write`` returns once the batch is stored or spooled, or raises to be retried."""

    def write(self, rows: list[Row], sessions: dict[int, SessionFields], batch_id: str | None = None) -> int: ...

    def idle(self) -> None: ...

    def close(self) -> None: ...


class ChainState:
    """This node's chain head file, its lock, and the batch in flight.

    The head file is a hint and a cross-check, not the truth: it is saved after the sinks,
    so a crash in between leaves it behind them; ``ChainWriter`` takes the newest head of
    the file and the sinks. The in-flight file holds the batch being written, so that a
    batch whose records may already be in a sink is finished by the next writer even when
    the broker that sent it died too (otherwise its sequence numbers would be reused).

    The lock file is held: two brokers with the same node id and spool directory would fork the chain.
    """

    def __init__(self, directory: Path, node: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node)
        self.path = directory / f"{safe}.chain"
        self.inflight_path = directory / f"{safe}.inflight"
        self._lock = open(directory / f"{safe}.lock", "a")  # noqa: SIM115 - held for the broker's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SinkError(f"another broker already records as node {node!r} in {directory}") from None
        self.seq, self.hash, self.batch_id = 0, GENESIS, None
        if self.path.exists():
            seq, _, rest = self.path.read_text().strip().partition(" ")
            digest, _, batch = rest.partition(" ")
            self.seq, self.hash, self.batch_id = int(seq), digest, batch or None

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash, self.batch_id, "head file")

    def save(self, seq: int, digest: str, batch_id: str | None = None) -> None:
        """Advance the head; the file is only a hint, so failing to write it is a warning, not a lost batch."""
        self.seq, self.hash, self.batch_id = seq, digest, batch_id
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{seq} {digest}" + (f" {batch_id}" if batch_id else "") + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the chain head file %s (%s); the stores still hold the head", self.path, exc)

    def save_inflight(self, start: Head, batch_id: str, rows: list[Row], sessions: dict[int, SessionFields]) -> None:
        """Atomically (rename): a crash leaves the previous batch or this one, never half of one."""
        tmp = self.inflight_path.with_suffix(".inflight-tmp")
        try:
            tmp.write_bytes(pickle.dumps((start.seq, start.hash, batch_id, rows, sessions), pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, self.inflight_path)
        except OSError as exc:  # an older in-flight file starts below the head, so it is never applied again
            log.warning("cannot save the in-flight batch file %s (%s)", self.inflight_path, exc)

    def load_inflight(self) -> tuple[int, str, str, list[Row], dict[int, SessionFields]] | None:
        try:
            data = self.inflight_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return pickle.loads(data)  # type: ignore[no-any-return]  # noqa: S301 - written by this class
        except Exception:  # a damaged file: the batch it held is re-sent by a live broker or was lost with it
            log.critical("unreadable in-flight batch file %s; set aside as %s.corrupt", self.inflight_path,
                         self.inflight_path.name)
            os.replace(self.inflight_path, self.inflight_path.with_name(self.inflight_path.name + ".corrupt"))
            return None

    def close(self) -> None:
        self._lock.close()


class ChainWriter:
    """Extends one node's hash chain and hands the records to the sinks (in the writer process).

    Exactly once per batch: the sinks that can (SQLite) store the batch id and the chain
    head in the transaction of its records; a restarted writer continues from the newest
    head any sink or spool holds, and a batch it has already applied (the broker re-sends
    the batch it got no acknowledgement for) is acknowledged without being written again.
    Sinks are written in the given order; the one that holds the truth goes last, so a
    crash before it leaves at most exact duplicates (same sequence numbers, same hashes)
    in the sinks before it, which stores ignore.
    """

    def __init__(self, node: str, sinks: Sequence[Sink], state_dir: Path) -> None:
        self.node = node
        self.sinks = list(sinks)
        self.chain = ChainState(state_dir, node)
        self.recorded = 0
        self.duplicates = 0  # batches acknowledged without writing: they had been applied before a crash
        try:
            self._recover()
        except BaseException:
            self.chain.close()
            raise

    def _recover(self) -> None:
        heads = [self.chain.head]
        for sink in self.sinks:
            head_of = getattr(sink, "head", None)
            if head_of is not None:
                found = head_of(self.node)
                if found is not None:
                    heads.append(found)
        best = max(heads, key=lambda h: h.seq)
        for other in heads:
            if other.seq == best.seq and other.hash != best.hash:
                log.critical("node %s: %s and %s disagree on record %d (hash %s vs %s); continuing from %s",
                             self.node, best.source, other.source, best.seq, best.hash[:12], other.hash[:12],
                             best.source)
        if best.source != "head file" and (best.seq, best.hash) != (self.chain.seq, self.chain.hash):
            log.warning("node %s: the chain head file says %d, the %s holds %d; continuing after %d",
                        self.node, self.chain.seq, best.source, best.seq, best.seq)
        self.chain.seq, self.chain.hash, self.chain.batch_id = best.seq, best.hash, best.batch_id
        inflight = self.chain.load_inflight()
        if inflight is not None:
            start_seq, start_hash, batch_id, rows, sessions = inflight
            if batch_id != best.batch_id and (start_seq, start_hash) == (best.seq, best.hash):
                log.warning("node %s: finishing batch %s (%d records) that a crashed writer had started",
                            self.node, batch_id, len(rows))
                self.write(rows, sessions, batch_id)

    def materialize(self, rows: list[Row], sessions: dict[int, SessionFields]) -> list[AssertionRecord]:
        """Chained records; the text hashed here equals ``chain_hash`` of each record, as verify recomputes it.

        Deterministic: the same rows from the same head give the same records, so a batch written
        again after a crash duplicates records exactly or not at all.
        """
        texts = {key: "\x1f".join(map(_canonical, values)) for key, values in sessions.items()}
        records = []
        seq, prev = self.chain.seq, self.chain.hash
        node = self.node
        make = AssertionRecord._make
        canon = _canonical
        for ts, key, client_id, peer, action, topic, allowed, rule_id, reason, tier, latency_ns, revision in rows:
            seq += 1
            record_id = f"{node}:{seq}"
            verdict = "allow" if allowed else "deny"
            latency = round(latency_ns / 1000, 3) if tier else None
            text = "\x1f".join((
                record_id, node, str(seq), repr(ts), canon(client_id), texts[key], action, canon(topic), verdict,
                canon(rule_id), reason, canon(revision), canon(tier), canon(latency), canon(peer), prev,
            ))
            digest = _digest(text)
            records.append(make((record_id, node, seq, ts, client_id, *sessions[key], action, topic, verdict,
                                 rule_id, reason, revision, tier, latency, peer, prev, digest)))
            prev = digest
        return records

    def write(self, rows: list[Row], sessions: dict[int, SessionFields], batch_id: str | None = None) -> int:
        """Store (or spool) the batch, or raise to have it re-sent; returns the number of records it holds."""
        if batch_id is not None and batch_id == self.chain.batch_id:
            self.duplicates += 1
            log.info("node %s: batch %s was applied before the writer restarted; acknowledged, not written again",
                     self.node, batch_id)
            return len(rows)
        if not rows:
            return 0
        if batch_id is not None:
            self.chain.save_inflight(self.chain.head, batch_id, rows, sessions)
        records = self.materialize(rows, sessions)
        for sink in self.sinks:
            sink.write(records, batch_id)  # spooling sinks raise only when neither backend nor spool took the batch
        last = records[-1]
        self.chain.save(last.seq, last.hash, batch_id)
        self.recorded += len(records)
        return len(records)

    def idle(self) -> None:
        """Deliver spooled records even when no new ones arrive."""
        for sink in self.sinks:
            if getattr(sink, "backlog", False):
                sink.replay()  # type: ignore[attr-defined]

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.chain.close()


class AssertionRecorder:
    """The broker's side: captures decisions in O(1) and ships them, in order, to a ``BatchWriter``."""

    def __init__(self, writer: BatchWriter, flush_interval: float = 0.05, batch_size: int = 5000) -> None:
        self.writer = writer
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._queue: deque[Captured] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="assertions")
        self._sessions: dict[int, tuple[Admission | None, SessionFields]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Batch ids: this recorder's own prefix and a counter. A batch that failed is re-sent
        # unchanged under the same id, so the writer can recognise one it already applied.
        self.instance = uuid.uuid4().hex[:16]
        self._batches = 0
        self._unacked: tuple[str, list[Row], dict[int, SessionFields], int] | None = None
        self.shipped = 0

    # -- per message: O(1), no I/O ---------------------------------------------------------

    def decision(self, admission: Admission | None, client_id: str | None, peer: Peer, action: str,
                 topic: str | None, decision: Decision, tier: str | None, latency_ns: int,
                 policy_revision: str | None) -> None:
        self._queue.append((time.time(), admission, client_id, peer, action, topic, decision, tier, latency_ns,
                            policy_revision))

    def connect(self, admission: Admission, client_id: str | None, peer: Peer, policy_revision: str) -> None:
        decision = Decision(admission.allowed, admission.rule_id, admission.reason)
        self.decision(admission, client_id, peer, "connect", None, decision, None, 0, policy_revision)

    # -- background --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt-pdp-assertions")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)
            except TimeoutError:
                pass
            if self._queue:
                await self._drain()
            else:
                await loop.run_in_executor(self._executor, self.writer.idle)

    def _rows(self, batch: list[Captured]) -> tuple[list[Row], dict[int, SessionFields]]:
        sessions: dict[int, SessionFields] = {}
        known = self._sessions
        rows: list[Row] = []
        for ts, admission, client_id, peer, action, topic, decision, tier, latency_ns, revision in batch:
            key = id(admission)
            if key not in sessions:
                entry = known.get(key)
                if entry is None or entry[0] is not admission:
                    if len(known) > 50_000:
                        known.clear()
                    entry = known[key] = (admission, session_fields(admission))
                sessions[key] = entry[1]
            rows.append((ts, key, client_id, peer, action, topic, decision.allowed, decision.rule_id, decision.reason,
                         tier, latency_ns, revision))
        return rows, sessions

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue or self._unacked is not None:
            if self._unacked is None:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_size))]
                self._batches += 1
                self._unacked = (f"{self.instance}:{self._batches}", *self._rows(batch), len(batch))
            batch_id, rows, sessions, size = self._unacked
            try:
                await loop.run_in_executor(self._executor, self.writer.write, rows, sessions, batch_id)
            except Exception:  # evidence is never dropped: keep the batch, as it is, and retry
                log.exception("writing assertion records failed; batch %s (%d records) kept in memory for retry",
                              batch_id, size)
                await asyncio.sleep(1.0)
                if self._stopping.is_set():
                    return
            else:
                self._unacked = None
                self.shipped += size

    @property
    def pending(self) -> int:
        """Captured decisions not yet acknowledged by the writer."""
        return len(self._queue) + (self._unacked[3] if self._unacked is not None else 0)

    async def close(self) -> None:
        """Graceful shutdown: everything captured is written (or spooled) before this returns."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        await self._drain()
        if self.pending:
            log.critical("%d assertion records could not be written at shutdown", self.pending)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.writer.close)
        self._executor.shutdown(wait=True)
