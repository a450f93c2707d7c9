"""Where assertion records go: the local SQLite store, a shared Redis Stream, and the spool in front of both.

Sinks run on the recorder's own thread, never on the broker's event loop.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from pdp.evidence.record import AssertionRecord, Head, SinkError
from pdp.evidence.store import AssertionStore

log = logging.getLogger("mqtt_pdp.assertions")

SINK_ERRORS: tuple[type[BaseException], ...] = (SinkError, OSError, sqlite3.Error, redis.RedisError)


def record_to_json(record: AssertionRecord) -> str:
    return json.dumps(record._asdict(), separators=(",", ":"))


def record_from_json(text: str | bytes) -> AssertionRecord:
    return AssertionRecord(**json.loads(text))


def batch_to_line(records: Sequence[AssertionRecord], batch_id: str | None) -> bytes:
    """One spool line per batch: the batch is spooled whole or (a torn line, quarantined) not at all."""
    return (json.dumps({"batch": batch_id, "records": list(records)}, separators=(",", ":")) + "\n").encode()


def batch_from_line(line: bytes) -> tuple[str | None, list[AssertionRecord]]:
    """A batch line, or a single record as spools written before batch lines held them."""
    data = json.loads(line)
    if "records" in data:
        return data["batch"], [AssertionRecord._make(values) for values in data["records"]]
    return None, [AssertionRecord(**data)]


def quarantine(path: Path, data: bytes, why: str) -> None:
    """Set unreadable bytes aside next to ``path`` instead of failing on them for ever."""
    corrupt = path.with_name(path.name + ".corrupt")
    with corrupt.open("ab") as out:
        out.write(data if data.endswith(b"\n") else data + b"\n")
        out.flush()
        os.fsync(out.fileno())
    log.critical("%s: %s (%d bytes) moved to %s", path, why, len(data), corrupt)


def repair_tail(path: Path) -> None:
    """A line without its newline is what a crash or a full disk leaves: keep it if it parses, else quarantine it."""
    try:
        with path.open("rb+") as spool:
            size = spool.seek(0, os.SEEK_END)
            if size == 0:
                return
            spool.seek(size - 1)
            if spool.read(1) == b"\n":
                return
            start = max(0, size - (1 << 20))
            while True:  # find the start of the torn line
                spool.seek(start)
                chunk = spool.read(size - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0 or start == 0:
                    break
                start = max(0, start - (1 << 20))
            tail_start = start + cut + 1
            tail = chunk[cut + 1:]
            try:
                json.loads(tail)
            except ValueError:
                quarantine(path, tail, "a torn last line (crash or full disk while spooling)")
                spool.truncate(tail_start)
            else:
                spool.seek(size)
                spool.write(b"\n")
            spool.flush()
            os.fsync(spool.fileno())
    except FileNotFoundError:
        return


def append_durably(path: Path, data: bytes) -> None:
    """Append and fsync; on failure (a full disk) cut the file back, so no torn line is left behind."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:  # repair_tail quarantines the torn line before the next append or replay
                pass
            raise
    finally:
        os.close(fd)


class SqliteSink:
    """The local store; it holds each node's chain head and last batch id in the transaction of the records."""

    name = "sqlite"
    holds_head = True  # the chain head and batch id are stored in each batch's transaction (ChainWriter)

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._store: AssertionStore | None = None

    def _open(self) -> AssertionStore:
        if self._store is None:
            # Not indexing on opening: the writer indexes on its own schedule (ChainWriter.index), and a
            # failure there must not keep the writer from starting and storing new batches.
            self._store = AssertionStore(self.path, catch_up=False)
            if self._store.unblocked:
                log.warning("%s has the indexes of an earlier version, which make recording about three times "
                            "slower at 1M records; `mqtt-pdp log reindex --db %s` (with the broker stopped) "
                            "replaces them", self.path, self.path)
        return self._store

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None, body: bytes | None = None) -> None:
        """With ``body`` (``encode_batch`` of the batch's rows): stored as one pending row, indexed later."""
        if body is None:
            self._open().insert_chain(records, batch_id)
            return
        first, last = records[0], records[-1]
        self._open().append_pending(last.node, first.seq, last.seq, first.prev_hash, last.hash, batch_id, body)

    def pending_records(self) -> int:
        return self._open().pending_records()

    def index_pending(self, batches: int | None = None) -> int:
        return self._open().index_pending(batches)

    def head(self, node: str) -> Head | None:
        """Read on a connection of its own: the writing one belongs to the thread that writes."""
        try:
            store = AssertionStore(self.path, catch_up=False)
            try:
                return store.head(node)
            finally:
                store.close()
        except SINK_ERRORS as exc:
            log.warning("cannot read node %s's chain head from %s (%s)", node, self.path, exc)
            return None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def stream_name(prefix: str) -> str:
    return f"{prefix}:assertions"


class RedisStreamSink:
    """Appends to a Redis Stream that several brokers share; ``drain_stream`` moves it into a store."""

    name = "redis-stream"

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self.stream = stream_name(prefix)

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None, body: bytes | None = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.stream, {"r": record_to_json(record)})
        pipe.execute()

    def close(self) -> None:
        self.client.close()


def last_line(path: Path, block: int = 1 << 16) -> bytes | None:
    """The file's last complete line, read from the end (the file may be large)."""
    try:
        with path.open("rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            if end and (handle.seek(end - 1), handle.read(1))[1] == b"\n":
                end -= 1
            tail = b""
            position = end
            while position > 0:
                step = min(block, position)
                position -= step
                handle.seek(position)
                tail = handle.read(step) + tail
                cut = tail.rfind(b"\n")
                if cut >= 0:
                    return tail[cut + 1:] or None
            return tail or None
    except FileNotFoundError:
        return None


class JsonLinesSink:
    """The sink of last resort, with no store and no stream configured: an fsync'd file in the spool's
    format (one JSON line per batch, with its batch id), so that a restarted writer finds its head there."""

    name = "jsonl"

    def __init__(self, directory: Path, node: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node)
        self.path = directory / f"{safe}.assertions.jsonl"
        repair_tail(self.path)

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None, body: bytes | None = None) -> None:
        append_durably(self.path, batch_to_line(records, batch_id))

    def head(self, node: str) -> Head | None:
        line = last_line(self.path)
        if line is None:
            return None
        batch_id, records = batch_from_line(line)
        last = records[-1]
        return Head(last.seq, last.hash, batch_id, str(self.path)) if last.node == node else None

    def close(self) -> None:
        pass


class SpoolingSink:
    """Never loses a batch: when the inner sink fails, the batch goes to a local spool file (fsync'd, one
    line per batch, with its batch id) and is replayed before anything newer once the sink works again.
    If the spool cannot be written either, ``write`` raises: the broker keeps the batch and sends it again."""

    def __init__(self, inner: SqliteSink | RedisStreamSink, spool_dir: Path, retry_interval: float = 1.0) -> None:
        self.inner = inner
        self.name = f"spooled {inner.name}"
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.path = spool_dir / f"{inner.name}.jsonl"
        self.retry_interval = retry_interval
        self._next_retry = 0.0
        self._down = False
        self.spooled = 0
        self.spool_failures = 0
        repair_tail(self.path)

    @property
    def backlog(self) -> bool:
        try:
            return self.path.is_file() and self.path.stat().st_size > 0
        except OSError:
            return False

    def head(self, node: str) -> Head | None:
        """The newest of the inner sink's head and the last spooled record of ``node``."""
        found: Head | None = None
        head_of = getattr(self.inner, "head", None)
        if head_of is not None:
            found = head_of(node)
        for batch_id, records in self._read():
            for record in records:
                if record.node == node and (found is None or record.seq > found.seq):
                    found = Head(record.seq, record.hash, batch_id, f"{self.inner.name} spool")
        return found

    def write(self, records: Sequence[AssertionRecord], batch_id: str | None = None, body: bytes | None = None) -> None:
        """``body``: passed on to the inner sink when it takes the batch now; a spooled batch keeps its records."""
        if not self.backlog:
            try:
                if body is None:
                    self.inner.write(records, batch_id)
                else:
                    self.inner.write(records, batch_id, body)
                self._mark_up()
                return
            except SINK_ERRORS as exc:
                self._mark_down(exc)
        self._spool(records, batch_id)
        self.replay()

    def _read(self) -> list[tuple[str | None, list[AssertionRecord]]]:
        """The spooled batches, in order; unreadable lines are quarantined (and the spool rewritten without them)."""
        repair_tail(self.path)
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        batches: list[tuple[str | None, list[AssertionRecord]]] = []
        bad = 0
        for line in lines:
            if not line:
                continue
            try:
                batch_id, records = batch_from_line(line)
            except (ValueError, TypeError, KeyError) as exc:
                quarantine(self.path, line, f"an unreadable spool line ({exc})")
                bad += 1
                continue
            if batch_id is None and batches and batches[-1][0] is None and len(batches[-1][1]) < 5000:
                batches[-1][1].extend(records)  # single-record lines of older spools, delivered in chunks
            else:
                batches.append((batch_id, records))
        if bad:
            self._rewrite(batches)
        return batches

    def _rewrite(self, batches: list[tuple[str | None, list[AssertionRecord]]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as out:
            out.write(b"".join(batch_to_line(records, batch_id) for batch_id, records in batches))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def replay(self, force: bool = False) -> bool:
        """Deliver the spool in order; True when it is empty afterwards."""
        if not self.backlog:
            return True
        now = time.monotonic()
        if not force and now < self._next_retry:
            return False
        self._next_retry = now + self.retry_interval
        try:
            batches = self._read()
        except OSError as exc:
            log.error("%s: cannot read the spool %s (%s); it stays for the next attempt", self.inner.name, self.path, exc)
            return False
        done = 0
        try:
            for batch_id, records in batches:
                self.inner.write(records, batch_id)
                done += 1
        except SINK_ERRORS as exc:
            self._mark_down(exc)
            if done:
                self._rewrite(batches[done:])
            return False
        self.path.unlink(missing_ok=True)
        log.info("%s: %d spooled records delivered", self.inner.name, sum(len(r) for _, r in batches))
        self._mark_up()
        return True

    def _spool(self, records: Sequence[AssertionRecord], batch_id: str | None) -> None:
        """Append the batch and fsync it before the batch is acknowledged; raise if that is impossible."""
        try:
            repair_tail(self.path)
            append_durably(self.path, batch_to_line(records, batch_id))
        except OSError as exc:
            self.spool_failures += 1
            log.critical("%s: cannot write the spool %s (%s); batch %s (%d records) stays with the broker, "
                         "which sends it again", self.inner.name, self.path, exc, batch_id, len(records))
            raise SinkError(f"{self.inner.name} and its spool {self.path} are both unavailable") from exc
        self.spooled += len(records)

    def _mark_down(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning("%s unavailable (%s); spooling assertion records to %s", self.inner.name, exc, self.path)

    def _mark_up(self) -> None:
        if self._down:
            self._down = False
            log.info("%s available again", self.inner.name)

    def close(self) -> None:
        """Last attempt to deliver the spool; what remains stays on disk for the next start."""
        self.replay(force=True)
        if self.backlog:
            log.warning("%s: spool %s kept for the next start", self.inner.name, self.path)
        self.inner.close()


def drain_stream(store: AssertionStore, client: redis.Redis, prefix: str, batch: int = 5000) -> int:
    """Move every record in the shared stream into the store; returns how many were new.

    Records that fork from the chain stored for their node are not merged but kept as conflicts
    (``store.forked`` counts them): the caller must report them.

    The position is stored with the records in one transaction, and drained entries are
    deleted only afterwards, so a crash at any point neither loses nor doubles a record.
    """
    stream = stream_name(prefix)
    key = f"stream:{stream}"
    moved = 0
    while True:
        last = store.get_meta(key) or "0-0"
        entries = client.xrange(stream, min=f"({last}", count=batch)
        if not entries:
            return moved
        records = [record_from_json(fields[b"r"]) for _, fields in entries]
        last_id = entries[-1][0].decode()
        moved += store.insert_with_meta(records, key, last_id, linked=True)
        client.xdel(stream, *[entry_id for entry_id, _ in entries])
