"""Operating a running broker (issue 11): status, sessions, kick and log-level over the admin socket,
against a real `mqtt-pdp broker` process with real TLS paho clients, checking that the numbers move."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import BrokerProcess, Client, TestPki, wait_for, write_cli_config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


class Running:
    def __init__(self, tmp_path: Path, **plugin: Any) -> None:
        self.pki = TestPki(tmp_path / "pki")
        self.policies = tmp_path / "policies"
        shutil.copytree(ROOT / "policies", self.policies)
        self.config = write_cli_config(tmp_path / "broker.yaml", self.pki, self.policies, **plugin)
        self.socket = str(tmp_path / "admin.sock")
        self.db = tmp_path / "assertions.db"
        self.process = BrokerProcess(self.config, tmp_path)
        self.clients: list[Client] = []

    def admin(self, *args: str) -> Any:
        result = cli(*args, "--socket", self.socket, "--json")
        assert (result.returncode, result.stderr) == (0, ""), result
        lines = result.stdout.splitlines()
        return json.loads(lines[0]) if args[0] == "status" else [json.loads(line) for line in lines]

    def client(self, device: str, expect: int = 0) -> Client:
        client = Client(self.process.port, device, self.pki.device(device), self.pki.ca_file)
        self.clients.append(client)
        assert client.connect() == expect
        return client


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    broker = Running(tmp_path)
    try:
        yield broker
    finally:
        for client in broker.clients:
            client.client.loop_stop()
        assert broker.process.stop() == 0


def test_status_sessions_and_kick_follow_the_traffic(running: Running) -> None:
    mode = os.stat(running.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    status = running.admin("status")
    assert (status["connections"], status["sessions"]) == (0, 0)
    assert status["node_id"] == "broker" and status["last_rejected_reload"] is None and status["redis"] is None
    check = cli("check", "-c", str(running.config)).stdout  # the revisions `check` prints are the ones in force
    assert f"revision {status['revisions']['policy']})" in check and f"revision {status['revisions']['registry']})" in check
    assert running.admin("sessions") == []

    sensor = running.client("sensor-001")
    assert sensor.subscribe("sites/plant-a/sensor-001/cmd") == 0
    dashboard = running.client("dashboard-001")
    running.client("sensor-900", expect=5)  # suspended: refused, not counted
    status = running.admin("status")
    assert (status["connections"], status["sessions"]) == (2, 2)
    assert status["uptime_s"] > 0
    sessions = running.admin("sessions")
    assert [(s["client_id"], s["device_id"], s["type"], s["location"], s["subscriptions"]) for s in sessions] == [
        ("dashboard-001", "dashboard-001", "dashboard", "plant-a", []),
        ("sensor-001", "sensor-001", "sensor", "plant-a", ["sites/plant-a/sensor-001/cmd"]),
    ]
    assert all(s["peer"].startswith("127.0.0.1:") and s["connected_since"] > status["started_at"] for s in sessions)
    table = cli("sessions", "--socket", running.socket)
    assert table.stdout.splitlines()[0].split() == ["CLIENT_ID", "DEVICE_ID", "TYPE", "LOCATION", "PEER",
                                                    "CONNECTED_SINCE", "SUBSCRIPTIONS"]
    assert table.stdout.splitlines()[-1] == "2 connected"

    kicked = cli("kick", "sensor-001", "--actor", "alice", "--socket", running.socket)
    user = __import__("pwd").getpwuid(os.geteuid()).pw_name
    assert kicked.returncode == 0, kicked
    assert kicked.stdout.startswith(f"disconnected sensor-001 (device sensor-001): kicked by operator alice as {user} (uid")
    assert sensor.wait_disconnected()
    wait_for(lambda: running.admin("status")["connections"] == 1, "the kicked connection to go")
    assert [s["client_id"] for s in running.admin("sessions")] == ["dashboard-001"]
    assert not dashboard.disconnected.is_set()

    # the kick is evidence: a disconnect record naming the operator
    def kick_records() -> list[dict[str, Any]]:
        result = cli("log", "query", "--db", str(running.db), "--action", "disconnect", "--format", "jsonl")
        return [json.loads(line) for line in result.stdout.splitlines()]

    wait_for(lambda: len(kick_records()) == 1, "the kick's record")
    record = kick_records()[0]
    assert (record["device_id"], record["client_id"], record["decision"]) == ("sensor-001", "sensor-001", "deny")
    assert record["reason"].startswith(f"kicked by operator alice as {user} (uid {os.geteuid()}, pid ")

    unknown = cli("kick", "nobody", "--socket", running.socket)
    assert (unknown.returncode, unknown.stderr) == (
        2, "mqtt-pdp: error: no connected client 'nobody' (mqtt-pdp sessions lists them)\n")


def test_status_names_the_last_rejected_reload_with_file_and_line(running: Running) -> None:
    policy = running.policies / "policy.csv"
    before = running.admin("status")["revisions"]["policy"]
    policy.write_text(policy.read_text() + "p, broken, *, *, *, a/#/b, publish, allow\n")
    wait_for(lambda: running.admin("status")["last_rejected_reload"] is not None, "the reload to be rejected")
    status = running.admin("status")
    line = len(policy.read_text().splitlines())
    assert status["last_rejected_reload"]["error"].startswith(f"{policy}:{line}: filter 'a/#/b'")
    assert status["revisions"]["policy"] == before  # the previous version stays in force
    assert list(status["reload_errors_in_force"]) == ["policy"]
    text = cli("status", "--socket", running.socket).stdout
    assert f"last rejected reload: " in text and f"{policy}:{line}:" in text


def test_log_level_changes_while_running(running: Running) -> None:
    assert running.admin("status")["log_level"] == "info"
    result = cli("log-level", "debug", "--socket", running.socket)
    assert (result.returncode, result.stdout) == (0, "log level debug (was info)\n")
    running.process.wait_line(r"log level set to debug by")
    assert running.admin("status")["log_level"] == "debug"
    running.client("sensor-001").publish("sites/plant-a/sensor-001/telemetry", b"1")
    running.process.wait_line(r"DEBUG .*sensor-001 publish sites/plant-a/sensor-001/telemetry allowed")
    bad = cli("log-level", "loud", "--socket", running.socket)
    assert bad.returncode == 2 and "invalid choice: 'loud'" in bad.stderr


def test_admin_socket_errors_are_one_line(tmp_path: Path) -> None:
    missing = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert (missing.returncode, missing.stderr) == (2, f"mqtt-pdp: error: no broker is listening on "
                                                       f"{tmp_path / 'none.sock'} (is it running, with admin_socket set to this path?)\n")
    # something else listening there: not mistaken for a broker
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other.sock"))
    other.listen()
    try:
        import threading

        def answer() -> None:
            conn, _ = other.accept()
            conn.recv(100)
            conn.sendall(b"hello\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        wrong = cli("status", "--socket", str(tmp_path / "other.sock"))
    finally:
        other.close()
    assert (wrong.returncode, wrong.stderr) == (
        2, f"mqtt-pdp: error: {tmp_path / 'other.sock'}: not an mqtt-pdp admin socket (unreadable answer)\n")
