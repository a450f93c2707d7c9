"""Shared-certificate detection: the pure tracker, then a real broker with paho clients."""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

from pdp.core.sharing import SharingTracker, host_of
from pdp.evidence.store import AssertionStore, QueryFilters
from tests.support import Client

FP = "f" * 64


def test_two_live_connections_with_different_client_ids_share() -> None:
    tracker = SharingTracker(window=60)
    assert tracker.check(FP, "dev-a", "10.0.0.1:4000", 0) is None
    tracker.opened(1, FP, "dev-a", "10.0.0.1:4000", 0)
    assert tracker.check(FP, "dev-a", "10.0.0.1:4001", 1) is None  # a reconnect of the same client id
    found = tracker.check(FP, "dev-b", "10.0.0.1:4002", 1)
    assert found is not None and (found.kind, found.other_client_id) == ("concurrent", "dev-a")
    tracker.closed(1)
    assert tracker.check(FP, "dev-b", "10.0.0.1:4002", 2) is None  # one after the other, same address


def test_two_addresses_within_the_window_share_and_after_it_do_not() -> None:
    tracker = SharingTracker(window=60)
    tracker.opened(1, FP, "dev-a", "10.0.0.1:4000", 0)
    tracker.closed(1)
    found = tracker.check(FP, "dev-a", "10.0.0.2:5000", 30)
    assert found is not None and (found.kind, found.other_address) == ("addresses", "10.0.0.1")
    assert tracker.check(FP, "dev-a", "10.0.0.2:5000", 61) is None
    tracker.opened(2, FP, "dev-a", "10.0.0.2:5000", 200)  # sweeps what is older than the window
    assert tracker._seen == {FP: {"10.0.0.2": (200, "dev-a")}}
    assert host_of("[::1]:8883") == "::1"


def _records(db: str, action: str) -> list:
    store = AssertionStore(db, readonly=True)
    try:
        return [r for _, r in store.query(QueryFilters(action=action))]
    finally:
        store.close()


def test_one_certificate_on_two_connections_is_warned_and_recorded(make_broker, connect_to, policy_dir, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.service")
    broker = make_broker(client_id="{device_id}-*")
    first = connect_to(broker, "sensor-1", "sensor-1-a")
    second = connect_to(broker, "sensor-1", "sensor-1-b")  # warn: admitted
    assert broker.plugin.service.shared_certificates == 1
    assert any(r.getMessage().startswith("shared certificate: client=sensor-1-b device=sensor-1")
               for r in caplog.records)
    assert not first.disconnected.is_set() and not second.disconnected.is_set()
    broker.stop()
    [record] = _records(str(policy_dir.parent / "assertions.db"), "shared-certificate")
    assert (record.device_id, record.client_id, record.decision) == ("sensor-1", "sensor-1-b", "allow")
    assert "sensor-1-a" in record.reason


def test_refuse_mode_refuses_the_second_connection_and_keeps_the_first(make_broker, connect_to, policy_dir,
                                                                        refused_reason):
    broker = make_broker(client_id="{device_id}-*", shared_certificate="refuse")
    first = connect_to(broker, "sensor-1", "sensor-1-a")
    connect_to(broker, "sensor-1", "sensor-1-b", expect=5)
    assert refused_reason("sensor-1-b").startswith("shared certificate: also in use by client 'sensor-1-a'")
    first.publish("sites/plant-a/sensor-1/telemetry", b"still here")
    assert not first.disconnected.is_set()
    broker.stop()
    [record] = _records(str(policy_dir.parent / "assertions.db"), "shared-certificate")
    assert (record.client_id, record.decision) == ("sensor-1-b", "deny")


def test_same_certificate_from_a_second_address_within_the_window_is_refused(make_broker, test_pki,
                                                                             refused_reason):
    broker = make_broker(shared_certificate="refuse")
    here = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    elsewhere = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    elsewhere.client.connect = lambda host, port, keepalive: mqtt.Client.connect(  # type: ignore[method-assign]
        elsewhere.client, host, port, keepalive=keepalive, bind_address="127.0.0.2")
    try:
        assert here.connect() == 0
        here.close()
        assert elsewhere.connect() == 5  # the same key from another address, within the window
        assert "also connected from 127.0.0.1" in refused_reason("sensor-1")
    finally:
        here.close()
        elsewhere.close()
