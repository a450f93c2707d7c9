"""Policy authors' loop: edits apply without a restart; a broken file changes nothing; revoked devices leave."""

from __future__ import annotations

import pytest

from tests.conftest import DEVICES, registry_yaml


def edit(broker, path, new_text: str) -> None:
    attempts = broker.plugin.service.reload_attempts
    path.write_text(new_text)
    broker.wait_reload(attempts)


def test_policy_edit_applies_without_restart(broker, connect, policy_dir):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/debug", b"before: denied")
    policy = policy_dir / "policy.csv"
    edit(broker, policy, policy.read_text() + "p, sensor-debug, sensor, *, *, sites/{location}/{device_id}/debug, publish, allow\n")
    assert broker.plugin.service.pdp.last_error is None
    sensor.publish("sites/plant-a/sensor-1/debug", b"after: allowed")
    assert [m.payload for m in dashboard.messages_until("sites/plant-a/sensor-1/debug")] == [b"after: allowed"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("p, broken, sensor, *, *, a/#/b, publish, allow", "policy.csv:21: filter 'a/#/b': '#' must be the whole last level"),
        ("p, broken, sensor, *, *, a/{serial}, publish, allow", "policy.csv:21: pattern 'a/{serial}': unknown placeholder {serial}"),
        ("p, broken, sensor, *, *, a/b, publsh, allow", "policy.csv:21: action 'publsh' is not one of publish, subscribe, receive"),
        ("p, broken, sensor, *, a/b, publish, allow", "policy.csv:21: expected 7 fields after 'p'"),
        ("p, sensor-pub, sensor, *, *, a/b, publish, allow", "policy.csv:21: rule id 'sensor-pub' already used at line 2"),
    ],
)
def test_broken_policy_rejected_old_policy_stays(broker, connect, policy_dir, bad_line, message):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    policy = policy_dir / "policy.csv"
    good = policy.read_text()
    assert len(good.splitlines()) == 20
    revision = broker.plugin.service.pdp.snapshot.snapshot_revision
    edit(broker, policy, good + bad_line + "\n")
    assert message in (broker.plugin.service.pdp.last_error or "")
    assert broker.plugin.service.pdp.snapshot.snapshot_revision == revision
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"old policy in force")
    assert dashboard.next_message().payload == b"old policy in force"


def test_broken_registry_rejected_with_line(broker, connect, policy_dir):
    registry = policy_dir / "devices.yaml"
    edit(broker, registry, registry.read_text().replace("status: active", "status: enabled", 1))
    assert "devices.yaml:7: status 'enabled' is not one of provisioned, active, suspended, retired" in broker.plugin.service.pdp.last_error
    connect("sensor-1", expect=0)


@pytest.mark.parametrize("status", ["suspended", "retired"])
def test_device_no_longer_active_is_disconnected_on_reload(broker, connect, policy_dir, status):
    sensor = connect("sensor-1", clean=False)
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
    devices = [(d, t, loc, status if d == "sensor-1" else s) for d, t, loc, s in DEVICES]
    edit(broker, policy_dir / "devices.yaml", registry_yaml(devices))
    assert sensor.wait_disconnected()
    assert broker.run(lambda: "sensor-1" not in broker.broker._sessions)
    connect("sensor-1", expect=5)


def test_rebound_device_is_disconnected_on_reload(broker, connect, policy_dir, test_pki):
    sensor = connect("sensor-1")
    other = test_pki.save("sensor-1-new", __import__("pdp.pki", fromlist=["x"]).issue_device(test_pki.ca, "sensor-1", "test.example"))
    edit(broker, policy_dir / "devices.yaml", registry_yaml(DEVICES, bound={"sensor-1": other.fingerprint}))
    assert sensor.wait_disconnected()
    connect("sensor-1", expect=5)
    connect("sensor-1", creds=other, expect=0)


def test_unchanged_device_stays_connected_on_reload(broker, connect, policy_dir):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    devices = [(d, t, loc, "retired" if d == "sensor-2" else s) for d, t, loc, s in DEVICES]
    edit(broker, policy_dir / "devices.yaml", registry_yaml(devices))
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"x")
    assert dashboard.next_message().payload == b"x"
    assert not dashboard.disconnected.is_set()
