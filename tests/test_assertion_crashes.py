"""The assertion writer under crashes: each batch stored exactly once, sequence numbers never reused,
torn spool lines set aside, and the hash format pinned by fixed vectors."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from pdp.evidence.chain import ChainWriter
from pdp.evidence.record import (
    GENESIS,
    AssertionRecord,
    Row,
    SessionFields,
    chain_hash,
    record_hash,
)
from pdp.evidence.sinks import SpoolingSink, SqliteSink, batch_to_line
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.evidence.writer import build_writer

SESSION: SessionFields = ("s1", "ab" * 32, "0a1b", "CN=unit CA", "sensor", "plant-a", "test", "qa", "active")


def rows(first: int, count: int) -> tuple[list[Row], dict[int, SessionFields]]:
    """``count`` publish decisions on topics t/<first>..; ts = 1.7e9 + i, so every row is distinct."""
    return ([(1_700_000_000.0 + i, 1, "c1", "127.0.0.1:5000", "publish", f"t/{i}", True, "r", "allowed by rule r",
              "l1", 1500, "rev1") for i in range(first, first + count)], {1: SESSION})


def writer(tmp_path: Path, node: str = "n1") -> ChainWriter:
    return ChainWriter(node, [SpoolingSink(SqliteSink(tmp_path / "a.db"), tmp_path / "spool")], tmp_path / "spool")


def stored(tmp_path: Path) -> list[AssertionRecord]:
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    try:
        return [r for _, r in store.query(QueryFilters())]
    finally:
        store.close()


def assert_exact_log(tmp_path: Path, topics: list[str]) -> None:
    """Sequence 1..N, one record per decision in order, chain intact, no conflicts."""
    records = stored(tmp_path)
    assert [r.seq for r in records] == list(range(1, len(topics) + 1))
    assert [r.topic for r in records] == topics
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, len(topics))]
    assert store.db.execute("SELECT count(*) FROM conflicts").fetchone()[0] == 0


def topics(first: int, count: int) -> list[str]:
    return [f"t/{i}" for i in range(first, first + count)]


def test_batch_applied_before_a_crash_is_acknowledged_not_stored_again(tmp_path: Path) -> None:
    """The crash window of issue A: SQLite committed, the head file and the acknowledgement did not happen."""
    first = writer(tmp_path)
    assert first.write(*rows(0, 3), "rec:1") == 3
    stale_head = first.chain.path.read_text()
    assert first.write(*rows(3, 4), "rec:2") == 4
    first.close()
    first.chain.path.write_text(stale_head)  # as if killed between the commit of rec:2 and the head file

    second = writer(tmp_path)
    assert (second.chain.seq, second.chain.batch_id) == (7, "rec:2")  # the store is the truth
    assert second.write(*rows(3, 4), "rec:2") == 4  # the broker re-sends what it got no ack for
    assert second.duplicates == 1
    assert second.write(*rows(7, 2), "rec:3") == 2
    second.close()
    assert_exact_log(tmp_path, topics(0, 9))


def test_stale_head_file_never_reuses_sequence_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue B: broker and writer died together; the new broker's first batch is a different one."""
    caplog.set_level(logging.WARNING, "mqtt_pdp.assertions")
    first = writer(tmp_path)
    first.write(*rows(0, 5), "old:1")
    first.close()
    first.chain.path.write_text(f"2 {stored(tmp_path)[1].hash}\n")  # the head file is behind the store
    (tmp_path / "spool" / "n1.inflight").unlink()  # nothing in flight: the crash came after the commit

    second = writer(tmp_path)
    assert second.write(*rows(5, 3), "new:1") == 3
    second.close()
    assert_exact_log(tmp_path, topics(0, 8))  # nothing dropped by INSERT OR IGNORE
    assert "the chain head file says 2, the store" in caplog.text


def test_batch_in_flight_when_broker_and_writer_died_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    first = writer(tmp_path)
    first.write(*rows(0, 2), "old:1")
    first.chain.save_inflight(first.chain.head, "old:2", *rows(2, 3))  # started, then killed before any sink
    first.close()

    second = writer(tmp_path)  # no broker re-sends old:2: it died too
    assert (second.chain.seq, second.chain.batch_id) == (5, "old:2")
    assert second.write(*rows(5, 1), "new:1") == 1
    second.close()
    third = writer(tmp_path)  # an in-flight file already applied is not applied again
    assert third.chain.seq == 6
    third.close()
    assert_exact_log(tmp_path, topics(0, 6))


def test_a_conflicting_record_is_kept_and_reported_never_ignored(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.CRITICAL, "mqtt_pdp.assertions")
    first = writer(tmp_path)
    first.write(*rows(0, 3), "a:1")
    first.close()
    original = stored(tmp_path)[1]
    forged = original._replace(topic="t/other")
    forged = forged._replace(hash=record_hash(forged))
    store = AssertionStore(tmp_path / "a.db")
    assert store.insert([original]) == 0  # an exact duplicate: ignored, no conflict
    assert store.insert([forged]) == 0
    kept = store.db.execute("SELECT record_id, topic, hash FROM conflicts").fetchall()
    assert kept == [("n1:2", "t/other", forged.hash)]
    assert [(r.problem, r.record_id) for r in store.verify()] == [(
        "1 record(s) conflict with stored ones (same node and sequence number, other content), first n1:2; "
        "kept in the conflicts table", "n1:2")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a.db'}: 1 records have the node and sequence number of stored records but other content "
        "(first n1:2); kept in the conflicts table, not dropped"]


def test_torn_spool_line_is_quarantined_and_the_rest_delivered(tmp_path: Path, caplog) -> None:
    """Issue C: a full disk or a crash left half a line at the end of the spool."""
    caplog.set_level(logging.CRITICAL, "mqtt_pdp.assertions")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (tmp_path / "a.db").mkdir()  # SQLite cannot open a directory: the batches go to the spool
    down = writer(tmp_path)
    down.write(*rows(0, 2), "s:1")
    down.write(*rows(2, 2), "s:2")
    down.close()
    spool = spool_dir / "sqlite.jsonl"
    good = spool.read_bytes()
    torn = batch_to_line(down.materialize(*rows(4, 2)), "s:3")[:-40]
    spool.write_bytes(good + torn)
    (tmp_path / "a.db").rmdir()

    up = writer(tmp_path)  # starting reads the spool for the head: the torn line must not stop it
    assert (up.chain.seq, up.chain.batch_id) == (4, "s:2")
    assert (spool_dir / "sqlite.jsonl.corrupt").read_bytes() == torn + b"\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"{spool}: a torn last line (crash or full disk while spooling) ({len(torn)} bytes) moved to "
        f"{spool_dir / 'sqlite.jsonl.corrupt'}"]
    assert up.write(*rows(4, 2), "s:3") == 2  # the broker re-sends the batch it got no ack for
    up.close()
    assert not spool.exists()
    assert_exact_log(tmp_path, topics(0, 6))


def test_garbage_line_inside_the_spool_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "a.db").mkdir()
    down = writer(tmp_path)
    down.write(*rows(0, 2), "s:1")
    down.write(*rows(2, 2), "s:2")
    down.close()
    spool = tmp_path / "spool" / "sqlite.jsonl"
    first, second = spool.read_bytes().splitlines(keepends=True)
    spool.write_bytes(first + b"\x00\x00garbage\n" + second)
    (tmp_path / "a.db").rmdir()
    up = writer(tmp_path)
    up.close()
    assert (tmp_path / "spool" / "sqlite.jsonl.corrupt").read_bytes() == b"\x00\x00garbage\n"
    assert_exact_log(tmp_path, topics(0, 4))


def test_hash_format_is_pinned_by_fixed_vectors(tmp_path: Path) -> None:
    """Any change of the canonical form (field order, separators, None, float repr) breaks these digests."""
    chain = ChainWriter("node-a", [], tmp_path)
    first, second = chain.materialize(
        [(1_700_000_000.25, 1, "client-1", "10.0.0.1:1883", "publish", "sites/a/t", True, "rule-1",
          "allowed by rule rule-1", "l1", 12_345, "rev-1"),
         (1_700_000_001.5, 1, None, None, "connect", None, False, None, "device retired", None, 0, "rev-1")],
        {1: ("dev-1", "ab" * 32, "01", "CN=CA", "sensor", "plant-a", "test", "qa", "active")})
    chain.close()
    text = "\x1f".join(["node-a:1", "node-a", "1", "1700000000.25", "client-1", "dev-1", "ab" * 32, "01", "CN=CA",
                        "sensor", "plant-a", "test", "qa", "active", "publish", "sites/a/t", "allow", "rule-1",
                        "allowed by rule rule-1", "rev-1", "l1", "12.345", "10.0.0.1:1883", GENESIS])
    assert first.hash == hashlib.sha256(text.encode()).hexdigest()
    assert first.hash == "324e9681dcd008f7b001fc9422d46dca6ca5c95dba981f9eb31f20cfdabfa4aa"
    assert second.prev_hash == first.hash and second.latency_us is None and second.decision == "deny"
    none = "\x00"  # how a missing value is written, distinct from an empty string
    text = "\x1f".join(["node-a:2", "node-a", "2", "1700000001.5", none, "dev-1", "ab" * 32, "01", "CN=CA", "sensor",
                        "plant-a", "test", "qa", "active", "connect", none, "deny", none, "device retired", "rev-1",
                        none, none, none, first.hash])
    assert second.hash == hashlib.sha256(text.encode()).hexdigest()
    assert second.hash == "f08ecb6f80a6d8f1da23ec2685749815d62924ab052c9fab753850120bbf1378"
    assert [record_hash(r) for r in (first, second)] == [first.hash, second.hash]
    assert chain_hash(first[:-1]) == first.hash


def test_empty_assertion_db_means_no_sqlite_sink(tmp_path: Path) -> None:
    """Issue D: ``assertion_db: ""`` with no stream keeps the records in a JSON Lines file in the spool directory."""
    chain = build_writer({"node": "n1", "spool_dir": str(tmp_path / "spool"), "assertion_db": "",
                          "stream_url": "", "stream_prefix": "p"})
    assert chain.write(*rows(0, 3), "j:1") == 3
    chain.close()
    again = build_writer({"node": "n1", "spool_dir": str(tmp_path / "spool"), "assertion_db": "",
                          "stream_url": "", "stream_prefix": "p"})
    assert (again.chain.seq, again.chain.batch_id) == (3, "j:1")
    assert again.write(*rows(0, 3), "j:1") == 3 and again.duplicates == 1
    assert again.write(*rows(3, 1), "j:2") == 1
    again.close()
    lines = [json.loads(line) for line in (tmp_path / "spool" / "n1.assertions.jsonl").read_text().splitlines()]
    assert [(line["batch"], [r[2] for r in line["records"]]) for line in lines] == [("j:1", [1, 2, 3]), ("j:2", [4])]
    assert not list(tmp_path.rglob("*.db"))


def test_empty_assertion_db_broker_starts_and_records(make_broker, test_pki, policy_dir) -> None:
    from tests.support import Client

    broker = make_broker(assertion_db="", node_id="no-db")
    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert client.connect() == 0
        client.publish("sites/plant-a/sensor-1/telemetry", b"x", qos=1)
    finally:
        client.close()
    broker.stop()
    lines = [json.loads(line) for line in (policy_dir.parent / "spool" / "no-db.assertions.jsonl").read_text().splitlines()]
    records = [AssertionRecord._make(values) for line in lines for values in line["records"]]
    assert [(r.seq, r.action, r.topic, r.decision) for r in records] == [
        (1, "connect", None, "allow"), (2, "publish", "sites/plant-a/sensor-1/telemetry", "allow")]
    assert all(record_hash(r) == r.hash for r in records) and records[1].prev_hash == records[0].hash
    assert not (policy_dir.parent / "assertions.db").exists()


def test_log_query_accepts_the_registrys_fingerprint_formats(tmp_path: Path) -> None:
    from tests.test_assertion_log import run_cli

    chain = writer(tmp_path)
    chain.write(*rows(0, 2), "f:1")
    chain.close()
    colons = ":".join(["AB"] * 32)
    for given in ("ab" * 32, "sha256:" + "AB" * 32, colons, f"sha256:{colons}"):
        result = run_cli("log", "query", "--db", str(tmp_path / "a.db"), "--fingerprint", given, "--format", "jsonl")
        assert result.returncode == 0, result.stderr
        assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [1, 2], given
    bad = run_cli("log", "query", "--db", str(tmp_path / "a.db"), "--fingerprint", "sha256:abc")
    assert bad.returncode == 2 and "--fingerprint: not a SHA-256 fingerprint: 'sha256:abc'" in bad.stderr


def test_store_written_before_batch_ids_existed_still_gives_the_head(tmp_path: Path) -> None:
    """An upgraded broker: records but no head in meta; the newest record is the head."""
    chain = writer(tmp_path)
    chain.write(*rows(0, 3), None)
    chain.close()
    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("DELETE FROM meta")
    (tmp_path / "spool" / "n1.chain").unlink()
    again = writer(tmp_path)
    assert again.chain.seq == 3
    again.write(*rows(3, 1), None)
    again.close()
    assert_exact_log(tmp_path, topics(0, 4))


class GroupBroker:
    """``mqtt-pdp broker`` in a process group of its own (with its writer), so both can be killed at once."""

    def __init__(self, config: Path) -> None:
        import os
        import queue
        import re
        import subprocess
        import sys
        import threading

        from tests.support import WAIT

        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "pdp.cli", "broker", "-c", str(config)], cwd=config.parent,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(root)})
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        while True:
            line = lines.get(timeout=WAIT * 2)
            if match := re.search(r"listener default on \('[0-9.]+', (\d+)\)", line):
                self.port = int(match.group(1))
                return

    def kill_group(self) -> None:
        import os
        import signal

        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        from tests.support import wait_for

        def gone(pid: str) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
            except FileNotFoundError:
                return True

        wait_for(lambda: all(gone(pid) for pid in children), "the writer process gone")

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_broker_and_writer_killed_together_chain_continues(test_pki, policy_dir, tmp_path: Path) -> None:
    from tests.support import Client, wait_for, write_cli_config

    config = write_cli_config(tmp_path / "crashy.yaml", test_pki, policy_dir)
    db = tmp_path / "assertions.db"

    def count() -> int:
        if not db.exists():
            return 0
        store = AssertionStore(db, readonly=True)
        try:
            return store.count()
        finally:
            store.close()

    def clients(port: int) -> tuple[Client, Client]:
        dashboard = Client(port, "dash-1", test_pki.device("dash-1"), test_pki.ca_file)
        sensor = Client(port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
        assert dashboard.connect() == 0 and sensor.connect() == 0
        assert dashboard.subscribe("sites/plant-a/#", qos=1) == 1
        return dashboard, sensor

    def traffic(dashboard: Client, sensor: Client, label: str, n: int) -> None:
        payloads = [f"{label}-{i}".encode() for i in range(n)]
        for payload in payloads:
            sensor.publish("sites/plant-a/sensor-1/telemetry", payload, qos=1)
        assert [dashboard.next_message().payload for _ in range(n)] == payloads

    first = GroupBroker(config)
    dashboard, sensor = clients(first.port)
    try:
        traffic(dashboard, sensor, "a", 20)
        wait_for(lambda: count() == 3 + 2 * 20, "the first run's records stored")
        traffic(dashboard, sensor, "b", 20)  # still being shipped when the kill comes
        first.kill_group()
    finally:
        dashboard.drop()
        sensor.drop()
    survived = count()

    second = GroupBroker(config)
    dashboard, sensor = clients(second.port)
    try:
        traffic(dashboard, sensor, "c", 5)
    finally:
        dashboard.close()
        sensor.close()
    assert second.stop() == 0

    store = AssertionStore(db, readonly=True)
    records = [r for _, r in store.query(QueryFilters())]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))  # the chain continues, nothing reused
    assert len({(r.ts, r.action, r.client_id) for r in records}) == len(records)
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, len(records))]
    assert store.db.execute("SELECT count(*) FROM conflicts").fetchone()[0] == 0
    assert 3 + 2 * 20 <= survived <= len(records) - 14 <= 3 + 2 * 40
    restarted = records[-13:]  # every decision of the restarted broker, after whatever survived the kill
    assert sorted((r.action, r.client_id) for r in restarted if r.action in ("connect", "subscribe")) == [
        ("connect", "dash-1"), ("connect", "sensor-1"), ("subscribe", "dash-1")]
    assert [r.action for r in restarted].count("publish") == [r.action for r in restarted].count("receive") == 5
    assert restarted[0].ts > records[-14].ts
    # The killed broker's unshipped captures are not silently gone: the restarted broker's first record says so.
    assert (records[-14].action, records[-14].decision) == ("gap", "lost")
    assert "stopped without flushing" in records[-14].reason


def test_a_writer_that_cannot_restart_once_is_restarted_at_the_next_batch(tmp_path: Path) -> None:
    """Found by an outside attack: after one failed restart (the node's lock still held), every later batch
    failed on the missing process and the broker recorded nothing more until it was restarted."""
    import fcntl
    import os
    import signal

    from pdp.evidence.record import SinkError
    from pdp.evidence.store import AssertionStore, QueryFilters
    from pdp.evidence.writer import WriterProcess

    spool = tmp_path / "spool"
    writer = WriterProcess({"node": "n1", "spool_dir": str(spool), "assertion_db": str(tmp_path / "a.db")})
    session = {1: ("dev-1", "ab" * 32, "01", "CN=ca", "sensor", "site", "telemetry", "ops", "active")}

    def rows(n: int) -> list:
        return [(1000.0 + n, 1, "dev-1", "127.0.0.1:1", "publish", f"t/{n}", True, "r1", "allowed by rule r1", "l1",
                 10, "p.r")]

    try:
        assert writer.write(rows(1), session, "b1") == 1
        with open(spool / "n1.lock", "a") as held:
            os.kill(writer.proc.pid, signal.SIGKILL)
            writer.proc.wait()
            fcntl.flock(held, fcntl.LOCK_EX)  # the new writer cannot take the node's lock
            with pytest.raises(SinkError):
                writer.write(rows(2), session, "b2")
            assert writer.proc is None
        assert writer.write(rows(2), session, "b2") == 1  # the lock is free again: restarted, batch stored
        assert writer.write(rows(3), session, "b3") == 1
    finally:
        writer.close()
    store = AssertionStore(tmp_path / "a.db", readonly=True)
    try:
        assert sorted(record.topic for _, record in store.query(QueryFilters())) == ["t/1", "t/2", "t/3"]
        assert [(report.node, report.problem) for report in store.verify()] == [("n1", None)]
    finally:
        store.close()


def test_head_file_written_at_most_once_a_second_beside_a_store_and_always_alone(tmp_path: Path,
                                                                                monkeypatch) -> None:
    """Beside SQLite (which keeps the head in each batch's transaction) the head file is a hint written at most
    once a second: a writer killed meanwhile leaves it behind, and the next one continues from the store. Alone
    (JSON Lines here, a stream in production) it is written with every batch."""
    monkeypatch.setattr("pdp.evidence.chain.time.monotonic", lambda: 1000.0)  # every batch within the same second
    first = writer(tmp_path)
    for n in range(5):
        first.write(*rows(n * 2, 2), f"b:{n}")
    assert first.chain.path.read_text().split()[0] == "2"  # the first batch's head; the rest within the second
    first.chain.close()  # killed: the lock goes with the process, nothing else runs
    second = writer(tmp_path)
    assert (second.chain.seq, second.chain.batch_id) == (10, "b:4")
    second.write(*rows(10, 1), "c:1")
    second.close()
    assert second.chain.path.read_text().split()[:1] == ["11"]  # a clean stop writes it
    assert_exact_log(tmp_path, topics(0, 11))

    alone = build_writer({"node": "j1", "spool_dir": str(tmp_path / "jsonl"), "assertion_db": "", "stream_url": "",
                          "stream_prefix": "p"})
    for n in range(3):
        alone.write(*rows(n, 1), f"j:{n}")
        assert alone.chain.path.read_text().split()[0] == str(n + 1)
    alone.close()
