"""The identity assertion log, end to end: every decision of a scripted session recorded with the right fields."""

from __future__ import annotations

import time

from pdp.evidence.store import AssertionStore, QueryFilters
from tests.support import wait_for


def records_of(path) -> list:
    store = AssertionStore(path, readonly=True)
    try:
        return [record for _, record in store.query(QueryFilters())]
    finally:
        store.close()


def test_every_decision_of_a_scripted_session_is_recorded(broker, connect, test_pki, policy_dir):
    started = time.time()
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    assert dashboard.subscribe("sites/plant-b/#") == 0x80
    connect("retired-1", expect=5)
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/nope", b"n")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"t")  # delivered, so the denied one was handled before
    assert dashboard.next_message().payload == b"t"
    revision = broker.plugin.service.pdp.snapshot.snapshot_revision
    node = broker.plugin.service.node_id
    broker.stop()  # graceful: everything captured is flushed
    records = records_of(policy_dir.parent / "assertions.db")

    summary = [(r.action, r.device_id, r.client_id, r.topic, r.decision, r.rule_id, r.reason) for r in records]
    assert summary == [
        ("connect", "dash-1", "dash-1", None, "allow", None, "identity verified"),
        ("subscribe", "dash-1", "dash-1", "sites/plant-a/#", "allow", "dash-sub", "allowed by rule dash-sub"),
        ("subscribe", "dash-1", "dash-1", "sites/plant-b/#", "deny", None, "no matching rule"),
        ("connect", "retired-1", "retired-1", None, "deny", None, "device retired"),
        ("connect", "sensor-1", "sensor-1", None, "allow", None, "identity verified"),
        ("publish", "sensor-1", "sensor-1", "sites/plant-a/sensor-1/nope", "deny", None, "no matching rule"),
        ("publish", "sensor-1", "sensor-1", "sites/plant-a/sensor-1/telemetry", "allow", "sensor-pub", "allowed by rule sensor-pub"),
        ("receive", "dash-1", "dash-1", "sites/plant-a/sensor-1/telemetry", "allow", "dash-recv", "allowed by rule dash-recv"),
    ]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert all(r.node == node and r.record_id == f"{node}:{r.seq}" for r in records)
    assert all(started <= r.ts <= time.time() for r in records)
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    assert all(r.policy_revision == revision for r in records)
    assert all(r.peer and r.peer.startswith("127.0.0.1:") for r in records)
    sensor_cert = test_pki.device("sensor-1")
    publish = records[6]
    assert publish.fingerprint == sensor_cert.fingerprint
    assert publish.issuer == "CN=test CA" and publish.serial
    assert (publish.type, publish.location, publish.purpose, publish.owner, publish.status) == (
        "sensor", "plant-a", "test", "qa", "active")
    assert publish.cache_tier in ("l1", "index") and publish.latency_us is not None and publish.latency_us >= 0
    retired = records[3]
    assert retired.fingerprint == test_pki.device("retired-1").fingerprint and retired.status == "retired"
    assert records[0].cache_tier is None
    store = AssertionStore(policy_dir.parent / "assertions.db", readonly=True)
    assert [r.problem for r in store.verify()] == [None]


def test_cache_tier_distinguishes_hits(broker, connect, policy_dir):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    for i in range(3):
        sensor.publish("sites/plant-a/sensor-1/telemetry", b"t%d" % i)
    assert [(m.topic, m.payload) for m in (dashboard.next_message() for _ in range(3))] == [
        ("sites/plant-a/sensor-1/telemetry", b"t%d" % i) for i in range(3)]
    broker.stop()
    records = records_of(policy_dir.parent / "assertions.db")
    assert [r.cache_tier for r in records if r.action == "publish"] == ["index", "l1", "l1"]
    assert [r.cache_tier for r in records if r.action == "receive"] == ["index", "l1", "l1"]


def test_sink_outage_and_broker_restart_lose_and_double_nothing(make_broker, test_pki, policy_dir, tmp_path):
    """Redis (the stream sink) is killed mid-run and the broker restarted while it is down."""
    import redis as redis_lib

    from pdp.evidence.sinks import drain_stream
    from tests.support import Client, RedisServer, wait_for

    server = RedisServer(tmp_path / "redis", persistent=True)
    settings = dict(redis_url=server.url, redis_prefix="lossless", assertion_stream=True, node_id="lossless-node")
    spool = policy_dir.parent / "spool" / "redis-stream.jsonl"

    def session(broker, label: str, count: int = 20) -> None:
        clients = []
        try:
            for device in ("dash-1", "sensor-1"):
                clients.append(Client(broker.port, device, test_pki.device(device), test_pki.ca_file))
                assert clients[-1].connect() == 0
            dashboard, sensor = clients
            assert dashboard.subscribe("sites/plant-a/#", qos=1) == 1
            for i in range(count):
                sensor.publish("sites/plant-a/sensor-1/telemetry", f"{label}-{i}".encode(), qos=1)
            assert [dashboard.next_message().payload for _ in range(count)] == [f"{label}-{i}".encode() for i in range(count)]
        finally:
            for client in clients:
                client.close()

    try:
        first = make_broker(**settings)
        session(first, "up")
        server.stop()
        session(first, "down")
        first.stop()
        assert spool.exists() and spool.stat().st_size > 0  # the stream's records waited on disk
        second = make_broker(**settings)  # same node, same spool: the chain continues
        session(second, "restarted")
        server.start()
        wait_for(lambda: not spool.exists(), "spool delivered after Redis came back")
        second.stop()

        local = AssertionStore(policy_dir.parent / "assertions.db", readonly=True)
        drained = AssertionStore(tmp_path / "drained.db")
        drain_stream(drained, redis_lib.Redis.from_url(server.url), "lossless")
        for store in (local, drained):
            records = [r for _, r in store.query(QueryFilters(node="lossless-node"))]
            assert [r.seq for r in records] == list(range(1, len(records) + 1))  # none missing, none doubled
            assert [(r.problem, r.checked) for r in store.verify("lossless-node")] == [(None, len(records))]
            published = [r for r in records if r.action == "publish" and r.decision == "allow"]
            received = [r for r in records if r.action == "receive" and r.decision == "allow"]
            assert len(published) == len(received) == 60
        assert ([(r.record_id, r.hash) for _, r in local.query(QueryFilters())]
                == [(r.record_id, r.hash) for _, r in drained.query(QueryFilters())])
    finally:
        server.stop()


def test_killed_writer_process_is_restarted_without_loss(broker, connect, policy_dir):
    """kill -9 of the writer, 12 times mid-traffic: every decision stored exactly once (issue A)."""
    from tests.support import wait_for

    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#", qos=1) == 1
    sensor = connect("sensor-1")
    writer = broker.plugin.service.recorder.writer
    rounds, per_round = 12, 5  # a writer restart costs about a second (imports)
    for k in range(rounds):
        restarts = writer.restarts
        payloads = [f"{k}-{i}".encode() for i in range(per_round)]
        for payload in payloads:
            sensor.publish("sites/plant-a/sensor-1/telemetry", payload, qos=1)
        writer.proc.kill()  # the assertion writer process crashes, wherever it was in its batch
        assert [dashboard.next_message().payload for _ in range(per_round)] == payloads
        if k < rounds - 1:
            sensor.publish("sites/plant-a/sensor-1/telemetry", b"probe-%d" % k, qos=1)  # makes a batch that needs it
            assert dashboard.next_message().payload == b"probe-%d" % k
            wait_for(lambda: writer.restarts > restarts, "the writer restarted by the broker")
    broker.stop()
    assert writer.restarts >= rounds - 1
    store = AssertionStore(policy_dir.parent / "assertions.db", readonly=True)
    records = [r for _, r in store.query(QueryFilters())]
    publishes = rounds * per_round + rounds - 1  # the payloads and the probes
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert len({(r.ts, r.action, r.client_id) for r in records}) == len(records)  # no batch stored twice
    assert sorted((r.action, r.client_id, r.decision) for r in records if r.action in ("connect", "subscribe")) == [
        ("connect", "dash-1", "allow"), ("connect", "sensor-1", "allow"), ("subscribe", "dash-1", "allow")]
    assert [(r.client_id, r.topic, r.decision) for r in records if r.action == "publish"] == [
        ("sensor-1", "sites/plant-a/sensor-1/telemetry", "allow")] * publishes
    assert [(r.client_id, r.topic, r.decision) for r in records if r.action == "receive"] == [
        ("dash-1", "sites/plant-a/sensor-1/telemetry", "allow")] * publishes
    assert len(records) == 3 + 2 * publishes
    assert [(r.problem, r.checked) for r in store.verify()] == [(None, len(records))]
    assert store.db.execute("SELECT count(*) FROM conflicts").fetchone()[0] == 0


def test_a_delivery_decided_as_its_connection_closes_names_the_device(broker, connect, test_pki, policy_dir):
    """A delivery routed to a connection that is closing is still decided (denied: not admitted) and recorded;
    the record names the device, client id and certificate it was for (an outside attack counted thousands
    of such records naming nobody after slow consumers were closed)."""
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    service = broker.plugin.service
    conn = broker.run(lambda: next(c for c, (client, _) in service._peers.items() if client == "dash-1"))
    dashboard.close()
    wait_for(lambda: broker.run(lambda: conn not in service._peers), "the connection closed")
    assert broker.run(lambda: service.allows(conn, "receive", "sites/plant-a/sensor-1/telemetry")) is False
    broker.stop()
    last = records_of(policy_dir.parent / "assertions.db")[-1]
    assert (last.action, last.decision, last.reason) == ("receive", "deny", "connection not admitted")
    assert (last.device_id, last.client_id, last.fingerprint) == (
        "dash-1", "dash-1", test_pki.device("dash-1").fingerprint)
    assert last.peer and last.peer.startswith("127.0.0.1:")
