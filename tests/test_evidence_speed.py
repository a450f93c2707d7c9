"""What the fast paths of the store rely on, pinned: verify's SQL-joined hash text equals record_hash for
hostile values, and the GLOB prefilter of a wildcard topic query never drops a record the filter selects."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

from pdp.core.topics import covers, matches
from pdp.evidence.chain import ChainWriter
from pdp.evidence.record import record_hash
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


def test_verify_in_parallel_parts_reports_exactly_what_one_walk_does(tmp_path: Path, monkeypatch) -> None:
    import pdp.evidence.store as store_module

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
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    one = store.verify()
    monkeypatch.setattr(store_module, "PARALLEL_WALK", 10)
    monkeypatch.setattr(store_module.os, "cpu_count", lambda: 4)
    parts = store.verify()
    store.close()
    assert parts == one
    assert one[0].records == 197 and one[0].checked == 6 and len(one[0].problems) == 5
