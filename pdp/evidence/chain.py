"""The writer process's side of the log: extending one node's hash chain, exactly once per batch.

Runs in the writer process (``pdp.evidence.writer``), never on the broker's event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import time
from collections.abc import Sequence
from pathlib import Path

from pdp.evidence.anchor import Anchorer
from pdp.evidence.store import MAX_SEQ
from pdp.evidence.record import (
    GENESIS,
    AssertionRecord,
    ChainedBatch,
    Head,
    Row,
    SessionFields,
    Sink,
    SinkError,
    chained,
    encode_batch,
)

log = logging.getLogger("mqtt_pdp.assertions")

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
        self.unsaved = False  # advanced since the file was last written
        if self.path.exists():
            seq, _, rest = self.path.read_text().strip().partition(" ")
            digest, _, batch = rest.partition(" ")
            self.seq, self.hash, self.batch_id = int(seq), digest, batch or None

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash, self.batch_id, "head file")

    def advance(self, seq: int, digest: str, batch_id: str | None = None) -> None:
        """Advance the head in memory only (``save`` writes the file)."""
        self.seq, self.hash, self.batch_id = seq, digest, batch_id
        self.unsaved = True

    def save(self, seq: int, digest: str, batch_id: str | None = None) -> None:
        """Advance the head; the file is only a hint, so failing to write it is a warning, not a lost batch."""
        self.seq, self.hash, self.batch_id = seq, digest, batch_id
        self.unsaved = False
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{seq} {digest}" + (f" {batch_id}" if batch_id else "") + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the chain head file %s (%s); the stores still hold the head", self.path, exc)

    def save_inflight(self, start: Head, batch_id: str, rows: list[Row], sessions: dict[int, SessionFields],
                      frame: bytes | None = None) -> None:
        """Atomically (rename): a crash leaves the previous batch or this one, never half of one.

        ``frame``: the batch as the broker pickled it (``("batch", rows, sessions, batch_id)``), written as it
        came instead of pickled again (that was 1.5 us a record, 7% of the writer's time)."""
        tmp = self.inflight_path.with_suffix(".inflight-tmp")
        state = ((start.seq, start.hash, batch_id, frame) if frame is not None
                 else (start.seq, start.hash, batch_id, rows, sessions))
        try:
            tmp.write_bytes(pickle.dumps(state, pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, self.inflight_path)
        except OSError as exc:  # an older in-flight file starts below the head, so it is never applied again
            log.warning("cannot save the in-flight batch file %s (%s)", self.inflight_path, exc)

    def load_inflight(self) -> tuple[int, str, str, list[Row], dict[int, SessionFields]] | None:
        try:
            data = self.inflight_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = pickle.loads(data)  # noqa: S301 - written by this class
            if len(state) == 4:  # the broker's frame, kept as it came
                _, rows, sessions, _ = pickle.loads(state[3])  # noqa: S301 - the broker's, as above
                state = (*state[:3], rows, sessions)
            return state  # type: ignore[no-any-return]
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

    def __init__(self, node: str, sinks: Sequence[Sink], state_dir: Path, anchorer: Anchorer | None = None,
                 index_backlog: int = 0) -> None:
        """``index_backlog``: with more than 0, batches go to the store as pending rows (``AssertionStore``), and
        ``index`` turns them into records; with this many records pending, batches go into the records at once."""
        self.node = node
        self.index_backlog = index_backlog
        self.unindexed = 0  # records this writer stored as pending rows and has not indexed (an estimate)
        self._index_retry_at = 0.0
        self.sinks = list(sinks)
        self.anchorer = anchorer  # signs the head outside the database at a cadence (pdp.evidence.anchor)
        self.chain = ChainState(state_dir, node)
        # With a store that keeps the chain head in the transaction of each batch (SQLite), the head file is only
        # a hint, written at most once a second and at the stop (writing it per batch was a tenth of the writer's
        # time in a flow, py-spy); without one (a stream or JSON Lines alone) it is the head, written per batch.
        self._head_in_store = any(getattr(getattr(sink, "inner", sink), "holds_head", False) for sink in sinks)
        self._head_saved_at = float("-inf")
        self.recorded = 0
        self.duplicates = 0  # batches acknowledged without writing: they had been applied before a crash
        try:
            self._recover()
        except BaseException:
            self.chain.close()
            raise
        if index_backlog > 0:  # left pending by a writer that was killed: indexed by this one
            for sink in self.sinks:
                count = getattr(getattr(sink, "inner", sink), "pending_records", None)
                if count is not None:
                    try:
                        self.unindexed += count()
                    except Exception as exc:  # noqa: BLE001 - a store that cannot be read now is retried by write
                        log.warning("node %s: cannot count pending records (%s)", self.node, exc)

    def _recover(self) -> None:
        heads = [self.chain.head]
        for sink in self.sinks:
            head_of = getattr(sink, "head", None)
            if head_of is not None:
                found = head_of(self.node)
                if found is not None:
                    heads.append(found)
        sane = [h for h in heads if 0 <= h.seq < MAX_SEQ]
        for other in heads:
            if other not in sane:
                log.critical("node %s: %s names record %d, which no writer reaches (edited); ignored", self.node,
                             other.source, other.seq)
        best = max(sane or [Head(0, GENESIS, None, "genesis")], key=lambda h: h.seq)
        for other in heads:
            if other.seq == best.seq and other.hash != best.hash:
                log.critical("node %s: %s and %s disagree on record %d (hash %s vs %s); continuing from %s",
                             self.node, best.source, other.source, best.seq, best.hash[:12], other.hash[:12],
                             best.source)
        if best.source != "head file" and (best.seq, best.hash) != (self.chain.seq, self.chain.hash):
            log.warning("node %s: the chain head file says %d, the %s holds %d; continuing after %d",
                        self.node, self.chain.seq, best.source, best.seq, best.seq)
        self.chain.seq, self.chain.hash, self.chain.batch_id = best.seq, best.hash, best.batch_id
        if self.anchorer is not None and best.seq > 0:
            # A writer that died between a commit and its signed head: sign the head it left behind.
            self.anchorer.note(best.seq, best.hash, None, 0)
        inflight = self.chain.load_inflight()
        if inflight is not None:
            start_seq, start_hash, batch_id, rows, sessions = inflight
            if batch_id != best.batch_id and (start_seq, start_hash) == (best.seq, best.hash):
                log.warning("node %s: finishing batch %s (%d records) that a crashed writer had started",
                            self.node, batch_id, len(rows))
                self.write(rows, sessions, batch_id)

    def materialize(self, rows: list[Row], sessions: dict[int, SessionFields]) -> list[AssertionRecord]:
        return chained(self.node, self.chain.seq, self.chain.hash, rows, sessions)

    def write(self, rows: list[Row], sessions: dict[int, SessionFields], batch_id: str | None = None,
              frame: bytes | None = None) -> int:
        """Store (or spool) the batch, or raise to have it re-sent; returns the number of records it holds.
        ``frame``: the pickled message the batch came in, if any (kept as the in-flight copy)."""
        if batch_id is not None and batch_id == self.chain.batch_id:
            self.duplicates += 1
            log.info("node %s: batch %s was applied before the writer restarted; acknowledged, not written again",
                     self.node, batch_id)
            return len(rows)
        if not rows:
            return 0
        if batch_id is not None:
            self.chain.save_inflight(self.chain.head, batch_id, rows, sessions, frame)
        records = ChainedBatch(self.node, self.chain.seq, self.chain.hash, rows, sessions)  # built if a sink reads them
        # Past the backlog the batch goes into the records at once: storing it whole and indexing it later
        # would cost both (6 + 17 us a record) where a direct insert costs one (about 12-15 us).
        body = encode_batch(rows, sessions) if self.unindexed < self.index_backlog else None
        for sink in self.sinks:  # spooling sinks raise only when neither backend nor spool took the batch
            if body is None:
                sink.write(records, batch_id)
            else:
                sink.write(records, batch_id, body)
        if body is not None:
            self.unindexed += len(records)
        last = records[-1]
        now = time.monotonic()
        if self._head_in_store and now - self._head_saved_at < 1.0:
            self.chain.advance(last.seq, last.hash, batch_id)
        else:
            self.chain.save(last.seq, last.hash, batch_id)
            self._head_saved_at = now
        self.recorded += len(records)
        if self.anchorer is not None:
            self.anchorer.note(last.seq, last.hash, last.ts, len(records))
        return len(records)

    def index(self, batches: int | None = 1) -> int:
        """Index the oldest pending batches (all with None); returns the records indexed. A store that cannot
        be written now keeps them pending: they are indexed later, by this writer or by whoever opens the store."""
        done = 0
        now = time.monotonic()
        if now < self._index_retry_at:
            return 0
        for sink in self.sinks:
            index_pending = getattr(getattr(sink, "inner", sink), "index_pending", None)
            if index_pending is None:
                continue
            try:
                done += index_pending(batches)
            except Exception as exc:  # noqa: BLE001 - storing new batches goes on; indexing is tried again later
                self._index_retry_at = now + 5.0
                log.warning("node %s: cannot index pending records now (%s); they stay pending, next attempt in "
                            "5 s", self.node, exc)
                return 0
        self.unindexed = max(0, self.unindexed - done) if done else 0
        return done

    def tick(self) -> None:
        """Cheap, called between batches and when idle: sign the head when its interval is up."""
        if self.anchorer is not None:
            self.anchorer.tick()

    def idle(self) -> None:
        """Deliver spooled records even when no new ones arrive."""
        for sink in self.sinks:
            if getattr(sink, "backlog", False):
                sink.replay()  # type: ignore[attr-defined]

    def close(self) -> None:
        """A clean stop leaves nothing pending."""
        if self.unindexed:
            self.index(None)
        if self.chain.unsaved:
            self.chain.save(self.chain.seq, self.chain.hash, self.chain.batch_id)
        for sink in self.sinks:
            sink.close()
        if self.anchorer is not None:
            self.anchorer.close()
        self.chain.close()


