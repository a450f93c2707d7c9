"""Redis is not trusted with decisions: forged, replayed or foreign L2 entries grant nothing.

Anyone who can write to Redis can compute the L2 hash keys from the registry. These tests
write entries straight into the hash the broker reads at connect, then connect the device
with real TLS and paho clients and show that every forged grant is refused, while entries
a broker holding the same key wrote are warmed into L1 and answer without the index.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from pdp.core.engine import decision_for
from pdp.runtime.cache import EntrySealer, load_l2_key
from pdp.runtime.service import AuthorizationService
from pdp.runtime.settings import ServiceSettings
from tests.support import BrokerThread, Client, TestPki, wait_for, write_cli_config

ROOT = Path(__file__).resolve().parent.parent
SEP = "\x00"


def key_file(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(os.urandom(32))
    return path


def l2_field_count(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    return sum(client.hlen(key) for key in client.scan_iter(f"{prefix}:l2:*"))


def l2_hash_key(broker: BrokerThread, device_id: str) -> str:
    """The hash key the broker reads at connect, computed as the broker computes it."""
    service = broker.plugin.service
    snapshot = service.pdp.snapshot
    device = snapshot.registry.lookup(device_id)
    assert device is not None and service.l2 is not None
    return service.l2.key(snapshot.policy.revision, device.attributes_revision)


def l1_has(broker: BrokerThread, device_id: str, action: str, topic: str) -> bool:
    snapshot = broker.plugin.service.pdp.snapshot
    device = snapshot.registry.lookup(device_id)
    assert device is not None
    return broker.run(lambda: (device.attributes_revision, action, topic) in snapshot.l1)


def connect(broker: BrokerThread, test_pki: TestPki, device: str, clients: list[Client]) -> Client:
    client = Client(broker.port, device, test_pki.device(device), test_pki.ca_file)
    clients.append(client)
    assert client.connect() == 0
    return client


def wait_warmed(broker: BrokerThread, fetches: int) -> None:
    """The warm-up fills L1 in the same loop step as its fetch completes, so a fetch counted is a warm-up done."""
    l2 = broker.plugin.service.l2
    assert l2 is not None
    wait_for(lambda: broker.run(lambda: l2.fetches) >= fetches, "L1 warm-up from L2")


def test_forged_l2_entries_grant_nothing(make_broker, test_pki, shared_redis_url, redis_prefix, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.l2")
    key = key_file(tmp_path, "l2.key")
    common: dict[str, Any] = {"redis_url": shared_redis_url, "redis_prefix": redis_prefix, "l2_key_file": str(key)}
    writer, reader = make_broker(**common), make_broker(**common)
    clients: list[Client] = []
    try:
        # Genuine entries: decisions the first broker took and wrote behind.
        sensor = connect(writer, test_pki, "sensor-1", clients)
        assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
        assert sensor.subscribe("sites/plant-b/#") == 0x80
        assert sensor.subscribe("sites/plant-a/#") == 0x80
        dashboard = connect(writer, test_pki, "dash-1", clients)
        assert dashboard.subscribe("sites/plant-a/#") == 0
        wait_for(lambda: l2_field_count(shared_redis_url, redis_prefix) >= 4, "genuine entries written")
        for client in clients:
            client.close()
        clients.clear()

        server = redis.Redis.from_url(shared_redis_url)
        sensor_key, dash_key = l2_hash_key(writer, "sensor-1"), l2_hash_key(writer, "dash-1")
        genuine = server.hgetall(sensor_key)
        cmd_entry = genuine[f"subscribe{SEP}sites/plant-a/sensor-1/cmd".encode()]
        dash_entry = server.hgetall(dash_key)[f"subscribe{SEP}sites/plant-a/#".encode()]
        right = EntrySealer(key.read_bytes())  # a holder of the key forging (or a bug): caught by the policy check
        wrong = EntrySealer(os.urandom(32))  # an attacker with Redis access but not the key
        allow = decision_for(True, "x")

        def sealed(sealer: EntrySealer, action: str, topic: str, rule_id: str) -> bytes:
            return sealer.seal(sensor_key, action, topic, decision_for(True, rule_id)).encode()

        forged: dict[tuple[str, str], bytes] = {
            ("subscribe", "#"): b"Aroot-sub",  # the entry format before sealing, as in the issue
            ("subscribe", "$SYS/#"): sealed(right, "subscribe", "$SYS/#", "sys-sub"),  # real rule, not the sensor's
            ("receive", "sites/plant-a/secret/key"): sealed(wrong, "receive", "sites/plant-a/secret/key", "sensor-recv-cmd"),
            ("subscribe", "sites/plant-a/secret/key"): sealed(wrong, "subscribe", "sites/plant-a/secret/key", "sensor-sub-cmd"),
            ("publish", "sites/plant-a/sensor-1/firmware"): sealed(right, "publish", "sites/plant-a/sensor-1/firmware", "backdoor"),
            ("subscribe", "sites/+/#"): sealed(wrong, "subscribe", "sites/+/#", "dash-sub"),
            ("subscribe", "sites/plant-a/+/cmd"): cmd_entry,  # a genuine entry moved to another topic
            ("subscribe", "sites/plant-a/#"): dash_entry,  # another device's genuine entry, same field
            ("subscribe", "sites/#"): b"v2" + sealed(right, "subscribe", "sites/#", "root-sub")[2:],  # unknown version
            ("subscribe", "sites/#/x"): sealed(right, "subscribe", "sites/#/x", "root-sub"),  # not a valid filter
            ("publish", "sites/plant-a/sensor-1/valve"): right.seal(sensor_key, "publish", "sites/plant-a/sensor-1/valve",
                                                                   allow).encode().replace(b"|A|x|", b"|A|sensor-pub|"),
        }
        server.hset(sensor_key, mapping={f"{a}{SEP}{t}".encode(): v for (a, t), v in forged.items()})
        kept = {(a, t) for a, t in (f.decode().split(SEP) for f in genuine) if (a, t) not in forged}
        assert len(kept) == 2  # subscribe .../cmd (allow) and subscribe sites/plant-b/# (deny by no rule)

        # The device connects to the other broker, which warms its L1 from that hash.
        l2 = reader.plugin.service.l2
        assert l2 is not None
        sensor = connect(reader, test_pki, "sensor-1", clients)
        wait_warmed(reader, 1)
        assert reader.run(lambda: l2.rejected) == len(forged)
        for action, topic in forged:
            assert not l1_has(reader, "sensor-1", action, topic), (action, topic)
        for action, topic in kept:
            assert l1_has(reader, "sensor-1", action, topic), (action, topic)
        warnings = [r.getMessage() for r in caplog.records if r.name == "mqtt_pdp.l2"]
        assert len(warnings) == 1 and f"ignored {len(forged)} L2 entries in {sensor_key}" in warnings[0], warnings

        # Positive control: the genuine entries answer from L1, no index computation (no L1 miss).
        l1 = reader.plugin.service.pdp.snapshot.l1
        misses, hits = reader.run(lambda: (l1.misses, l1.hits))
        assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
        assert sensor.subscribe("sites/plant-b/#") == 0x80
        assert reader.run(lambda: (l1.misses, l1.hits)) == (misses, hits + 2)

        # Every forged grant is refused by the compiled policy.
        for topic_filter in ("#", "$SYS/#", "sites/plant-a/secret/key", "sites/+/#", "sites/plant-a/+/cmd",
                             "sites/plant-a/#", "sites/#"):
            assert sensor.subscribe(topic_filter) == 0x80, topic_filter
        device = reader.plugin.service.pdp.snapshot.registry.lookup("sensor-1")
        decision, tier, _ = reader.run(lambda: reader.plugin.service.pdp.lookup(device, "receive", "sites/plant-a/secret/key"))
        assert (decision.allowed, decision.rule_id, tier) == (False, "no-secret", "index")
        dashboard = connect(reader, test_pki, "dash-1", clients)
        assert dashboard.subscribe("sites/plant-a/#") == 0
        root = connect(reader, test_pki, "root-1", clients)
        root.publish("sites/plant-a/secret/key", b"secret")
        sensor.publish("sites/plant-a/sensor-1/firmware", b"forged allow, rule 'backdoor'")
        sensor.publish("sites/plant-a/sensor-1/valve", b"forged allow, MAC does not cover sensor-pub")
        sensor.publish("sites/plant-a/sensor-1/telemetry", b"allowed")
        assert [m.topic for m in dashboard.messages_until("sites/plant-a/sensor-1/telemetry")] == [
            "sites/plant-a/sensor-1/telemetry"]
        dashboard.publish("sites/plant-a/sensor-1/cmd", b"marker")
        assert [m.topic for m in sensor.messages_until("sites/plant-a/sensor-1/cmd")] == ["sites/plant-a/sensor-1/cmd"]
        assert reader.run(lambda: l2.rejected) == len(forged)  # dash-1's hash held only its genuine entry
    finally:
        for client in clients:
            client.close()


def test_brokers_with_different_keys_ignore_each_other(make_broker, test_pki, shared_redis_url, redis_prefix, tmp_path):
    common: dict[str, Any] = {"redis_url": shared_redis_url, "redis_prefix": redis_prefix}
    first = make_broker(l2_key_file=str(key_file(tmp_path, "a.key")), **common)
    second = make_broker(l2_key_file=str(key_file(tmp_path, "b.key")), **common)
    clients: list[Client] = []
    try:
        sensor = connect(first, test_pki, "sensor-1", clients)
        assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
        assert sensor.subscribe("sites/plant-a/#") == 0x80
        wait_for(lambda: l2_field_count(shared_redis_url, redis_prefix) >= 2, "entries written by the first broker")
        sensor.close()
        sensor = connect(second, test_pki, "sensor-1", clients)
        wait_warmed(second, 1)
        assert second.run(lambda: second.plugin.service.l2.rejected) == 2
        assert not l1_has(second, "sensor-1", "subscribe", "sites/plant-a/sensor-1/cmd")
        l1 = second.plugin.service.pdp.snapshot.l1
        misses = second.run(lambda: l1.misses)
        assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0  # decided again by the second broker's index
        assert second.run(lambda: l1.misses) == misses + 1
    finally:
        for client in clients:
            client.close()


def test_without_key_file_l2_is_off_and_announcements_still_work(make_broker, test_pki, policy_dir, shared_redis_url,
                                                                redis_prefix, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.service")
    common: dict[str, Any] = {"redis_url": shared_redis_url, "redis_prefix": redis_prefix}
    first = make_broker(**common)
    warnings = [r.getMessage() for r in caplog.records if r.name == "mqtt_pdp.service" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "l2_key_file" in warnings[0], warnings
    second = make_broker(reload_interval=3600, **common)  # never polls: only an announcement can reach it
    assert first.plugin.service.l2 is None and second.plugin.service.l2 is None
    clients: list[Client] = []
    try:
        sensor = connect(second, test_pki, "sensor-1", clients)
        assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
        assert sensor.subscribe("sites/plant-a/#") == 0x80
        assert l2_field_count(shared_redis_url, redis_prefix) == 0  # nothing written, nothing read
        for broker in (first, second):
            bus = broker.plugin.service.bus
            wait_for(lambda b=broker, bus=bus: b.run(bus.subscribed.is_set), "bus subscribed")
        policy = policy_dir / "policy.csv"
        policy.write_text(policy.read_text() + "p, debug, sensor, *, *, sites/{location}/{device_id}/debug, subscribe, allow\n")
        wait_for(lambda: second.run(lambda: second.plugin.service.remote_reloads) >= 1, "announcement reached the second broker")
        assert sensor.subscribe("sites/plant-a/sensor-1/debug") == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("content", [None, b"", b"x" * 15], ids=["missing", "empty", "short"])
def test_bad_key_file_stops_the_service_at_start(policy_dir, tmp_path, content):
    path = tmp_path / "l2.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"^l2_key_file "):
        load_l2_key(str(path))
    settings = ServiceSettings(model=str(policy_dir / "model.conf"), policy=str(policy_dir / "policy.csv"),
                               registry=str(policy_dir / "devices.yaml"), redis_url="redis://127.0.0.1:1/0",
                               l2_key_file=str(path), assertions=False)
    with pytest.raises(ValueError, match=r"^l2_key_file "):
        AuthorizationService(settings)
    path.write_bytes(b"k" * 16)
    assert load_l2_key(str(path)) == b"k" * 16


def test_broker_command_reports_bad_key_file_in_one_line(tmp_path, test_pki, policy_dir):
    """A relative l2_key_file is resolved against the config file's directory, like the other file settings."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "l2.key").write_bytes(b"short")
    config = write_cli_config(tmp_path / "b.yaml", test_pki, policy_dir, redis_url="redis://127.0.0.1:1/0",
                              l2_key_file="keys/l2.key")
    assert yaml.safe_load(config.read_text())["plugins"]["broker_plugin.plugin.DeviceAuthorizationPlugin"]["l2_key_file"] == "keys/l2.key"
    result = subprocess.run([sys.executable, "-m", "pdp.cli", "broker", "-c", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            check=False)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("mqtt-pdp: error: ")]
    assert len(lines) == 1 and f"l2_key_file {tmp_path / 'keys' / 'l2.key'}: only 5 bytes" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_l2_key_command_writes_an_owner_only_key_once(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pdp.cli", "l2-key", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)

    path = tmp_path / "deploy" / "l2.key"
    missing = run("--out", str(path))
    assert (missing.returncode, missing.stderr) == (2, f"mqtt-pdp: error: {path.parent} is not a directory\n")
    path.parent.mkdir()
    assert run("--out", str(path)).returncode == 0
    key = load_l2_key(str(path))
    assert len(key) == 32 and path.stat().st_mode & 0o077 == 0
    again = run("--out", str(path))
    assert again.returncode == 2 and again.stderr.startswith("mqtt-pdp: error: ") and "exists" in again.stderr
    assert path.read_bytes() == key
    assert run("--out", str(path), "--force").returncode == 0 and path.read_bytes() != key


def test_a_subscribe_deny_entry_is_checked_by_overlap_as_the_index_decides_it() -> None:
    """Found by an outside attack: the broker's own L2 entry for a subscribe refused by an overlapping deny was
    rejected at the next connect as possible tampering (a false alarm on every connect of a dashboard)."""
    from pdp.core.engine import Rule
    from pdp.runtime.cache import _policy_problem

    rules = {"no-secrets": Rule("no-secrets", "*", "*", "*", "sites/+/secret/#", "subscribe", "deny", 3),
             "dash": Rule("dash", "*", "*", "*", "sites/{location}/#", "subscribe", "allow", 4)}
    attrs = {"type": "dashboard", "location": "plant-a", "purpose": "ops", "owner": "o", "device_id": "d1"}
    assert _policy_problem(rules, attrs, "subscribe", "sites/plant-a/#", False, "no-secrets", {}) is None
    assert _policy_problem(rules, attrs, "subscribe", "sites/plant-a/open", False, "no-secrets", {}) is not None
    assert _policy_problem(rules, attrs, "subscribe", "sites/plant-a/#", True, "dash", {}) is None
    assert _policy_problem(rules, attrs, "subscribe", "sites/#", True, "dash", {}) is not None  # allow must cover
