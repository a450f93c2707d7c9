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

from pdp.evidence.store import AssertionStore
from pdp.evidence.records import AssertionRecord, SinkError

log = logging.getLogger("mqtt_pdp.assertions")

SINK_ERRORS: tuple[type[BaseException], ...] = (SinkError, OSError, sqlite3.Error, redis.RedisError)


def record_to_json(record: AssertionRecord) -> str:
    return json.dumps(record._asdict(), separators=(",", ":"))


def record_from_json(text: str | bytes) -> AssertionRecord:
    return AssertionRecord(**json.loads(text))


class SqliteSink:
    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._store: AssertionStore | None = None

    def write(self, records: Sequence[AssertionRecord]) -> None:
        if self._store is None:
            self._store = AssertionStore(self.path)
        self._store.insert(records)

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

    def write(self, records: Sequence[AssertionRecord]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for record in records:
            pipe.xadd(self.stream, {"r": record_to_json(record)})
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class SpoolingSink:
    """Never loses a batch: when the inner sink fails, records go to a local spool file, in order,
    and are replayed before anything newer once the sink works again."""

    def __init__(self, inner: SqliteSink | RedisStreamSink, spool_dir: Path, retry_interval: float = 1.0) -> None:
        self.inner = inner
        self.name = f"spooled {inner.name}"
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.path = spool_dir / f"{inner.name}.jsonl"
        self.retry_interval = retry_interval
        self._next_retry = 0.0
        self._down = False
        self._unspooled: list[AssertionRecord] = []  # only while the spool itself cannot be written
        self.spooled = 0
        self.spool_failures = 0

    @property
    def backlog(self) -> bool:
        return bool(self._unspooled) or (self.path.exists() and self.path.stat().st_size > 0)

    def write(self, records: Sequence[AssertionRecord]) -> None:
        if not self.backlog:
            try:
                self.inner.write(records)
                self._mark_up()
                return
            except SINK_ERRORS as exc:
                self._mark_down(exc)
        self._spool(records)
        self.replay()

    def replay(self, force: bool = False) -> bool:
        """Deliver the spool in order; True when it is empty afterwards."""
        if not self.backlog:
            return True
        now = time.monotonic()
        if not force and now < self._next_retry:
            return False
        self._next_retry = now + self.retry_interval
        if self._unspooled:
            self._spool([])
            if self._unspooled:
                return False
        lines = self.path.read_text().splitlines()
        done = 0
        try:
            for start in range(0, len(lines), 5000):
                chunk = [record_from_json(line) for line in lines[start:start + 5000] if line]
                self.inner.write(chunk)
                done = start + 5000
        except SINK_ERRORS as exc:
            self._mark_down(exc)
            if done:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in lines[done:]))
                os.replace(tmp, self.path)
            return False
        self.path.unlink()
        log.info("%s: %d spooled records delivered", self.inner.name, len(lines))
        self._mark_up()
        return True

    def _spool(self, records: Sequence[AssertionRecord]) -> None:
        pending = [*self._unspooled, *records]
        if not pending:
            return
        try:
            with self.path.open("a") as spool:
                spool.write("".join(record_to_json(r) + "\n" for r in pending))
                spool.flush()
                os.fsync(spool.fileno())
        except OSError as exc:
            self.spool_failures += 1
            self._unspooled = pending
            log.critical("%s: cannot write the spool %s (%s); %d records held in memory until it can",
                         self.inner.name, self.path, exc, len(pending))
            return
        self._unspooled = []
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
        moved += store.insert_with_meta(records, key, last_id)
        client.xdel(stream, *[entry_id for entry_id, _ in entries])
