"""Moments of change, attacked with real clients: a superseded connection, revocation racing traffic."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pdp.evidence.store import AssertionStore, QueryFilters
from tests.conftest import DEVICES, registry_yaml
from tests.rawmqtt import RawClient
from tests.support import TestPki, wait_for


def _live_connections(broker, client_id: str) -> int:
    return broker.run(lambda: sum(1 for c in broker.broker._connections.values() if c.session.client_id == client_id))


def test_superseded_connection_is_closed_and_gets_nothing_through(broker, connect, test_pki: TestPki) -> None:
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    old = RawClient(broker.port, test_pki.device("sensor-1"), test_pki.ca_file)
    assert old.connect("sensor-1", clean=True) == 0
    assert old.publish("sites/plant-a/sensor-1/telemetry", b"old before")
    assert dashboard.next_message().payload == b"old before"  # positive control: the raw client works

    new = connect("sensor-1")  # clean session, while the old connection is still open
    assert old.closed_by_peer(), "the previous connection of the client id stayed open"
    old.publish("sites/plant-a/sensor-1/telemetry", b"old after")  # whatever still arrives must not pass
    new.publish("sites/plant-a/sensor-1/telemetry", b"new")
    assert [m.payload for m in dashboard.messages_until("sites/plant-a/sensor-1/telemetry")] == [b"new"]
    assert _live_connections(broker, "sensor-1") == 1
    old.close()


def test_suspension_leaves_no_connection_of_the_device(broker, connect, policy_dir: Path, test_pki: TestPki) -> None:
    first = RawClient(broker.port, test_pki.device("sensor-1"), test_pki.ca_file)
    assert first.connect("sensor-1") == 0
    second = connect("sensor-1")
    assert first.closed_by_peer()
    attempts = broker.plugin.service.reload_attempts
    devices = [(d, t, loc, "suspended" if d == "sensor-1" else s) for d, t, loc, s in DEVICES]
    (policy_dir / "devices.yaml").write_text(registry_yaml(devices))
    broker.wait_reload(attempts)
    assert second.wait_disconnected(), "the suspended device's connection stayed open"
    wait_for(lambda: _live_connections(broker, "sensor-1") == 0, "no connection of sensor-1 left")
    first.close()


def test_no_decision_after_revocation_uses_the_old_attributes(make_broker, policy_dir: Path, test_pki: TestPki) -> None:
    """Twenty devices keep publishing while the registry suspends them: every publish judged
    under the new revision is a denial (before, the swap came first and revocation some awaits later)."""
    sensors = [(f"burst-{i}", "sensor", "plant-a", "active") for i in range(20)]
    (policy_dir / "devices.yaml").write_text(registry_yaml(DEVICES + sensors))
    broker = make_broker()
    clients = []
    for device_id, *_ in sensors:
        client = RawClient(broker.port, test_pki.device(device_id), test_pki.ca_file)
        assert client.connect(device_id) == 0
        clients.append(client)
    stop = threading.Event()

    def flood(client: RawClient, device_id: str) -> None:
        # Paced a little: the broker runs in this process, and twenty tight loops would starve it of the GIL.
        while not stop.is_set() and client.publish(f"sites/plant-a/{device_id}/telemetry", b"x" * 16):
            stop.wait(0.002)

    threads = [threading.Thread(target=flood, args=(c, d), daemon=True) for c, (d, *_) in zip(clients, sensors)]
    for thread in threads:
        thread.start()
    store_path = policy_dir.parent / "assertions.db"
    attempts = broker.plugin.service.reload_attempts
    suspended = [(d, t, loc, "suspended") for d, t, loc, _ in sensors]
    (policy_dir / "devices.yaml").write_text(registry_yaml(DEVICES + suspended))
    broker.wait_reload(attempts)
    new_revision = broker.plugin.service.pdp.snapshot_revision
    try:
        for client in clients:
            assert client.closed_by_peer(), "a suspended device's connection stayed open"
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    broker.stop()  # flushes the assertion log

    store = AssertionStore(store_path, readonly=True)
    records = [r for _, r in store.query(QueryFilters(action="publish"))]
    store.close()
    burst = {d for d, *_ in sensors}
    before = [r for r in records if r.device_id in burst and r.policy_revision != new_revision]
    after = [r for r in records if r.device_id in burst and r.policy_revision == new_revision]
    assert before and all(r.decision == "allow" for r in before)  # the flood ran before the change
    assert [r for r in after if r.decision == "allow"] == []


# -- client ids map to exactly one device -------------------------------------------------------------


def test_client_id_overlap_is_found_for_star_patterns_only() -> None:
    from pdp.core.admission import client_id_overlap

    assert client_id_overlap("{device_id}-*", ["valve-1", "valve-2", "valve-1-b"]) == ("valve-1", "valve-1-b")
    assert client_id_overlap("{device_id}-*", ["valve-1", "valve-2", "valve-10"]) is None  # '-' ends each prefix
    assert client_id_overlap("{device_id}*", ["valve-1", "valve-10"]) == ("valve-1", "valve-10")
    assert client_id_overlap("{device_id}", ["valve-1", "valve-1-b"]) is None  # exact: no sharing possible
    assert client_id_overlap("pre/{device_id}/*", ["a", "b"]) is None


def test_ambiguous_client_id_pattern_is_refused_with_the_line(make_broker, connect, policy_dir: Path) -> None:
    devices = DEVICES + [("valve-1", "sensor", "plant-a", "active"), ("valve-1-b", "sensor", "plant-a", "active")]
    (policy_dir / "devices.yaml").write_text(registry_yaml(devices))
    with pytest.raises(Exception) as failed:
        make_broker(client_id="{device_id}-*")
    refused = failed.value.__cause__
    line = 1 + 6 * len(DEVICES) + 6 + 1  # 'devices:', six lines per device, then valve-1-b's first line
    assert str(refused) == (
        f"{policy_dir / 'devices.yaml'}:{line}: client id pattern '{{device_id}}-*' lets device 'valve-1' use the "
        "client ids of device 'valve-1-b' (e.g. 'valve-1-b-x') and take over its session; rename one of them or "
        "use a pattern without '*'")


def test_unambiguous_star_pattern_admits_suffixes(make_broker, test_pki: TestPki) -> None:
    from tests.support import Client

    broker = make_broker(client_id="{device_id}-*")
    good = Client(broker.port, "sensor-1-main", test_pki.device("sensor-1"), test_pki.ca_file)
    assert good.connect() == 0
    other = Client(broker.port, "sensor-2-main", test_pki.device("sensor-1"), test_pki.ca_file)
    assert other.connect() == 5  # another device's prefix
    good.close()
    other.close()


# -- retained messages carry their publisher's rights --------------------------------------------------


def test_retained_command_is_not_served_after_its_publisher_is_suspended(broker, connect, policy_dir: Path) -> None:
    root = connect("root-1")
    root.publish("a/valve/cmd", b"open", qos=1, retain=True)
    first = connect("watcher-1")
    assert first.subscribe("a/#") == 0
    assert first.next_message().payload == b"open"  # positive control: served while root-1 may publish it
    first.close()
    attempts = broker.plugin.service.reload_attempts
    devices = [(d, t, loc, "suspended" if d == "root-1" else s) for d, t, loc, s in DEVICES]
    (policy_dir / "devices.yaml").write_text(registry_yaml(devices))
    broker.wait_reload(attempts)
    assert root.wait_disconnected()
    later = connect("watcher-1")
    assert later.subscribe("a/#") == 0
    connect("root-2").publish("a/sentinel", b"after", qos=1)
    assert [m.payload for m in later.messages_until("a/sentinel")] == [b"after"]


# -- subscriptions are judged again on reload ----------------------------------------------------------


def test_subscription_no_longer_granted_is_dropped_on_reload(broker, connect, policy_dir: Path) -> None:
    watcher = connect("watcher-1")
    assert watcher.subscribe("a/#") == 0
    assert watcher.subscribe("a/sentinel/+") == 0
    root = connect("root-1")
    root.publish("a/x", b"before")
    assert watcher.next_message().payload == b"before"
    attempts = broker.plugin.service.reload_attempts
    policy = (policy_dir / "policy.csv").read_text()
    (policy_dir / "policy.csv").write_text(policy.replace("p, watcher-sub, watcher, *, *, a/#,",
                                                          "p, watcher-sub, watcher, *, *, a/sentinel/#,"))
    broker.wait_reload(attempts)
    # watcher-recv still allows receiving a/x: only the dropped subscription stops the delivery.
    root.publish("a/x", b"after")
    root.publish("a/sentinel/1", b"sentinel")
    assert [m.payload for m in watcher.messages_until("a/sentinel/1")] == [b"sentinel"]
    assert not watcher.disconnected.is_set()


def test_persistent_takeover_of_a_clean_session_starts_fresh(broker, connect, test_pki: TestPki) -> None:
    """[MQTT-3.1.2-6]: a clean session is never resumed, even by a takeover that arrives while it is live."""
    from tests.rawmqtt import subscribe_packet

    old = RawClient(broker.port, test_pki.device("sensor-1"), test_pki.ca_file)
    assert old.connect("sensor-1", clean=True) == 0
    assert old.send(subscribe_packet([("sites/plant-a/sensor-1/cmd", 0)]))
    assert old.read_packet()[0] == 0x90  # SUBACK: the clean session holds the filter
    new = connect("sensor-1", clean=False)  # takes over while the clean session is live
    assert new.session_present is False
    assert old.closed_by_peer()
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"not for a subscription it never made")
    # routed (to every target at once) by the time the dashboard gets its own copy; only then subscribe
    assert dashboard.next_message().payload == b"not for a subscription it never made"
    assert new.subscribe("sites/plant-a/sensor-1/cmd") == 0
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"after subscribing")
    assert new.next_message().payload == b"after subscribing"
    old.close()
