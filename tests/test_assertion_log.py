"""The assertion store on its own: tamper evidence, every query filter, spooling, retention, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pdp.cli.log_commands import TABLE_COLUMNS
from pdp.core.admission import Admission
from pdp.core.engine import decision_for
from pdp.core.identity import CertificateInfo
from pdp.evidence.chain import ChainWriter
from pdp.evidence.record import FIELD_NAMES, SinkError
from pdp.evidence.recorder import AssertionRecorder
from pdp.evidence.sinks import SpoolingSink, SqliteSink
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.registry.device import Device

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def admission(device_id: str, dtype: str = "sensor") -> Admission:
    cert = CertificateInfo(fingerprint_sha256=f"{device_id:0>64}"[-64:], serial="abc", issuer="CN=unit CA",
                           subject=f"CN={device_id}", not_before=T0, not_after=T0, uris=(), common_name=device_id)
    device = Device(device_id, dtype, "plant-a", "test", "qa", "active")
    return Admission(True, "identity verified", None, device, None, cert)


# (device, action, topic, allowed, rule)
SCRIPT = [
    ("s1", "connect", None, True, None),
    ("s1", "publish", "sites/plant-a/s1/telemetry", True, "pub"),
    ("s1", "publish", "sites/plant-a/s2/telemetry", False, None),
    ("s2", "subscribe", "sites/plant-a/#", False, "no-wide"),
    ("s2", "subscribe", "sites/plant-a/s2/cmd", True, "sub"),
    ("d1", "receive", "sites/plant-a/s1/telemetry", True, "recv"),
    ("d1", "receive", "sites/plant-a/secret/k", False, "secrets"),
    ("d1", "receive", "$SYS/broker/uptime", False, None),
]


def write_log(db: Path, spool: Path, node: str = "n1", script=SCRIPT, revision: str = "rev1") -> None:
    async def run() -> None:
        recorder = AssertionRecorder(ChainWriter(node, [SpoolingSink(SqliteSink(db), spool)], spool))
        recorder.start()
        for device_id, action, topic, allowed, rule in script:
            adm = admission(device_id, "dashboard" if device_id.startswith("d") else "sensor")
            decision = decision_for(allowed, rule)
            if action == "connect":
                recorder.connect(adm, device_id, "127.0.0.1:5000", revision)
            else:
                recorder.decision(adm, f"{device_id}-client", "127.0.0.1:5000", action, topic, decision, "index",
                                  1500, revision)
            await asyncio.sleep(0.001)  # distinct timestamps
        await recorder.close()

    asyncio.run(run())


@pytest.fixture
def log_db(tmp_path: Path) -> Path:
    db = tmp_path / "a.db"
    write_log(db, tmp_path / "spool")
    return db


def ids(db: Path, **filters) -> list[int]:
    store = AssertionStore(db, readonly=True)
    try:
        return [record.seq for _, record in store.query(QueryFilters(**filters))]
    finally:
        store.close()


def test_each_filter_returns_exactly_the_expected_records(log_db: Path) -> None:
    assert ids(log_db) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ids(log_db, device="s2") == [4, 5]
    assert ids(log_db, client_id="d1-client") == [6, 7, 8]
    assert ids(log_db, fingerprint=f"{'s1':0>64}") == [1, 2, 3]
    assert ids(log_db, action="receive") == [6, 7, 8]
    assert ids(log_db, decision="deny") == [3, 4, 7, 8]
    assert ids(log_db, rule_id="secrets") == [7]
    assert ids(log_db, policy_revision="rev1") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ids(log_db, policy_revision="rev2") == []
    assert ids(log_db, node="n1") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ids(log_db, topic="sites/+/s1/#") == [2, 6]
    assert ids(log_db, topic="sites/plant-a/s2/telemetry") == [3]
    assert ids(log_db, topic="sites/plant-a/#") == [2, 3, 4, 5, 6, 7]  # subscribe filters it covers count too
    assert ids(log_db, topic="#") == [2, 3, 4, 5, 6, 7]  # '#' never selects $SYS
    assert ids(log_db, topic="$SYS/#") == [8]
    store = AssertionStore(log_db, readonly=True)
    ts = [r.ts for _, r in store.query(QueryFilters())]
    assert ids(log_db, since=ts[4]) == [5, 6, 7, 8]
    assert ids(log_db, until=ts[4]) == [1, 2, 3, 4]
    assert ids(log_db, since=ts[2], until=ts[5], decision="deny") == [3, 4]


def test_verify_catches_modified_deleted_and_reordered_records(tmp_path: Path, log_db: Path) -> None:
    def tampered(sql: str, *params) -> list:
        copy = tmp_path / f"t{abs(hash(sql))}.db"
        copy.write_bytes(log_db.read_bytes())
        with sqlite3.connect(copy) as db:
            if params:
                db.execute(sql, params)
            else:
                db.executescript(sql)
        store = AssertionStore(copy, readonly=True)
        return [(r.problem, r.record_id) for r in store.verify()]

    assert [r.problem for r in AssertionStore(log_db, readonly=True).verify()] == [None]
    assert tampered("UPDATE records SET decision = 'allow' WHERE seq = 7") == [
        ("n1:7 was altered (its hash does not match its content)", "n1:7")]
    assert tampered("DELETE FROM records WHERE seq = 4") == [("record(s) n1:4 missing before n1:5", "n1:5")]
    # Reordered: records 3 and 4 exchange their places in the sequence.
    assert tampered("UPDATE records SET seq = -1, record_id = 'n1:4' WHERE seq = 3;"
                    "UPDATE records SET seq = 3, record_id = 'n1:3' WHERE seq = 4;"
                    "UPDATE records SET seq = 4 WHERE seq = -1;") == [
        ("n1:3 does not follow the previous record (removed, reordered or replaced)", "n1:3")]
    # A record rewritten with a recomputed hash still breaks the link to its successor.
    from pdp.evidence.record import record_hash

    store = AssertionStore(log_db, readonly=True)
    (_, original), = list(store.query(QueryFilters(action="connect")))
    forged = original._replace(reason="forged")
    forged = forged._replace(hash=record_hash(forged))
    assert tampered("UPDATE records SET reason = 'forged', hash = ? WHERE seq = 1", forged.hash) == [
        ("n1:2 does not follow the previous record (removed, reordered or replaced)", "n1:2")]


def test_chain_continues_across_restarts_and_prune_keeps_it_verifiable(tmp_path: Path) -> None:
    db, spool = tmp_path / "a.db", tmp_path / "spool"
    write_log(db, spool)
    write_log(db, spool)  # a restarted broker: same node, same spool directory
    store = AssertionStore(db)
    assert [r.seq for _, r in store.query(QueryFilters())] == list(range(1, 17))
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, 16)]
    cutoff = [r.ts for _, r in store.query(QueryFilters())][10]
    assert store.prune(cutoff) == 10
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, 6)]


def test_second_broker_with_same_node_and_spool_is_refused(tmp_path: Path) -> None:
    first = ChainWriter("n1", [], tmp_path)
    with pytest.raises(SinkError, match="another broker already records as node 'n1'"):
        ChainWriter("n1", [], tmp_path)
    first.close()


class FlakySink:
    name = "flaky"

    def __init__(self) -> None:
        self.up = False
        self.records: list = []

    def write(self, records, batch_id=None) -> None:
        if not self.up:
            raise SinkError("down")
        self.records.extend(records)

    def close(self) -> None:
        pass


def test_spool_keeps_order_and_says_so_loudly_when_it_cannot_be_written(tmp_path: Path, caplog) -> None:
    from tests.test_assertion_log import admission as adm

    caplog.set_level(logging.WARNING)
    inner = FlakySink()
    sink = SpoolingSink(inner, tmp_path / "spool", retry_interval=0)  # type: ignore[arg-type]
    (tmp_path / "spool" / "flaky.jsonl").mkdir()  # the spool file cannot be created

    recorder_records = []

    async def make(n: int) -> list:
        writer = ChainWriter(f"n{n}", [], tmp_path / f"state{n}")
        recorder = AssertionRecorder(writer)
        for i in range(n):
            recorder.decision(adm("s1"), "c", None, "publish", f"t/{i}", decision_for(True, "r"), "l1", 10, "rev")
        records = writer.materialize(*recorder._rows(list(recorder._queue)))
        writer.close()
        return records

    recorder_records = asyncio.run(make(6))
    # Neither the sink nor the spool takes the batch: the caller (the broker) must keep it, so it is told.
    with pytest.raises(SinkError, match="flaky and its spool .* are both unavailable"):
        sink.write(recorder_records[:2], "b1")
    assert sink.spool_failures == 1 and inner.records == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [
        f"flaky: cannot write the spool {tmp_path / 'spool' / 'flaky.jsonl'} ([Errno 21] Is a directory: "
        f"'{tmp_path / 'spool' / 'flaky.jsonl'}'); batch b1 (2 records) stays with the broker, which sends it again"]
    (tmp_path / "spool" / "flaky.jsonl").rmdir()
    sink.write(recorder_records[:2], "b1")  # the broker sends the batch again; now it is spooled
    sink.write(recorder_records[2:4], "b2")  # behind it
    assert sink.backlog and inner.records == [] and sink.spooled == 4
    inner.up = True
    sink.write(recorder_records[4:], "b3")
    assert [r.topic for r in inner.records] == [f"t/{i}" for i in range(6)]
    assert inner.records == recorder_records
    assert not sink.backlog


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_log_cli_query_formats_stats_and_verify(log_db: Path, tmp_path: Path) -> None:
    result = run_cli("log", "query", "--db", str(log_db), "--decision", "deny", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [3, 4, 7, 8]
    assert lines[0]["timestamp"].endswith("Z") and lines[0]["fingerprint"] == f"{'s1':0>64}"
    result = run_cli("log", "query", "--db", str(log_db), "--device", "d1", "--format", "csv")
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["timestamp", *FIELD_NAMES]
    assert [(row["seq"], row["device_id"], row["topic"], row["decision"]) for row in table] == [
        ("6", "d1", "sites/plant-a/s1/telemetry", "allow"), ("7", "d1", "sites/plant-a/secret/k", "deny"),
        ("8", "d1", "$SYS/broker/uptime", "deny")]
    result = run_cli("log", "query", "--db", str(log_db), "--topic", "sites/+/secret/#")
    assert result.returncode == 0
    header, row = result.stdout.splitlines()
    assert header.split() == [c.upper() for c in TABLE_COLUMNS]
    assert row.split()[1:] == ["d1", "d1-client", "receive", "sites/plant-a/secret/k", "deny", "secrets", "denied",
                               "by", "rule", "secrets", "index"]
    result = run_cli("log", "query", "--db", str(log_db), "--since", "1h", "--limit", "2")
    lines = result.stdout.splitlines()  # a header, then the two newest records, oldest first
    assert [line.split()[4] for line in lines[1:]] == ["sites/plant-a/secret/k", "$SYS/broker/uptime"]
    assert len(lines) == 3
    stats = run_cli("log", "stats", "--db", str(log_db), "--since", "30d")
    assert stats.returncode == 0, stats.stderr
    out = [line.split() for line in stats.stdout.splitlines()[1:]]
    assert out == [
        ["connect", "allow", "1"], ["publish", "allow", "1"], ["publish", "deny", "1"], ["receive", "allow", "1"],
        ["receive", "deny", "2"], ["subscribe", "allow", "1"], ["subscribe", "deny", "1"],
        ["top", "denied", "devices:"], ["d1", "2"], ["s1", "1"], ["s2", "1"],
        ["top", "denied", "topics:"], ["$SYS/broker/uptime", "1"], ["sites/plant-a/#", "1"],
        ["sites/plant-a/s2/telemetry", "1"], ["sites/plant-a/secret/k", "1"],
        ["refused", "connects:"], ["none"]]
    ok = run_cli("log", "verify", "--db", str(log_db))
    assert ok.returncode == 0 and "ok: node n1: 8 records, chain intact" in ok.stdout
    with sqlite3.connect(log_db) as db:
        db.execute("DELETE FROM records WHERE seq = 2")
    broken = run_cli("log", "verify", "--db", str(log_db))
    assert broken.returncode == 1 and "record(s) n1:2 missing before n1:3" in broken.stdout
    for bad, message in [(("--since", "yesterday"), "cannot read time"), (("--topic", "a/#/b"), "'#' must be"),
                         (("--db", str(tmp_path / "none.db")), "no assertion database")]:
        result = run_cli("log", "query", *bad) if bad[0] == "--db" else run_cli("log", "query", "--db", str(log_db), *bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_log_query_follow_prints_new_records(log_db: Path, tmp_path: Path) -> None:
    import queue
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "pdp.cli", "log", "query", "--db", str(log_db), "--follow",
                             "--format", "jsonl", "--action", "publish"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        first = [json.loads(lines.get(timeout=20)) for _ in range(2)]
        assert [r["seq"] for r in first] == [2, 3]
        write_log(log_db, tmp_path / "spool2", node="n2")  # another broker's records arrive
        followed = [json.loads(lines.get(timeout=20)) for _ in range(2)]
        assert [(r["node"], r["seq"]) for r in followed] == [("n2", 2), ("n2", 3)]
    finally:
        proc.terminate()
        proc.wait(10)
