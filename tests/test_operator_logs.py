"""Logs an operator can use (issue 11): one line per event at the default level, a flood of denials
rate-limited per client with a count, JSON lines on request, and amqtt's chatter kept below that level."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pdp.runtime.logs import PerKeyRateLimit
from tests.support import BrokerProcess, Client, TestPki, write_cli_config

ROOT = Path(__file__).resolve().parent.parent


def test_rate_limit_lets_a_burst_through_then_counts() -> None:
    limit = PerKeyRateLimit(interval=10.0, burst=2)
    assert [limit.admit("a", t) for t in (0.0, 1.0, 2.0, 3.0, 4.0)] == [0, 0, None, None, None]
    assert limit.admit("b", 4.0) == 0  # per client
    assert limit.admit("a", 10.5) == 3  # the next window's first line says how many were held back
    assert limit.admit("a", 10.6) == 0


def test_rate_limit_memory_is_bounded() -> None:
    limit = PerKeyRateLimit(interval=10.0, burst=1, max_keys=3)
    assert [limit.admit(k, 0.0) for k in "abc"] == [0, 0, 0]
    assert limit.admit("d", 1.0) is None  # full, nobody's window has passed
    assert limit.admit("d", 11.0) == 0  # the quiet ones are forgotten


def run_broker(tmp_path: Path, **plugin: object) -> tuple[BrokerProcess, TestPki]:
    pki = TestPki(tmp_path / "pki")
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    return BrokerProcess(write_cli_config(tmp_path / "broker.yaml", pki, tmp_path / "policies", **plugin), tmp_path), pki


def test_default_level_one_line_per_event_and_no_amqtt_chatter(tmp_path: Path) -> None:
    broker, pki = run_broker(tmp_path)
    clients = []
    try:
        sensor = Client(broker.port, "sensor-001", pki.device("sensor-001"), pki.ca_file)
        clients.append(sensor)
        assert sensor.connect() == 0
        for i in range(20):  # a flood of denials: 5 lines, then held back
            sensor.publish(f"sites/plant-a/valve-001/cmd", b"%d" % i)
        refused = Client(broker.port, "sensor-900", pki.device("sensor-900"), pki.ca_file)
        clients.append(refused)
        assert refused.connect() == 5
        policy = tmp_path / "policies" / "policy.csv"
        policy.write_text(policy.read_text() + "p, broken, *, *, *, a/#/b, publish, allow\n")
        broker.wait_line("reload rejected")
        sensor.close()
        clients.remove(sensor)
    finally:
        for client in clients:
            client.client.loop_stop()
        assert broker.stop() == 0
    broker.wait_line("shutting down")
    lines = broker.log
    loggers = {re.match(r"\S+ \S+ \S+ ([\w.]+): ", line).group(1) for line in lines}  # type: ignore[union-attr]
    assert loggers <= {"mqtt_pdp.cli", "mqtt_pdp.service", "mqtt_pdp.admin", "pdp.runtime.decision_point"}, lines
    assert sum("connect refused: client=sensor-900" in line for line in lines) == 1
    assert not any("sensor-900" in line and "connect refused" not in line for line in lines), lines
    denials = [line for line in lines if "sensor-001 publish sites/plant-a/valve-001/cmd denied" in line]
    assert len(denials) == 5, denials
    assert sum("policy reload rejected" in line for line in lines) == 1


def test_json_lines(tmp_path: Path) -> None:
    # An unreachable Redis makes the assertion writer (a process of its own) log too: found by an outside
    # attack, its lines were plain text in JSON mode.
    broker, pki = run_broker(tmp_path, log_format="json", redis_url="redis://127.0.0.1:1/0")
    try:
        refused = Client(broker.port, "sensor-900", pki.device("sensor-900"), pki.ca_file)
        try:
            assert refused.connect() == 5
        finally:
            refused.client.loop_stop()
        line = broker.wait_line(r'"event": "connect_refused"')
    finally:
        assert broker.stop() == 0
    broker.wait_line("shutting down")
    records = [json.loads(l) for l in broker.log]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "mqtt_pdp.assertions" for r in records), broker.log
    event = json.loads(line)
    assert (event["level"], event["logger"], event["client_id"], event["device_id"], event["reason"]) == (
        "warning", "mqtt_pdp.service", "sensor-900", "sensor-900", "device suspended")
