"""One node id, one writer: two real brokers on one real Redis, the default node id, and drain refusing forks."""

from __future__ import annotations

import json
import re
import socket

import pytest
import redis

from tests.support import Client
from tests.test_log_cli import cli

TELEMETRY = "sites/plant-a/sensor-1/telemetry"


def traffic(broker, test_pki, n: int) -> None:
    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert client.connect() == 0
        for i in range(n):
            client.publish(TELEMETRY, b"%d" % i, qos=1)
    finally:
        client.close()


def test_second_broker_with_a_live_node_id_refuses_to_start(make_broker, test_pki, policy_dir, tmp_path,
                                                            shared_redis_url, redis_prefix) -> None:
    shared = {"node_id": "plant-a-1", "redis_url": shared_redis_url, "redis_prefix": redis_prefix}
    first = make_broker(**shared, spool_dir=str(tmp_path / "a" / "spool"), assertion_db=str(tmp_path / "a" / "a.db"))
    with pytest.raises(Exception) as refused:  # another host: its own spool directory and database
        make_broker(**shared, spool_dir=str(tmp_path / "b" / "spool"), assertion_db=str(tmp_path / "b" / "b.db"))
    assert str(refused.value.__cause__) == (
        f"node id 'plant-a-1' is already recording on the shared Redis (claim {redis_prefix}:node:plant-a-1); give "
        "each broker its own node_id, or leave node_id unset")
    traffic(first, test_pki, 2)  # the first broker records on, undisturbed
    claim = redis.Redis.from_url(shared_redis_url).get(f"{redis_prefix}:node:plant-a-1")
    assert claim == (tmp_path / "a" / "spool" / "plant-a-1.owner").read_text().strip().encode()
    first.stop()
    assert redis.Redis.from_url(shared_redis_url).get(f"{redis_prefix}:node:plant-a-1") is None  # released
    again = make_broker(**shared, spool_dir=str(tmp_path / "a" / "spool"), assertion_db=str(tmp_path / "a" / "a.db"))
    traffic(again, test_pki, 1)
    again.stop()
    verify = cli("log", "verify", "--db", str(tmp_path / "a" / "a.db"))
    assert (verify.returncode, verify.stdout) == (0, "ok: node plant-a-1: 5 records, chain intact\n")


def test_drain_refuses_to_merge_two_chains_under_one_node_id(make_broker, test_pki, policy_dir, tmp_path,
                                                            shared_redis_url, redis_prefix) -> None:
    """One after the other, so the claim does not stop them: two hosts, one node id, two chains in the stream."""
    shared = {"node_id": "twin", "redis_url": shared_redis_url, "redis_prefix": redis_prefix, "assertion_stream": True}
    for name, n in (("a", 4), ("b", 6)):
        broker = make_broker(**shared, spool_dir=str(tmp_path / name / "spool"),
                             assertion_db=str(tmp_path / name / f"{name}.db"))
        traffic(broker, test_pki, n)
        broker.stop()
    assert redis.Redis.from_url(shared_redis_url).xlen(f"{redis_prefix}:assertions") == (1 + 4) + (1 + 6)
    central = tmp_path / "central.db"
    drained = cli("log", "drain", "--db", str(central), "--redis", shared_redis_url, "--prefix", redis_prefix)
    assert (drained.returncode, drained.stdout, drained.stderr.splitlines()[-1]) == (
        1, f"drained 5 records into {central}\n",
        "mqtt-pdp: error: 7 records fork from the chain already stored for node(s) twin (two brokers recorded under "
        "one node id); not merged: kept in the conflicts table, which log verify reports")
    kept = cli("log", "query", "--db", str(central), "--format", "jsonl")
    first_chain = cli("log", "query", "--db", str(tmp_path / "a" / "a.db"), "--format", "jsonl")
    assert kept.stdout == first_chain.stdout  # the first chain whole, nothing of the second mixed in
    verify = cli("log", "verify", "--db", str(central))
    assert (verify.returncode, verify.stdout) == (1, (
        "BROKEN: node twin: 7 record(s) conflict with stored ones (same node and sequence number, other content), "
        "first twin:1; kept in the conflicts table\n"))


def test_default_node_id_is_unique_per_broker_and_stable_across_restarts(make_broker, test_pki, tmp_path) -> None:
    ids = []
    for spool in ("a", "a", "b"):
        broker = make_broker(node_id="", spool_dir=str(tmp_path / spool))
        ids.append(broker.plugin.service.node_id)
        traffic(broker, test_pki, 1)
        broker.stop()
    assert re.fullmatch(re.escape(socket.gethostname()) + r"-[0-9a-f]{8}", ids[0])
    assert ids[0] == ids[1] != ids[2]
    assert (tmp_path / "a" / "node_id").read_text().strip() == ids[0]
    records = [json.loads(line) for line in cli("log", "query", "--db", str(tmp_path.parent / "assertions.db"),
                                                 "--format", "jsonl").stdout.splitlines()]
    assert records == [] or {r["node"] for r in records} <= set(ids)
