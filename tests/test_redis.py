"""Redis as the shared tier: L2 decisions shared between brokers, invalidation across broker processes,
and decisions that keep coming out right while Redis is down."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import redis

from tests.support import BrokerProcess, Client, wait_for, write_cli_config


def l2_fields(url: str, prefix: str) -> dict[str, dict[bytes, bytes]]:
    client = redis.Redis.from_url(url)
    return {key.decode(): client.hgetall(key) for key in client.scan_iter(f"{prefix}:l2:*")}


def l2_key_file(directory: Path, name: str = "l2.key") -> str:
    """A fresh L2 key, as an operator makes one (head -c 32 /dev/urandom)."""
    path = directory / name
    path.write_bytes(os.urandom(32))
    return str(path)


def test_l2_is_shared_by_brokers_on_one_redis(make_broker, test_pki, shared_redis_url, redis_prefix, tmp_path):
    key = l2_key_file(tmp_path)
    first = make_broker(redis_url=shared_redis_url, redis_prefix=redis_prefix, l2_key_file=key)
    second = make_broker(redis_url=shared_redis_url, redis_prefix=redis_prefix, l2_key_file=key)
    client = Client(first.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    assert client.connect() == 0
    assert client.subscribe("sites/plant-a/sensor-1/cmd") == 0
    assert client.subscribe("sites/plant-a/#") == 0x80
    client.close()
    wait_for(lambda: sum(len(f) for f in l2_fields(shared_redis_url, redis_prefix).values()) >= 2, "L2 written")
    (key, fields), = l2_fields(shared_redis_url, redis_prefix).items()
    assert sorted(fields) == [b"subscribe\x00sites/plant-a/#", b"subscribe\x00sites/plant-a/sensor-1/cmd"]
    assert fields[b"subscribe\x00sites/plant-a/sensor-1/cmd"].startswith(b"v1|A|sensor-sub-cmd|")
    assert fields[b"subscribe\x00sites/plant-a/#"].startswith(b"v1|D||")
    assert 0 < redis.Redis.from_url(shared_redis_url).ttl(key) <= 3600
    # The second broker warms its L1 from L2 when the device connects there, before any decision.
    client = Client(second.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    assert client.connect() == 0
    l1 = second.plugin.service.pdp.snapshot.l1
    wait_for(lambda: second.run(lambda: len(l1)) >= 2, "second broker's L1 warmed from L2")
    assert second.run(lambda: (len(l1), l1.misses)) == (2, 0)  # exactly the two L2 entries, no decision taken yet
    assert second.run(lambda: second.plugin.service.l2.rejected) == 0
    assert client.subscribe("sites/plant-a/sensor-1/cmd") == 0
    assert second.run(lambda: (l1.hits, l1.misses)) == (1, 0)  # answered from the warmed entry
    client.close()


def test_policy_reload_reaches_another_broker_process(tmp_path, test_pki, policy_dir, shared_redis_url, redis_prefix):
    """Two `mqtt-pdp broker` processes, one Redis; the second never polls, so only the announcement can reach it."""
    common = dict(redis_url=shared_redis_url, redis_prefix=redis_prefix)
    first = BrokerProcess(write_cli_config(tmp_path / "a.yaml", test_pki, policy_dir, reload_interval=0.1, **common), tmp_path)
    second = BrokerProcess(write_cli_config(tmp_path / "b.yaml", test_pki, policy_dir, reload_interval=3600, **common), tmp_path)
    clients = []
    try:
        def connect(device: str) -> Client:
            client = Client(second.port, device, test_pki.device(device), test_pki.ca_file)
            clients.append(client)
            assert client.connect() == 0
            return client

        dashboard = connect("dash-1")
        assert dashboard.subscribe("sites/plant-a/#") == 0
        sensor = connect("sensor-1")
        sensor.publish("sites/plant-a/sensor-1/debug", b"denied before the edit")
        policy = policy_dir / "policy.csv"
        policy.write_text(policy.read_text() + "p, debug, sensor, *, *, sites/{location}/{device_id}/debug, publish, allow\n")
        first.wait_line(r"policy reloaded: revision")
        second.wait_line(r"policy reloaded: revision")
        sensor.publish("sites/plant-a/sensor-1/debug", b"allowed after the edit")
        assert [m.payload for m in dashboard.messages_until("sites/plant-a/sensor-1/debug")] == [b"allowed after the edit"]
        # A retired device is disconnected from the other broker as well.
        registry = policy_dir / "devices.yaml"
        text = registry.read_text()
        start = text.index("- id: sensor-1\n")
        registry.write_text(text[:start] + text[start:].replace("status: active", "status: retired", 1))
        second.wait_line(r"session revoked: client=sensor-1 ")
        assert sensor.wait_disconnected()
    finally:
        for client in clients:
            client.close()
        assert first.stop() == 0
        assert second.stop() == 0


@pytest.fixture
def broker_settings(own_redis, tmp_path):
    """The `broker` fixture of this module talks to a redis-server the test may stop."""
    return {"redis_url": own_redis.url, "redis_prefix": "fault", "l2_key_file": l2_key_file(tmp_path)}


def test_decisions_survive_redis_outage_and_broker_reconnects(broker, connect, own_redis, caplog):
    caplog.set_level(logging.INFO, logger="mqtt_pdp.redis")
    plugin = broker.plugin
    wait_for(lambda: broker.run(plugin.service.bus.subscribed.is_set), "bus subscribed")
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"redis up")
    assert dashboard.next_message().payload == b"redis up"

    own_redis.stop()
    for i in range(30):  # L1 hits and fresh decisions (new topics) alike
        sensor.publish("sites/plant-a/sensor-1/telemetry", f"redis down {i}".encode())
        sensor.publish(f"sites/plant-a/sensor-1/other{i}", b"denied while redis is down")
    received = [dashboard.next_message().payload for _ in range(30)]
    assert received == [f"redis down {i}".encode() for i in range(30)]
    assert dashboard.subscribe("sites/plant-b/#") == 0x80
    late = connect("sensor-2")  # connects need no Redis either
    assert late.subscribe("sites/plant-b/sensor-2/cmd") == 0
    wait_for(lambda: not broker.run(lambda: plugin.service.redis.available), "outage noticed")

    own_redis.start()
    wait_for(lambda: broker.run(lambda: plugin.service.redis.available and plugin.service.bus.subscribed.is_set()), "reconnected")
    sensor.publish("sites/plant-a/sensor-1/after", b"x")  # a fresh decision, written to L2 once Redis is back
    server = redis.Redis(port=own_redis.port)
    wait_for(lambda: any(b"publish\x00sites/plant-a/sensor-1/after" in server.hgetall(k) for k in server.scan_iter("fault:l2:*")),
             "L2 written after the outage")
    warnings = [r for r in caplog.records if r.name == "mqtt_pdp.redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert any("is back" in r.getMessage() for r in caplog.records if r.name == "mqtt_pdp.redis")


def test_forged_announcements_cannot_flood_the_log(make_broker, shared_redis_url, redis_prefix, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.service")
    broker = make_broker(redis_url=shared_redis_url, redis_prefix=redis_prefix)
    bus = broker.plugin.service.bus
    wait_for(lambda: bus.subscribed.is_set(), "subscribed to announcements")
    client = redis.Redis.from_url(shared_redis_url)
    for n in range(50):
        client.publish(f"{redis_prefix}:events", f'{{"type": "reload", "revision": "bogus{n}", "node": "evil"}}')
    wait_for(lambda: bus.received >= 50, "all 50 announcements handled")
    warnings = [r.getMessage() for r in caplog.records if "announced revision" in r.getMessage()]
    assert len(warnings) == 1 and "announced revision bogus0" in warnings[0]
