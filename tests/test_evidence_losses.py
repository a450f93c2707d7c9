"""Loss is never silent: a broker killed with -9 mid-traffic leaves a gap record that accounts for every
decision it made and did not record; ``on_log_failure: refuse`` fails closed when records cannot be made durable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pdp.evidence.ledger import CaptureLedger, LedgerEntry, loss_of, pending_losses, read_ledger
from pdp.evidence.store import AssertionStore, QueryFilters
from tests.test_assertion_crashes import GroupBroker

TOPIC = "sites/plant-a/sensor-1/telemetry"


def test_loss_is_counted_from_the_reservation_and_the_stored_batch_id(tmp_path: Path) -> None:
    ledger = CaptureLedger(tmp_path, "n1", "aaaa", min_block=100)
    assert ledger.previous is None
    assert ledger.reserve(0, 100) and ledger.reserve(60, 100)
    entry = read_ledger(ledger.path)
    assert entry == LedgerEntry("aaaa", 160, None, False)
    # Killed: everything after the last stored batch up to the reservation may be lost (an upper bound).
    loss = loss_of(entry, "aaaa:42")
    assert (loss.first, loss.last, loss.exact) == (43, 160, False)
    assert loss_of(entry, "bbbb:900") is not None and loss_of(entry, "bbbb:900").first == 1  # nothing of aaaa stored
    # A graceful stop gives the exact count; nothing lost when everything was stored.
    ledger.close(57)
    entry = read_ledger(ledger.path)
    assert loss_of(entry, "aaaa:57") is None
    assert (loss_of(entry, "aaaa:50").count, loss_of(entry, "aaaa:50").exact) == (7, True)
    # Overrun: captures beyond the reservation before it was renewed are said to be possibly more.
    again = CaptureLedger(tmp_path, "n1", "cccc", min_block=10)
    assert again.previous == entry
    again.reserve(0, 10)
    again.reserve(25, 10)
    assert again.overrun and "may also be larger" in loss_of(read_ledger(again.path), None).reason(None)


def test_the_durable_reservation_is_never_behind_the_captures_in_a_burst(tmp_path: Path) -> None:
    """A burst of captures in one turn of the loop (traffic ramping up faster than the reservation's rate
    estimate): the reservation renewed from its thread cannot keep up, so each capture that would pass it
    reserves first. After every capture, the file already says at least that many; a kill at any point is
    then inside the gap the next start writes. (Before, 5,000 captures here left the file at 1,000.)"""
    import asyncio

    from pdp.core.engine import Decision
    from pdp.evidence.recorder import AssertionRecorder

    class Writer:  # the recorder's ``BatchWriter``: nothing is shipped in this test (no loop turn)
        head_batch_id = head_record = None

        def write(self, rows, sessions, batch_id, frame=None) -> None:
            pass

        def idle(self) -> None:
            pass

        def close(self) -> None:
            pass

    async def burst() -> list[tuple[int, int]]:
        ledger = CaptureLedger(tmp_path, "n1", "aaaa", min_block=100)
        recorder = AssertionRecorder(Writer(), ledger=ledger)  # type: ignore[arg-type]
        recorder.start()
        behind = []
        for i in range(5000):
            recorder.decision(None, "c1", None, "publish", TOPIC, Decision(True, "r", "ok"), "l1", 900, "rev")
            on_file = read_ledger(ledger.path)
            assert on_file is not None
            if on_file.reserved < recorder.captured:
                behind.append((recorder.captured, on_file.reserved))
        await recorder.close()
        return behind

    assert asyncio.run(burst()) == []
    entry = read_ledger(CaptureLedger(tmp_path, "n1", "bbbb").path)
    assert entry is not None and entry.captured == 5000 and not entry.overrun


def test_a_gap_record_not_yet_stored_is_carried_to_the_next_start(tmp_path: Path) -> None:
    """A lost A; B started, reserved, and died before storing its gap record for A: C writes A's and B's."""
    a = LedgerEntry("aaaa", 1000)
    reasons = pending_losses(a, "aaaa:10", "n1:10")
    assert len(reasons) == 1 and "captures 11..1000" in reasons[0] and "after record n1:10" in reasons[0]
    b = CaptureLedger(tmp_path, "n1", "bbbb")
    b.carried = tuple(reasons)
    b.reserve(1, 1000)  # what B's start does before shipping anything
    b_entry = read_ledger(b.path)
    assert b_entry is not None and b_entry.carried == tuple(reasons)
    assert pending_losses(b_entry, "aaaa:10", "n1:10") == [reasons[0], pending_losses(
        LedgerEntry("bbbb", 1001), None, "n1:10")[0]]
    # B stored its first batch (the gap record first): only B's own loss remains for C.
    assert pending_losses(b_entry, "bbbb:5", "n1:15") == [loss_of(b_entry, "bbbb:5").reason("n1:15")]


class KillableBroker(GroupBroker):
    def kill_broker_only(self) -> None:
        """kill -9 of the broker process alone: its writer sees the pipe close, stores what it has, and exits."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        from tests.support import wait_for

        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in
                                 Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] for pid in children),
                 "the writer process gone")


def test_broker_killed_mid_traffic_repeatedly_every_record_present_or_inside_a_reported_gap(
        test_pki, policy_dir, tmp_path: Path) -> None:
    from tests.support import Client, wait_for, write_cli_config

    config = write_cli_config(tmp_path / "killed.yaml", test_pki, policy_dir)
    db = tmp_path / "assertions.db"
    received: list[int] = []  # per killed run: messages the subscriber got (each one decided twice before delivery)
    acknowledged: list[int] = []  # per killed run: PUBACKs the publisher got (each one decided before its PUBACK)
    for run in range(3):
        broker = KillableBroker(config)
        dashboard = Client(broker.port, "dash-1", test_pki.device("dash-1"), test_pki.ca_file)
        sensor = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
        assert dashboard.connect() == 0 and sensor.connect() == 0
        assert dashboard.subscribe("sites/plant-a/#", qos=1) == 1
        stop = threading.Event()
        acks: list[int] = []
        sensor.client.on_publish = lambda client, userdata, mid, code, props, acks=acks: acks.append(mid)

        def publish(client: Client = sensor, stop: threading.Event = stop) -> None:
            for i in range(20_000):
                if stop.is_set():
                    return
                client.client.publish(TOPIC, b"%d" % i, qos=1)
                if i % 50 == 49:
                    stop.wait(0.001)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wait_for(lambda: dashboard.messages.qsize() >= 300, "traffic flowing")
        if run == 1:
            broker.kill_group()  # broker and writer together, as a host crash
        else:
            broker.kill_broker_only()
        stop.set()
        publisher.join(10)
        assert dashboard.wait_disconnected() and sensor.wait_disconnected()
        received.append(dashboard.messages.qsize())
        acknowledged.append(len(acks))
        dashboard.drop()
        sensor.drop()

    last = KillableBroker(config)  # writes the third gap record, then stops cleanly
    assert last.stop() == 0

    store = AssertionStore(db, readonly=True)
    try:
        records = [r for _, r in store.query(QueryFilters())]
        [report] = store.verify()
    finally:
        store.close()
    records.sort(key=lambda r: r.seq)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert report.problem is None and report.checked == len(records)
    gaps = [i for i, r in enumerate(records) if r.action == "gap"]
    assert len(gaps) == 3 and [records[i].decision for i in gaps] == ["lost"] * 3
    assert [g for g, _ in report.gaps] == [records[i].record_id for i in gaps]
    starts = [0, *[g + 1 for g in gaps]]
    import re

    for run in range(3):
        segment = records[starts[run]:gaps[run]]
        gap = records[gaps[run]]
        match = re.search(r"up to (\d+) decision\(s\) captured", gap.reason)
        assert match, gap.reason
        lost_at_most = int(match.group(1))
        # Made before the kill for sure: 2 connects, 1 subscribe, a receive per delivered message, and a publish
        # per delivered or acknowledged message (a PUBACK comes only after the decision: an acknowledged message
        # the log cannot account for would be one its publisher forgot and nobody recorded).
        made = 3 + max(received[run], acknowledged[run]) + received[run]
        assert len(segment) + lost_at_most >= made, (run, len(segment), lost_at_most, made, acknowledged[run])
        assert acknowledged[run] <= sum(r.action == "publish" for r in segment) + lost_at_most
        assert gap.ts >= segment[-1].ts
        assert {r.action for r in segment} <= {"connect", "subscribe", "publish", "receive", "disconnect"}

    out = subprocess.run([sys.executable, "-m", "pdp.cli", "log", "verify", "--db", str(db)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.returncode == 3, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["LOST"] * 3 + ["incomplete"]
    assert "chain intact, 3 known gap(s)" in lines[-1]


def test_graceful_stop_leaves_no_gap_record(test_pki, policy_dir, tmp_path: Path) -> None:
    from tests.support import write_cli_config

    config = write_cli_config(tmp_path / "calm.yaml", test_pki, policy_dir)
    for _ in range(2):
        assert KillableBroker(config).stop() == 0
    store = AssertionStore(tmp_path / "assertions.db")
    try:
        assert [r.action for _, r in store.query(QueryFilters())] == []
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["refuse", "alarm"])
def test_on_log_failure_refuse_fails_closed_while_records_cannot_be_made_durable(make_broker, test_pki, tmp_path,
                                                                                  mode: str) -> None:
    """The store is unavailable and the spool's disk is full (its file is /dev/full: every write is ENOSPC)."""
    from pdp.evidence.sinks import batch_from_line
    from pdp.runtime.service import LOG_REFUSAL
    from tests.support import Client, wait_for

    (tmp_path / "not-a-dir").write_text("")
    spool = tmp_path / "spool-x"
    broker = make_broker(assertion_db=str(tmp_path / "not-a-dir" / "a.db"), spool_dir=str(spool), on_log_failure=mode)
    recorder = broker.plugin.service.recorder
    (spool / "sqlite.jsonl").symlink_to("/dev/full")
    sensor = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    assert sensor.connect() == 0  # decided before any batch failed
    wait_for(lambda: recorder.failing, "the first batch failing (ENOSPC)")
    dashboard = Client(broker.port, "dash-1", test_pki.device("dash-1"), test_pki.ca_file)
    try:
        if mode == "refuse":
            assert dashboard.connect() == 5  # not authorized: fail closed
            dashboard.client.loop_stop()  # paho would retry, and be admitted once records are durable again
            assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 0x80
        else:
            assert dashboard.connect() == 0  # available, and alarmed (CRITICAL logs)
            assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
        (spool / "sqlite.jsonl").unlink()  # space freed: the batches waiting in memory are spooled
        wait_for(lambda: not recorder.failing, "records durable again")
        later = Client(broker.port, "sensor-2", test_pki.device("sensor-2"), test_pki.ca_file)
        assert later.connect() == 0
        later.close()
    finally:
        sensor.close()
        dashboard.close()
    broker.stop()
    records = [r for line in (spool / "sqlite.jsonl").read_bytes().splitlines() for r in batch_from_line(line)[1]]
    connects = [(r.client_id, r.decision, r.reason == LOG_REFUSAL) for r in records if r.action == "connect"]
    expected_dash = ("dash-1", "deny", True) if mode == "refuse" else ("dash-1", "allow", False)
    assert connects == [("sensor-1", "allow", False), expected_dash, ("sensor-2", "allow", False)]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))  # nothing lost while the disk was full
