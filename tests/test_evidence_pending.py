"""Batches stored whole and indexed later (``pending``): the records they turn into are exactly those the
writer chained and signed, every reader sees them, and a batch altered or destroyed in the database while
it waited is named by verify."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from pdp.evidence.record import decode_batch, encode_batch
from pdp.evidence.store import AssertionStore
from pdp.evidence.writer import build_writer
from tests.test_anchors import key  # noqa: F401 - the module's signing key fixture
from tests.test_anchors import records as stored_records
from tests.test_log_cli import cli, query

SESSIONS = {
    1: ("dev-1", "ab" * 32, "0a1b", "CN=unit CA", "sensor", "plant-a", "test", "qa", "active"),
    2: (None, None, None, None, None, None, None, None, None),  # a refusal before any identity
    3: ("dév\u00e9-\U0001f600", "cd" * 32, "ff", "CN=ü\x00,O=\x1b[31m", "cam", "b\nc", "p\t", "o", "revoked"),
}


def hostile_rows(count: int, base: float) -> list[tuple]:
    """Every kind of value a row holds: None, control characters, NUL, astral characters, odd floats, a gap."""
    out = []
    for i in range(count):
        key = 1 + i % 3
        allowed = None if i == 7 else i % 2 == 0  # None: a gap record ("lost")
        out.append((base + i / 3, key, None if i % 5 == 0 else f"c\x00{i}\r\n", None if i % 4 == 0 else "[::1]:1",
                    "publish", None if i % 6 == 0 else f"t/\u202e{i}/#\x7f", allowed, None if i % 3 else f"r{i}",
                    f"why\x1f{i}", None if i % 2 else "l1", 1234567 * i, None if i == 4 else "rev\x1e1"))
    return out


def writer_for(directory: Path, db: Path, backlog: int, key_file: Path | None = None):
    return build_writer({"node": "n1", "spool_dir": str(directory / "spool"), "assertion_db": str(db),
                         "stream_url": "", "stream_prefix": "p", "index_backlog": backlog,
                         "anchor_key_file": str(key_file) if key_file else "", "anchor_dir": str(directory / "anchors"),
                         "anchor_every": 5, "anchor_interval": 3600})


def pending_batches(tmp_path: Path, batches: int, size: int, key_file: Path | None = None):
    """A writer that stored ``batches`` batches of ``size`` records whole, none indexed (it is not closed)."""
    db = tmp_path / "a.db"
    writer = writer_for(tmp_path, db, 1_000_000, key_file)
    for n in range(batches):
        writer.write(hostile_rows(size, time.time() - 100 + n * 10), SESSIONS, f"b{n}")
    return db, writer


def retopic(db: Path, first: int, row: int, topic: str) -> None:
    """Rewrite one row's topic in the stored batch that starts at ``first``, as someone with write access would."""
    with sqlite3.connect(db) as conn:
        rows, sessions = json.loads(conn.execute("SELECT body FROM pending WHERE first = ?", (first,)).fetchone()[0])
        rows[row][5] = topic
        conn.execute("UPDATE pending SET body = ? WHERE first = ?", (json.dumps([rows, sessions]).encode(), first))


def raw_count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_batch_survives_its_encoding_exactly() -> None:
    rows = hostile_rows(40, 1.7e9 + 0.1)
    assert decode_batch(encode_batch(rows, SESSIONS)) == (rows, SESSIONS)
    with pytest.raises(ValueError):
        decode_batch(b'[[1, 2], "not sessions"]')


def test_pending_batches_become_the_records_a_direct_insert_stores(tmp_path: Path) -> None:
    base = time.time()
    direct, deferred = tmp_path / "direct.db", tmp_path / "deferred.db"
    now_writer = writer_for(tmp_path / "a", direct, 0)
    later_writer = writer_for(tmp_path / "b", deferred, 1_000_000)
    for n in range(4):
        rows = hostile_rows(30, base + n * 100)
        assert now_writer.write(rows, SESSIONS, f"b{n}") == later_writer.write(rows, SESSIONS, f"b{n}") == 30
    now_writer.close()
    # Stored and chained, not yet indexed: the chain head moved with the batch.
    assert (raw_count(deferred, "records"), raw_count(deferred, "pending")) == (0, 4)
    assert later_writer.unindexed == 120
    # Any reader indexes first, even a read-only one (on a connection of its own).
    reader = AssertionStore(deferred, readonly=True)
    assert (reader.count(), reader.unindexed) == (120, 0)
    reader.close()
    assert (raw_count(deferred, "records"), raw_count(deferred, "pending")) == (120, 0)
    assert stored_records(deferred) == stored_records(direct)
    assert later_writer.index(None) == 0 and later_writer.unindexed == 0  # nothing left; the estimate resets
    later_writer.close()


def test_the_writer_indexes_what_it_stored_when_asked_and_when_it_stops(tmp_path: Path) -> None:
    db, writer = pending_batches(tmp_path, 3, 10)
    assert writer.index(1) == 10 and (raw_count(db, "records"), raw_count(db, "pending")) == (10, 2)
    writer.write(hostile_rows(10, time.time()), SESSIONS, "b3")
    writer.close()  # a clean stop leaves nothing pending
    assert (raw_count(db, "records"), raw_count(db, "pending")) == (40, 0)


def test_queries_see_records_the_writer_has_not_indexed(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    writer = writer_for(tmp_path, db, 1_000_000)
    writer.write(hostile_rows(12, time.time()), SESSIONS, "b0")
    assert raw_count(db, "records") == 0
    found = query(db, "--device", "dev-1")
    assert len(found) == 4 and {r["device_id"] for r in found} == {"dev-1"}
    writer.close()


def _pending_body(db: Path) -> tuple[int, bytes]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT first, body FROM pending ORDER BY first LIMIT 1").fetchone()


@pytest.mark.parametrize("edit", ["hash = 'ab' || substr(hash, 3)", "last = 12"], ids=["hash", "range"])
def test_a_pending_batch_whose_records_stay_intact_but_whose_row_was_edited_is_named_by_verify(
        tmp_path: Path, edit: str) -> None:
    """Edits that leave the records as they were (the stored hash or range alone) were only logged by whoever
    indexed the batch, and verify said intact (a noted gap of the last outside attack)."""
    db, writer = pending_batches(tmp_path, 4, 5)
    with sqlite3.connect(db) as conn:
        end = conn.execute("SELECT hash FROM pending WHERE first = 6").fetchone()[0]
        conn.execute(f"UPDATE pending SET {edit} WHERE first = 6")
    conn.close()
    said = ("..10 with hash ab" + end[2:12]) if edit.startswith("hash") else ("..12 with hash " + end[:12])
    result = cli("log", "verify", "--db", str(db))
    assert (result.returncode, result.stdout.splitlines()) == (1, [
        f"BROKEN: node n1: the stored batch n1:6{said[:4]} was altered in the database before it was indexed: its row "
        f"says it ends at n1:{said[2:4]} with hash {said[-12:]}, its records end at n1:10 with hash {end[:12]} "
        "(indexed as they read)"]), result
    assert [r.seq for r in stored_records(db)] == list(range(1, 21))  # the records themselves are all there
    again = cli("log", "verify", "--db", str(db))  # reported on every later verify too, not only once
    assert again.returncode == 1 and "was altered in the database before it was indexed" in again.stdout
    writer.close()


def test_a_pending_batch_altered_in_the_database_is_named_by_verify(tmp_path: Path, key: Path) -> None:  # noqa: F811
    db, writer = pending_batches(tmp_path, 4, 5, key)
    writer.tick()
    retopic(db, 6, 2, "t/innocent")  # the second batch's third row
    result = cli("log", "verify", "--db", str(db), "--anchors", str(tmp_path / "anchors"), "--public-key",
                 f"{key}.pub")
    assert "the stored batch n1:6..10 no longer ends at the hash the writer chained" in result.stderr
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    assert "n1:11 does not follow the previous record (removed, reordered or replaced)" in result.stdout
    assert any("n1:10 differs from signed head" in line for line in lines), lines
    assert [r.topic for r in stored_records(db)][7] == "t/innocent"  # indexed as it now reads, and reported
    writer.close()


def test_a_pending_batch_destroyed_in_the_database_is_reported_missing(tmp_path: Path) -> None:
    db, writer = pending_batches(tmp_path, 3, 5)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE pending SET body = x'00ff' WHERE first = 6")
    result = cli("log", "verify", "--db", str(db))
    assert "the stored batch n1:6..10 cannot be read" in result.stderr
    assert result.returncode == 1
    assert "record(s) n1:6..10 missing before n1:11" in result.stdout, result.stdout
    assert raw_count(db, "unindexable") == 1 and raw_count(db, "pending") == 0  # kept aside, never retried for ever
    writer.close()


TOPIC = "sites/plant-a/sensor-1/telemetry"


@pytest.mark.parametrize("broker_settings", [{"assertion_index_backlog": 300}], ids=["backlog-300"])
def test_a_busy_broker_keeps_the_backlog_bound_and_indexes_when_quiet(broker, connect, tmp_path: Path) -> None:
    """Real broker, real TLS, paho: while traffic runs the writer stores batches whole and indexes only to stay
    within ``assertion_index_backlog``; once traffic stops it indexes the rest by itself, with no reader."""
    from tests.support import wait_for

    db = Path(broker.plugin.service.settings.assertion_db)
    sensor = connect("sensor-1")
    sampled: list[int] = []
    batches = [0]  # the largest batch seen pending
    stop = False

    def sample() -> None:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            while not stop:
                try:
                    total, largest = conn.execute("SELECT coalesce(sum(last - first + 1), 0), "
                                                  "coalesce(max(last - first + 1), 0) FROM pending").fetchone()
                    sampled.append(total)
                    batches[0] = max(batches[0], largest)
                except sqlite3.OperationalError:  # not created yet
                    pass
                time.sleep(0.002)
        finally:
            conn.close()

    import threading

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for i in range(3000):
            sensor.client.publish(TOPIC, b"%d" % i, 0)
        sensor.publish(TOPIC, b"last", 1)
        recorder = broker.plugin.service.recorder
        wait_for(lambda: recorder.captured >= 3002 and recorder.shipped == recorder.captured, "every decision stored")
    finally:
        stop = True
        sampler.join(10)
    # Stored whole while traffic ran (not indexed at once), and never more pending than the backlog allows
    # after a write, plus the batch just written before the writer indexes its way back under it.
    assert max(sampled) > 0
    assert max(sampled) <= 300 + batches[0], (max(sampled), batches[0])
    # Quiet now: the writer indexes the rest itself (nothing opens the store through AssertionStore here).
    wait_for(lambda: raw_count(db, "pending") == 0, "the backlog indexed while the broker is quiet")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        published = conn.execute("SELECT count(*) FROM records WHERE action = 'publish' AND topic = ?",
                                 (TOPIC,)).fetchone()[0]
    assert published == 3001
    assert cli("log", "verify", "--db", str(db)).returncode == 0


def test_steady_light_traffic_is_indexed_while_it_runs(broker, connect) -> None:
    """A batch every 50 ms never leaves the writer a quiet moment; the broker's light load does, and the
    records reach the index while traffic goes on (nothing but the writer indexes here)."""
    import threading

    from tests.support import wait_for

    db = Path(broker.plugin.service.settings.assertion_db)
    sensor = connect("sensor-1")
    stop = threading.Event()

    def publish() -> None:
        i = 0
        while not stop.wait(0.02):
            sensor.client.publish(TOPIC, b"%d" % i, 0)
            i += 1

    def indexed() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT count(*) FROM records WHERE action = 'publish'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        wait_for(lambda: indexed() >= 40, "records indexed while the traffic runs")
        assert publisher.is_alive()
    finally:
        stop.set()
        publisher.join(10)


def test_pending_rows_with_any_columns_edited_never_stop_indexing(tmp_path: Path) -> None:
    """Columns an attacker set to text or numbers of the wrong kind: each such row is set aside once, the others are indexed."""
    db, writer = pending_batches(tmp_path, 4, 5)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE pending SET first = 'six' WHERE first = 6")
        conn.execute("UPDATE pending SET last = 'x', prev_hash = 7 WHERE first = 11")
    store = AssertionStore(db)
    assert store.pending_records() == 0 and raw_count(db, "pending") == 0
    # The unreadable one is set aside; the other is indexed as it now reads (prev_hash '7'), and verify says so.
    assert sorted(r.seq for r in stored_records(db)) == [*range(1, 6), *range(11, 21)]
    assert raw_count(db, "unindexable") == 1
    store.close()
    result = cli("log", "verify", "--db", str(db))
    assert "record(s) n1:6..10 missing before n1:11" in result.stdout, result.stdout
    assert "n1:16 does not follow the previous record" in result.stdout  # 11..15 rechained from '7'
    assert result.returncode == 1
    writer.close()


@pytest.mark.parametrize("value", [{"x": 1}, 2**63, float("nan"), "\ud800"], ids=["object", "int64+1", "nan", "surrogate"])
def test_a_forged_pending_row_never_stops_indexing_or_the_writer(tmp_path: Path, value) -> None:
    """Found by an outside attack: a row whose values decode but cannot be stored (an object, an integer past
    SQLite's, ...) rolled indexing back for ever, hid every later record from verify (which said intact),
    and one past SQLite's integers killed the writer at every restart."""
    db, writer = pending_batches(tmp_path, 3, 5)
    forged = json.dumps([[[time.time(), 1, value, None, "publish", "t", True, None, "r", None, 0, None]],
                         [[1, [None] * 9]]]).encode()
    with sqlite3.connect(db) as conn:  # node '!' sorts before every real one: indexed first
        conn.execute("INSERT INTO pending VALUES ('!', 1, 1, ?, ?, 'forged', ?)", ("0" * 64, "0" * 64, forged))
    assert writer.index(None) == 16
    assert (raw_count(db, "pending"), raw_count(db, "unindexable"), raw_count(db, "records")) == (0, 1, 15)
    writer.close()
    again = writer_for(tmp_path, db, 1_000_000)  # a restarted writer starts and records
    again.write(hostile_rows(5, time.time()), SESSIONS, "b3")
    again.close()
    result = cli("log", "verify", "--db", str(db))
    assert result.returncode == 1
    assert "BROKEN: node !: records !:1..1 were stored as a batch that cannot be read or stored" in result.stdout
    assert "ok: node n1: 20 records, chain intact" in result.stdout


def test_an_edited_range_does_not_make_pending_batches_look_indexed(tmp_path: Path) -> None:
    """Found by an outside attack: readers skipped indexing when the sum of the pending ranges was 0, and one
    edited cell made it so: verify said intact over a quarter of the records."""
    db, writer = pending_batches(tmp_path, 4, 10)
    writer.index(1)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE pending SET last = first - 1 - (SELECT sum(last - first + 1) FROM pending p2 WHERE "
                     "p2.first != pending.first) WHERE first = (SELECT max(first) FROM pending)")
    result = cli("log", "verify", "--db", str(db))
    # Every record is indexed and the chain is whole; the edited range itself is named (altered_batches).
    assert (result.returncode, result.stdout.splitlines()) == (1, [
        "BROKEN: node n1: the stored batch n1:31..10 was altered in the database before it was indexed: its row "
        "says it ends at n1:10 with hash " + stored_records(db)[-1].hash[:12] + ", its records end at n1:40 with "
        "hash " + stored_records(db)[-1].hash[:12] + " (indexed as they read)"]), result
    assert raw_count(db, "pending") == 0 and len(stored_records(db)) == 40
    writer.close()


@pytest.mark.parametrize("edit", ["UPDATE pending SET body = x'00ff' WHERE first = 31",
                                  "UPDATE pending SET first = 'z' WHERE first = 31",
                                  "DELETE FROM pending WHERE first = 31"], ids=["unreadable", "renumbered", "deleted"])
def test_the_newest_pending_batch_edited_or_deleted_is_named_without_signed_heads(tmp_path: Path, edit: str) -> None:
    """Found by an outside attack: with nothing after it to break the chain, plain verify said intact. The
    chain head the writer stored with the batch names where the chain must end."""
    db, writer = pending_batches(tmp_path, 4, 10)
    with sqlite3.connect(db) as conn:
        conn.execute(edit)
    result = cli("log", "verify", "--db", str(db))
    assert result.returncode == 1, result
    assert "BROKEN: node n1: records n1:31..40 missing at the end: the chain head its writer stored names n1:40" \
        in result.stdout
    writer.close()


def test_the_newest_pending_batch_rewritten_is_named_without_signed_heads(tmp_path: Path) -> None:
    db, writer = pending_batches(tmp_path, 4, 10)
    retopic(db, 31, 0, "t/innocent")
    result = cli("log", "verify", "--db", str(db))
    assert result.returncode == 1, result
    assert "BROKEN: node n1: n1:40 differs from the chain head its writer stored with it: its batch was altered " \
           "in the database" in result.stdout
    writer.close()


@pytest.mark.parametrize("value", ["abc", "99999999999999999999999 ab", "9223372036854775800 ab"],
                         ids=["text", "past-int64", "near-int64"])
def test_a_stored_chain_head_edited_in_the_database_neither_stops_nor_stalls_the_writer(tmp_path: Path,
                                                                                         value: str) -> None:
    """Found by an outside attack: one edited ``meta`` value kept the broker's writer from starting, or had
    it continue past SQLite's integers and fail every batch; verify crashed on it or said intact."""
    db, writer = pending_batches(tmp_path, 2, 5)
    writer.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'head:n1'", (value,))
    result = cli("log", "verify", "--db", str(db))
    assert result.returncode == 1, result
    assert "BROKEN: node n1: the chain head stored for node n1 is not a chain head (edited in the database)" \
        in result.stdout
    again = writer_for(tmp_path, db, 1_000_000)  # starts, and goes on after the records it finds
    assert again.write(hostile_rows(5, time.time()), SESSIONS, "b9") == 5
    again.close()
    assert sorted(r.seq for r in stored_records(db)) == list(range(1, 16))


def test_a_forged_pending_row_after_the_newest_batch_is_named(tmp_path: Path) -> None:
    """Found by an outside attack: a copy of the newest stored batch renumbered after it indexed into a chain
    of its own, and verify said intact (the writer's stored head names where the chain ends)."""
    db, writer = pending_batches(tmp_path, 4, 10)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO pending SELECT node, 41, 50, hash, hash, 'x', body FROM pending WHERE first = 31")
    result = cli("log", "verify", "--db", str(db))
    assert result.returncode == 1, result
    assert "BROKEN: node n1: records n1:41..50 come after the chain head their writer stored (n1:40): not " \
           "written by it" in result.stdout
    writer.close()


def test_follow_prints_each_record_once_when_a_batch_is_indexed_after_a_newer_one(tmp_path: Path) -> None:
    """Found by an outside attack: --follow resumed after the newest record's rowid, and a batch indexed after a
    newer one stored directly (past the backlog) has older records under higher rowids: printed again."""
    import subprocess
    import sys

    db = tmp_path / "a.db"
    writer = writer_for(tmp_path, db, 5)  # a batch of 5 fills the backlog: the next one goes in directly
    writer.write(hostile_rows(5, time.time() - 50), SESSIONS, "b0")
    writer.index(None)
    follow = subprocess.Popen([sys.executable, "-m", "pdp.cli", "log", "query", "--db", str(db), "--follow",
                               "--format", "jsonl"], cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        first = [follow.stdout.readline() for _ in range(5)]
        writer.write(hostile_rows(5, time.time() - 20), SESSIONS, "b1")  # stored whole, indexed by the follower
        writer.write(hostile_rows(5, time.time() - 10), SESSIONS, "b2")  # newer, into the records at once
        later = [follow.stdout.readline() for _ in range(10)]
        time.sleep(1.5)  # three more polls: a repeat would be printed by now
    finally:
        follow.terminate()
        rest, _ = follow.communicate(timeout=10)
    seqs = [json.loads(line)["seq"] for line in first + later + rest.splitlines() if line.strip()]
    assert sorted(seqs) == list(range(1, 16)), seqs
    writer.close()
