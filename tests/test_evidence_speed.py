"""What the fast paths of the store rely on, pinned: verify's SQL-joined hash text equals record_hash for
hostile values, and the GLOB prefilter of a wildcard topic query never drops a record the filter selects."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from pdp.core.topics import covers, matches
import pdp.evidence.store as store_module
from pdp.evidence.chain import ChainWriter
from pdp.evidence.record import AssertionRecord, ChainedBatch, chained, record_hash
from pdp.evidence.sinks import SqliteSink
from pdp.evidence.store import AssertionStore, QueryFilters, _glob


def test_verify_hashes_hostile_values_as_the_writer_did_and_catches_each_altered_column(tmp_path: Path) -> None:
    writer = ChainWriter("n1", [SqliteSink(tmp_path / "a.db")], tmp_path / "s")
    sessions = {1: ("dev\x00x", None, "0a", "CN=\u00fc ca\u2028", None, "[*?]", None, None, None)}
    rows = [(1.5, 1, "c\x00lient\U0001F600", None, "publish", "t/\x00/x", True, None, "r\x1fea\nson", None, 0, None),
            (1700000000.123456789, 1, None, "1.2.3.4:5", "subscribe", None, False, "rule", "x", "l1", 1234567, "rev"),
            (1.0e-7, 1, "", "", "receive", "", True, "", "", "index", 1, "")]
    writer.write(rows, sessions, "b:1")
    writer.close()
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    records = [r for _, r in store.query(QueryFilters())]
    assert all(record_hash(r) == r.hash for r in records)
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, 3)]
    store.close()
    for column in ("client_id", "device_id", "issuer", "location", "topic", "reason", "cache_tier", "peer", "ts",
                   "latency_us", "policy_revision"):
        altered = tmp_path / f"{column}.db"
        altered.write_bytes((tmp_path / "a.db").read_bytes())
        with sqlite3.connect(altered) as db:
            db.execute(f"UPDATE records SET {column} = 'altered' WHERE seq = 2")
        db.close()
        problems = AssertionStore(altered).verify()[0].problems
        assert problems == (("n1:2 was altered (its hash does not match its content)", "n1:2"),), column


def test_a_batch_built_lazily_is_the_batch_chained_gives_read_any_way() -> None:
    """The writer builds only the first and last record of a batch a store keeps whole; a sink that reads
    more (the spool, the stream, a direct insert) must get exactly the chained records, hashes included."""
    sessions = {1: ("dev\x00x", None, "0a", "CN=\u00fc ca", None, "[*?]", None, None, None), 2: ("d2",) + (None,) * 8}
    rows = [(1.5 + i, 1 + i % 2, None if i % 3 else f"c{i}\n", "1.2.3.4:5", "receive", f"t/{i}", [True, False, None][i % 3],
             None, "why", "l1" if i % 2 else None, i * 1001, "rev") for i in range(7)]
    full = chained("n1", 40, "ab" * 32, rows, sessions)
    assert all(record_hash(r) == r.hash for r in full)
    for read in (lambda b: b[0], lambda b: b[-1], lambda b: b[6], lambda b: b[3], lambda b: b[2:5], list,
                 lambda b: [r.hash for r in b], len):
        expected = read(full)
        assert read(ChainedBatch("n1", 40, "ab" * 32, rows, sessions)) == expected
    lazy = ChainedBatch("n1", 40, "ab" * 32, rows, sessions)
    assert (lazy[0], lazy[-1], lazy[1], lazy[-1]) == (full[0], full[-1], full[1], full[-1])  # before and after building
    with pytest.raises(ValueError):
        ChainedBatch("n1", 0, "0" * 64, [], {})


def test_glob_prefilter_keeps_everything_the_filter_selects() -> None:
    levels = ["a", "b", "", "+", "#", "*", "?", "[x]", "$s"]
    topics = ["/".join(p) for n in (1, 2, 3) for p in itertools.product(levels, repeat=n)]
    db = sqlite3.connect(":memory:")
    for query in topics:
        if "#" in query[:-1] or any(("#" in lv or "+" in lv) and lv not in ("#", "+") for lv in query.split("/")):
            continue  # not a valid filter
        if "+" not in query and "#" not in query:
            continue
        pattern = _glob(query)
        for topic in topics:
            wild = "+" in topic or "#" in topic
            if "#" in topic[:-1] and wild:
                continue
            try:
                selected = covers(query, topic) if wild else matches(query, topic)
            except ValueError:
                continue
            if selected:
                assert db.execute("SELECT ? GLOB ?", (topic, pattern)).fetchone()[0] == 1, (query, topic, pattern)


@pytest.mark.parametrize("deleted", ["seq BETWEEN 2 AND 120", "seq <= 160", "seq > 30 AND seq < 199"])
def test_verify_in_parallel_parts_after_large_deletions_reports_what_one_walk_does(tmp_path: Path, monkeypatch,
                                                                                  deleted: str) -> None:
    """Parts are cut by sequence number: a deleted range over a cut must neither crash nor change the report."""
    writer = ChainWriter("n1", [SqliteSink(tmp_path / "a.db")], tmp_path / "s")
    session = {1: ("d1", "ab" * 32, "0a", "CN=ca", "sensor", "x", "y", "z", "active")}
    writer.write([(1.0e9 + i, 1, "c1", None, "publish", f"t/{i}", True, "r", "ok", "l1", 900, "rev")
                  for i in range(200)], session, "b:1")
    writer.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute(f"DELETE FROM records WHERE {deleted}")
    db.close()
    one = _one_walk_equals_parts(tmp_path / "a.db", monkeypatch)
    assert one[0].problems and one[0].problems[0][0].startswith("record(s) n1:")


def _one_walk_equals_parts(db: Path, monkeypatch) -> list:
    """Verify as one walk, then split in parts on four cores: the reports must be the same."""
    import pdp.evidence.store as store_module

    store = AssertionStore(db, readonly=True)
    one = store.verify()
    monkeypatch.setattr(store_module, "PARALLEL_WALK", 10)
    monkeypatch.setattr(store_module.os, "cpu_count", lambda: 4)
    parts = store.verify()
    store.close()
    assert parts == one
    return one


def test_verify_in_parallel_parts_reports_exactly_what_one_walk_does(tmp_path: Path, monkeypatch) -> None:
    writer = ChainWriter("n1", [SqliteSink(tmp_path / "a.db")], tmp_path / "s")
    session = {1: ("d1", "ab" * 32, "0a", "CN=ca", "sensor", "x", "y", "z", "active")}
    for batch in range(8):
        rows = [(1.0e9 + i, 1, "c1", None, "publish", f"t/{i}", True, "r", "ok", "l1", 900, "rev")
                for i in range(batch * 25, batch * 25 + 25)]
        writer.write(rows, session, f"b:{batch}")
    writer.close()
    with sqlite3.connect(tmp_path / "a.db") as db:  # a break in several parts, one on a part boundary
        db.execute("UPDATE records SET topic = 'forged' WHERE seq IN (7, 101, 150)")
        db.execute("DELETE FROM records WHERE seq IN (51, 52, 120)")
    db.close()
    one = _one_walk_equals_parts(tmp_path / "a.db", monkeypatch)
    assert one[0].records == 197 and one[0].checked == 6 and len(one[0].problems) == 5


def _record(node: str, seq: int, device: str | None, topic: str | None, rule: str | None = "r1") -> AssertionRecord:
    return AssertionRecord(f"{node}:{seq}", node, seq, 1.0e9 + seq, device, device, None, None, None, None, None, None,
                           None, None, "publish", topic, "allow", rule, "ok", "rev", "l1", 1.0, None, "0" * 64, "0" * 64)


def _earlier_store(path: Path) -> None:
    """A database as versions before the block index created it: the five indexes on the records."""
    store = AssertionStore(path)
    store.db.executescript("DROP INDEX records_block; DROP INDEX records_time;" + store_module.EARLIER_INDEXES)
    store.close()


def test_queries_by_device_and_topic_find_records_in_every_block_of_every_node(tmp_path: Path) -> None:
    """The block index is only a shortcut: a record is found whatever its block, node or the store's indexes."""
    size = 1 << store_module.BLOCK_BITS
    blocks = [1, size - 1, size, size + 1, 3 * size + 5]
    records = [_record(node, seq, f"d{seq % 3}", f"s/{seq % 2}/t", f"r{seq % 4}")
               for node, offset in (("n1", 0), ("n2", 7)) for seq in [b + offset for b in blocks]]
    records.append(_record("n3", 10 * size, None, None))
    queries = [QueryFilters(device="d1"), QueryFilters(client_id="d2"), QueryFilters(device="d0", node="n2"),
               QueryFilters(topic="s/1/t"), QueryFilters(topic="s/+/t"), QueryFilters(topic="#", node="n1"),
               QueryFilters(rule_id="r3"), QueryFilters(device="nobody"), QueryFilters(node="n3")]

    def expected(f: QueryFilters) -> list[str]:
        return sorted(r.record_id for r in records
                      if (f.device is None or r.device_id == f.device) and (f.client_id is None or r.client_id == f.client_id)
                      and (f.node is None or r.node == f.node) and (f.rule_id is None or r.rule_id == f.rule_id)
                      and (f.topic is None or (r.topic is not None and matches(f.topic, r.topic))))

    answers = []
    for name, earlier in (("new.db", False), ("earlier.db", True)):
        if earlier:
            _earlier_store(tmp_path / name)
        store = AssertionStore(tmp_path / name)
        assert store.unblocked == earlier
        store.insert(records)
        answers.append([sorted(r.record_id for _, r in store.query(f)) for f in queries])
        if earlier:
            assert store.reindex() and not store.unblocked and not store.reindex()
            names = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                                        "AND tbl_name = 'records' AND sql IS NOT NULL")}
            assert names == {"records_block", "records_time"}
            answers.append([sorted(r.record_id for _, r in store.query(f)) for f in queries])
        store.close()
    assert answers[0] == [expected(f) for f in queries]
    assert answers[0] == answers[1] == answers[2]
    assert all(answers[0][:-2]) and answers[0][-2] == []


def test_a_store_of_an_earlier_version_keeps_its_indexes_records_and_verifies(tmp_path: Path) -> None:
    _earlier_store(tmp_path / "a.db")
    writer = ChainWriter("n1", [SqliteSink(tmp_path / "a.db")], tmp_path / "s")
    session = {1: ("d1", "ab" * 32, "0a", "CN=ca", "sensor", "x", "y", "z", "active")}
    writer.write([(1.0e9, 1, "c1", None, "publish", "t/1", True, "r", "ok", "l1", 900, "rev")], session, "b:1")
    writer.close()
    store = AssertionStore(tmp_path / "a.db")
    assert store.unblocked
    assert [(r.problem, r.records) for r in store.verify()] == [(None, 1)]
    assert store.reindex()
    assert [(r.problem, r.records) for r in store.verify()] == [(None, 1)]
    store.close()


def test_an_in_flight_batch_kept_as_the_brokers_frame_is_read_back(tmp_path: Path) -> None:
    """The writer keeps the pickled frame it received instead of pickling the batch again."""
    import pickle

    from pdp.evidence.chain import ChainState
    from pdp.evidence.record import Head

    rows = [(1.0e9, 1, "c1", None, "publish", "t/1", True, "r", "ok", "l1", 900, "rev")]
    sessions = {1: ("d1", None, None, None, None, None, None, None, None)}
    state = ChainState(tmp_path, "n1")
    state.save_inflight(Head(4, "h" * 64), "i:1", rows, sessions,
                        pickle.dumps(("batch", rows, sessions, "i:1"), pickle.HIGHEST_PROTOCOL))
    assert state.load_inflight() == (4, "h" * 64, "i:1", rows, sessions)
    state.save_inflight(Head(5, "g" * 64), "i:2", rows, sessions)  # without a frame: pickled here, as before
    assert state.load_inflight() == (5, "g" * 64, "i:2", rows, sessions)
    state.close()


def test_log_reindex_command_converts_once(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    _earlier_store(tmp_path / "a.db")

    def reindex() -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "pdp.cli", "log", "reindex", "--db", str(tmp_path / "a.db")],
                              cwd=root, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(root)})
        return done.returncode, done.stdout

    assert reindex() == (0, f"{tmp_path / 'a.db'}: indexes of an earlier version replaced by this version's\n")
    assert reindex() == (0, f"{tmp_path / 'a.db'}: already has this version's indexes\n")


def test_queries_by_client_and_fingerprint_find_records_whose_device_is_empty_or_missing(tmp_path: Path) -> None:
    """``identities`` keeps '' for both an empty and a missing device: a query by client id or fingerprint must
    still find records of each (an empty device id was missed, as only ``device_id IS NULL`` was asked)."""
    fingerprint = "f" * 64
    records = [_record("n1", seq, device, "t")._replace(client_id="shared", fingerprint=fingerprint)
               for seq, device in ((1, ""), (2, None), (3, "d1"))]
    records.append(_record("n1", 4, "", "t")._replace(client_id="other", fingerprint="e" * 64))
    store = AssertionStore(tmp_path / "a.db")
    store.insert(records)
    for filters in (QueryFilters(client_id="shared"), QueryFilters(fingerprint=fingerprint)):
        assert sorted(r.seq for _, r in store.query(filters)) == [1, 2, 3]
    assert [r.seq for _, r in store.query(QueryFilters(client_id="other"))] == [4]
    store.close()


@pytest.mark.parametrize("parallel", [False, True])
def test_verify_all_checks_identities_beside_the_parallel_walk(tmp_path: Path, monkeypatch, parallel: bool) -> None:
    """The identities check runs in this process while the workers walk (``verify_all``): a deleted
    identities row must be named exactly as the check on its own names it, in parts or in one walk."""
    import pdp.evidence.store as store_module

    writer = ChainWriter("n1", [SqliteSink(tmp_path / "a.db")], tmp_path / "s")
    sessions = {k: (f"d{k}", f"{k:064x}", "0a", "CN=ca", "sensor", "x", "y", "z", "active") for k in range(1, 4)}
    writer.write([(1.0e9 + i, 1 + i % 3, f"d{1 + i % 3}", None, "publish", f"t/{i}", True, "r", "ok", "l1", 900,
                   "rev") for i in range(200)], sessions, "b:1")
    writer.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("DELETE FROM identities WHERE device_id = 'd2'")
    db.close()
    if parallel:
        monkeypatch.setattr(store_module, "PARALLEL_WALK", 10)
        monkeypatch.setattr(store_module.os, "cpu_count", lambda: 2)
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    walking, checked_while_walking = [False], []
    walk_node, check = store._walk_node, store.check_identities

    def walk_node_spy(*args):
        walking[0] = True
        try:
            return walk_node(*args)
        finally:
            walking[0] = False

    def check_spy(*args):
        checked_while_walking.append(walking[0])
        return check(*args)

    monkeypatch.setattr(store, "_walk_node", walk_node_spy)
    monkeypatch.setattr(store, "check_identities", check_spy)
    reports, problems = store.verify_all()
    alone = check()
    store.close()
    assert [r.problem for r in reports] == [None]
    assert problems == alone and len(alone) == 1 and "device d2, client d2" in alone[0]
    assert checked_while_walking == [parallel]  # beside the workers' walk; after a walk in one piece
