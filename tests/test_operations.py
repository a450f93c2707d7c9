"""Operating a running broker (issue 11): status, sessions, kick and log-level over the admin socket,
against a real `mqtt-pdp broker` process with real TLS paho clients, checking that the numbers move."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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
        self.socket = str(tmp_path / "broker.sock")
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
    sensor.publish("sites/plant-a/sensor-001/telemetry", b"21.5", qos=1, retain=True)
    retained = len("sites/plant-a/sensor-001/telemetry") + 4
    assert running.admin("status")["retained"] == {"topics": 1, "bytes": retained, "refused": 0}
    assert f"retained:          1 topics, {retained} bytes, 0 not retained" in cli("status", "--socket",
                                                                                 running.socket).stdout

    sensor.client.reconnect_delay_set(min_delay=120, max_delay=120)  # paho would reconnect (a kick allows that)
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


# -- metrics ----------------------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def decisions(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], action: str, decision: str) -> float:
    """Decisions of one action and outcome, over every cache tier."""
    return sum(v for (name, labels), v in m.items() if name == "mqtt_pdp_decisions_total"
               and dict(labels)["action"] == action and dict(labels)["decision"] == decision)


def test_metrics_move_with_traffic_refusals_and_reloads(tmp_path: Path) -> None:
    import re
    import ssl

    running = Running(tmp_path, metrics="127.0.0.1:0")
    try:
        # logged before the listener line the process fixture waits for
        line = next(line for line in running.process.log if "metrics on http://127.0.0.1:" in line)
        url = re.search(r"http://\S+", line).group(0)  # type: ignore[union-attr]
        assert running.admin("status")["metrics"] == url
        m = scrape(url)
        assert m[("mqtt_pdp_connections", ())] == 0
        assert ("mqtt_pdp_connects_total", (("outcome", "accepted"), ("reason", ""))) not in m

        sensor = running.client("sensor-001")
        running.client("sensor-900", expect=5)  # suspended
        assert sensor.subscribe("sites/plant-a/sensor-001/cmd") == 0
        assert sensor.subscribe("sites/#") == 0x80
        for _ in range(3):
            sensor.publish("sites/plant-a/sensor-001/telemetry", b"1", qos=1)
        # a TLS refusal: a client certificate from another CA
        stranger = TestPki(tmp_path / "other-pki")
        context = ssl.create_default_context(cafile=str(running.pki.ca_file))
        context.load_cert_chain(str(stranger.device("sensor-001").cert), str(stranger.device("sensor-001").key))
        with socket.create_connection(("127.0.0.1", running.process.port), timeout=10) as raw:
            with contextlib.suppress(ssl.SSLError, OSError):  # TLS 1.3: the refusal may come after the client's side
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.recv(1) == b""
        wait_for(lambda: decisions(scrape(url), "publish", "allow") == 3, "three publishes counted")
        wait_for(lambda: ("mqtt_pdp_tls_refused_total", (("reason", "unable to get local issuer certificate"),))
                 in scrape(url), "the TLS refusal counted")
        m = scrape(url)
        assert (decisions(m, "subscribe", "allow"), decisions(m, "subscribe", "deny")) == (1, 1)
        tiers = {dict(labels)["tier"] for (name, labels) in m if name == "mqtt_pdp_decisions_total"}
        assert tiers <= {"index", "l1", "l2"} and "index" in tiers, tiers
        assert m[("mqtt_pdp_decision_seconds_count", (("action", "publish"),))] == 3
        assert m[("mqtt_pdp_connects_total", (("outcome", "accepted"), ("reason", "")))] == 1
        refused = {dict(labels)["reason"]: v for (name, labels), v in m.items()
                   if name == "mqtt_pdp_connects_total" and dict(labels)["outcome"] == "refused"}
        assert refused == {"device suspended": 1}
        assert m[("mqtt_pdp_connections", ())] == 1 and m[("mqtt_pdp_sessions", ())] == 1
        wait_for(lambda: scrape(url)[("mqtt_pdp_records_written_total", ())] >= 7, "the records written")

        # a rejected reload, then an applied one
        policy = running.policies / "policy.csv"
        good = policy.read_text()
        policy.write_text(good + "p, broken, *, *, *, a/#/b, publish, allow\n")
        wait_for(lambda: scrape(url).get(("mqtt_pdp_reloads_total", (("outcome", "rejected"),))) == 1, "rejected")
        policy.write_text(good + "p, extra, *, *, *, extra/#, publish, deny\n")
        wait_for(lambda: scrape(url).get(("mqtt_pdp_reloads_total", (("outcome", "applied"),))) == 1, "applied")
        # a revocation: the kick ends the session
        sensor.client.reconnect_delay_set(min_delay=120, max_delay=120)  # paho would reconnect
        assert cli("kick", "sensor-001", "--socket", running.socket).returncode == 0
        wait_for(lambda: scrape(url)[("mqtt_pdp_connections", ())] == 0, "the connection gone")
        assert scrape(url)[("mqtt_pdp_revocations_total", (("kind", "kick"),))] == 1
        # every series the sample Grafana dashboard plots is one this endpoint serves
        served = {name for name, _ in scrape(url)}
        dashboard = json.loads((ROOT / "deploy" / "grafana" / "mqtt-pdp-dashboard.json").read_text())
        plotted = {name for panel in dashboard["panels"] for target in panel["targets"]
                   for name in re.findall(r"\bmqtt_pdp_\w+", target["expr"])}
        assert plotted and plotted <= served, plotted - served
    finally:
        for client in running.clients:
            client.client.loop_stop()
        assert running.process.stop() == 0


def test_metrics_port_in_use_stops_the_broker_with_one_line(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        pki = TestPki(tmp_path / "pki")
        shutil.copytree(ROOT / "policies", tmp_path / "policies")
        config = write_cli_config(tmp_path / "broker.yaml", pki, tmp_path / "policies",
                                  metrics=f"127.0.0.1:{holder.getsockname()[1]}")
        result = cli("broker", "-c", str(config))
    finally:
        holder.close()
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "mqtt-pdp: error: broker failed: [Errno 98] Address already in use"
    assert "Traceback" not in result.stderr


def test_admin_socket_in_use_and_bad_metrics_address_are_one_line(running: Running, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    config = write_cli_config(other / "second.yaml", running.pki, running.policies, admin_socket=running.socket)
    result = cli("broker", "-c", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (f"mqtt-pdp: error: broker failed: admin_socket {running.socket} "
                                              "is in use by another running broker")
    assert running.admin("status")["connections"] == 0  # the running broker kept its socket
    config = write_cli_config(other / "third.yaml", running.pki, running.policies, metrics="nonsense")
    result = cli("broker", "-c", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == ("mqtt-pdp: error: broker failed: metrics 'nonsense': use host:port "
                                              "with a port from 0 to 65535, e.g. 127.0.0.1:9883")


def test_redis_outage_shows_in_metrics_and_status(make_broker, own_redis, tmp_path: Path) -> None:
    admin = str(tmp_path / "a.sock")
    broker = make_broker(redis_url=own_redis.url, redis_prefix="ops", metrics="127.0.0.1:0", admin_socket=admin)
    service = broker.plugin.service
    url = "http://%s:%d/metrics" % service.metrics.address
    wait_for(lambda: broker.run(service.bus.subscribed.is_set), "bus subscribed")
    m = scrape(url)
    assert (m[("mqtt_pdp_redis_up", ())], m[("mqtt_pdp_redis_outages_total", ())]) == (1, 0)

    own_redis.stop()
    wait_for(lambda: scrape(url)[("mqtt_pdp_redis_up", ())] == 0, "the outage noticed")
    assert scrape(url)[("mqtt_pdp_redis_outages_total", ())] == 1
    status = json.loads(cli("status", "--socket", admin, "--json").stdout)
    assert status["redis"] == {"url": own_redis.url, "available": False, "outages": 1}

    own_redis.start()
    wait_for(lambda: scrape(url)[("mqtt_pdp_redis_up", ())] == 1, "Redis back")
    assert json.loads(cli("status", "--socket", admin, "--json").stdout)["redis"]["available"] is True


def test_status_shows_the_loader_and_a_reload_in_progress(running: Running) -> None:
    """A stuck loader process holds a change back (up to its timeout): the operator must be able to see it."""
    wait_for(lambda: running.admin("status")["reloads"]["loader_pid"] is not None, "the loader process started")
    reloads = running.admin("status")["reloads"]
    loader = reloads["loader_pid"]
    assert reloads["pending_since"] is None and reloads["loader_starts"] == 1
    os.kill(loader, signal.SIGSTOP)
    try:
        policy = running.policies / "policy.csv"
        policy.write_text(policy.read_text() + "# edited\n")
        wait_for(lambda: running.admin("status")["reloads"]["pending_since"] is not None, "the reload to wait")
        text = cli("status", "--socket", running.socket).stdout
        assert f"parsed by the loader process (pid {loader})" in text and "one in progress since" in text
    finally:
        os.kill(loader, signal.SIGCONT)
    wait_for(lambda: running.admin("status")["reloads"]["by_loader"] == 1, "the change applied by the loader")
    assert running.admin("status")["reloads"]["pending_since"] is None
