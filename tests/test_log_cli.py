"""`mqtt-pdp log` on records a real broker wrote: every query filter, prune and drain, with exact results.

(Fingerprints are given as the stored lowercase hex; the `sha256:` prefix and an empty assertion_db
are being changed elsewhere and are not tested here.)
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

from pdp import pki
from tests.support import TRUST_DOMAIN, Client, write_cli_config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def query(db: Path, *filters: str) -> list[dict]:
    result = cli("log", "query", "--db", str(db), "--format", "jsonl", *filters)
    assert (result.returncode, result.stderr) == (0, ""), result
    return [json.loads(line) for line in result.stdout.splitlines()]


def short(records: list[dict]) -> list[tuple]:
    return [(r["action"], r["client_id"], r["topic"], r["decision"], r["rule_id"]) for r in records]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


TELEMETRY = "sites/plant-a/sensor-1/telemetry"
DEBUG = "sites/plant-a/sensor-1/debug"

# What the scripted session below leaves in the log, in order.
SESSION = [
    ("connect", "dash-1-x", None, "allow", None),                        # 0  rev 1
    ("subscribe", "dash-1-x", "sites/plant-a/#", "allow", "dash-sub"),   # 1
    ("connect", "sensor-1-a", None, "allow", None),                      # 2  certificate A
    ("connect", "sensor-1-b", None, "allow", None),                      # 3  certificate B
    ("connect", "sensor-2-x", None, "deny", None),                       # 4  sensor-1's certificate, wrong client id
    ("publish", "sensor-1-a", TELEMETRY, "allow", "sensor-pub"),         # 5
    ("receive", "dash-1-x", TELEMETRY, "allow", "dash-recv"),            # 6
    ("publish", "sensor-1-b", DEBUG, "deny", None),                      # 7
    ("publish", "sensor-1-b", DEBUG, "allow", "sensor-debug"),           # 8  rev 2
    ("receive", "dash-1-x", DEBUG, "allow", "dash-recv"),                # 9
]


@pytest.fixture
def session_log(make_broker, test_pki, policy_dir):
    """A real session on a broker that allows client-id suffixes; returns the database, the records and the context."""
    broker = make_broker(client_id="{device_id}-*")
    cert_b = test_pki.save("sensor-1-b", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN))
    clients = []

    def client(client_id: str, creds, expect: int = 0) -> Client:
        c = Client(broker.port, client_id, creds, test_pki.ca_file)
        clients.append(c)
        assert c.connect() == expect
        return c

    try:
        dashboard = client("dash-1-x", test_pki.device("dash-1"))
        assert dashboard.subscribe("sites/plant-a/#") == 0
        a = client("sensor-1-a", test_pki.device("sensor-1"))
        b = client("sensor-1-b", cert_b)
        client("sensor-2-x", test_pki.device("sensor-1"), expect=5)
        a.publish(TELEMETRY, b"t")
        assert dashboard.next_message().topic == TELEMETRY
        b.publish(DEBUG, b"denied")
        rev1 = broker.plugin.service.pdp.snapshot.snapshot_revision
        attempts = broker.plugin.service.reload_attempts
        policy = policy_dir / "policy.csv"
        policy.write_text(policy.read_text() + "p, sensor-debug, sensor, *, *, sites/{location}/{device_id}/debug, publish, allow\n")
        broker.wait_reload(attempts)
        rev2 = broker.plugin.service.pdp.snapshot.snapshot_revision
        assert rev2 != rev1
        b.publish(DEBUG, b"allowed")
        assert dashboard.next_message().payload == b"allowed"
    finally:
        for c in clients:
            c.close()
    node = broker.plugin.service.node_id
    broker.stop()
    db = policy_dir.parent / "assertions.db"
    records = query(db)
    assert short(records) == SESSION
    return {"db": db, "records": records, "rev1": rev1, "rev2": rev2, "node": node,
            "fp_a": test_pki.device("sensor-1").fingerprint, "fp_b": cert_b.fingerprint}


def pick(*indexes: int) -> list[tuple]:
    return [SESSION[i] for i in indexes]


def test_log_query_filters_return_exactly_the_matching_records(session_log):
    db = session_log["db"]
    assert short(query(db, "--client", "sensor-1-b")) == pick(3, 7, 8)
    assert short(query(db, "--client", "sensor-2-x")) == pick(4)
    assert short(query(db, "--device", "sensor-1")) == pick(2, 3, 4, 5, 7, 8)
    assert short(query(db, "--fingerprint", session_log["fp_b"])) == pick(3, 7, 8)
    assert short(query(db, "--fingerprint", session_log["fp_a"])) == pick(2, 4, 5)
    assert short(query(db, "--rule", "dash-recv")) == pick(6, 9)
    assert short(query(db, "--rule", "sensor-debug")) == pick(8)
    assert short(query(db, "--revision", session_log["rev1"])) == pick(0, 1, 2, 3, 4, 5, 6, 7)
    assert short(query(db, "--revision", session_log["rev2"])) == pick(8, 9)
    # the parts mqtt-pdp check prints select too: the policy revision changed, the registry's did not
    policy1, registry1 = session_log["rev1"].split(".")
    assert short(query(db, "--revision", policy1)) == pick(0, 1, 2, 3, 4, 5, 6, 7)
    assert short(query(db, "--revision", registry1)) == pick(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert short(query(db, "--revision", registry1[:6])) == []  # whole parts only
    assert short(query(db, "--node", session_log["node"])) == SESSION
    unknown = cli("log", "query", "--db", str(db), "--node", "some-other-node")  # a typo, not an empty result
    assert unknown.returncode == 2 and unknown.stderr.startswith("mqtt-pdp: error: no records of node 'some-other-node'")
    assert short(query(db, "--decision", "deny")) == pick(4, 7)
    assert short(query(db, "--decision", "allow", "--action", "publish")) == pick(5, 8)
    assert short(query(db, "--action", "connect", "--decision", "deny")) == pick(4)
    # --topic is an MQTT filter; a subscribe record counts when the filter covers the subscribed filter.
    assert short(query(db, "--topic", "sites/+/sensor-1/#")) == pick(5, 6, 7, 8, 9)
    assert short(query(db, "--topic", "+/plant-a/sensor-1/debug")) == pick(7, 8, 9)
    assert short(query(db, "--topic", "sites/plant-a/#")) == pick(1, 5, 6, 7, 8, 9)
    assert short(query(db, "--topic", "sites/plant-b/#")) == []
    assert short(query(db, "--topic", DEBUG, "--client", "sensor-1-b", "--decision", "allow")) == pick(8)


def test_log_query_since_and_until(session_log):
    db, records = session_log["db"], session_log["records"]
    ts = [r["ts"] for r in records]
    # Cut between two records so that rounding of the printed time cannot move a record across the cut.
    assert ts[5] - ts[4] > 2e-6 and ts[8] - ts[7] > 2e-6
    cut_a, cut_b = iso((ts[4] + ts[5]) / 2), iso((ts[7] + ts[8]) / 2)
    assert short(query(db, "--since", cut_a)) == pick(5, 6, 7, 8, 9)
    assert short(query(db, "--until", cut_a)) == pick(0, 1, 2, 3, 4)
    assert short(query(db, "--since", cut_a, "--until", cut_b)) == pick(5, 6, 7)
    assert short(query(db, "--since", cut_a, "--until", cut_b, "--client", "dash-1-x")) == pick(6)
    assert short(query(db, "--since", "1h")) == SESSION
    assert query(db, "--until", "1h") == []


def test_log_query_table_and_csv_are_exact(session_log):
    db = session_log["db"]
    table = cli("log", "query", "--db", str(db), "--decision", "deny")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TIMESTAMP", "DEVICE_ID", "CLIENT_ID", "ACTION", "TOPIC", "DECISION", "RULE_ID", "REASON",
                                "CACHE_TIER"]
    assert [line.split()[1:] for line in lines[1:]] == [
        ["sensor-1", "sensor-2-x", "connect", "-", "deny", "-", "client", "id", "mismatch", "-"],
        ["sensor-1", "sensor-1-b", "publish", DEBUG, "deny", "-", "no", "matching", "rule", "index"],
    ]
    csv_out = cli("log", "query", "--db", str(db), "--rule", "sensor-debug", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert [(r["record_id"], r["client_id"], r["topic"], r["decision"], r["fingerprint"]) for r in rows] == [
        (session_log["records"][8]["record_id"], "sensor-1-b", DEBUG, "allow", session_log["fp_b"])]


# -- prune -------------------------------------------------------------------------------------


DAY = 86400.0


def aged_db(tmp_path: Path, ages_s: list[float], node: str = "n1") -> Path:
    from pdp.evidence.chain import ChainWriter
    from pdp.evidence.sinks import SqliteSink

    db = tmp_path / "aged.db"
    now = time.time()
    fields = ("s1", "a" * 64, "1", "CN=test CA", "sensor", "plant-a", "test", "qa", "active")
    rows = [(now - age, 1, "s1", None, "publish", f"t/{i}", True, "r", "allowed by rule r", "index", 1000, "rev")
            for i, age in enumerate(ages_s)]
    writer = ChainWriter(node, [SqliteSink(db)], tmp_path / f"state-{node}")
    try:
        writer.write(rows, {1: fields})
    finally:
        writer.close()
    return db


def test_log_prune_older_than(tmp_path):
    db = aged_db(tmp_path, [100 * DAY, 91 * DAY, 89 * DAY, 2 * DAY, 60])
    result = cli("log", "prune", "--db", str(db), "--older-than", "90d")
    assert (result.returncode, result.stdout, result.stderr) == (0, "pruned 2 records older than 90d\n", "")
    assert [r["seq"] for r in query(db)] == [3, 4, 5]
    verify = cli("log", "verify", "--db", str(db))
    assert (verify.returncode, verify.stdout) == (0, "ok: node n1: 3 records, chain intact\n")
    again = cli("log", "prune", "--db", str(db), "--older-than", "90d")
    assert (again.returncode, again.stdout) == (0, "pruned 0 records older than 90d\n")
    hours = cli("log", "prune", "--db", str(db), "--older-than", "12h")
    assert (hours.returncode, hours.stdout) == (0, "pruned 2 records older than 12h\n")
    assert [r["seq"] for r in query(db)] == [5]
    bad = cli("log", "prune", "--db", str(db), "--older-than", "yesterday")
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "mqtt-pdp: error: --older-than 'yesterday': use an age such as 90d or 12h"]


# -- drain ---------------------------------------------------------------------------------------


def test_log_drain_moves_the_stream_into_a_database(make_broker, test_pki, policy_dir, tmp_path, shared_redis_url,
                                                    redis_prefix):
    broker = make_broker(redis_url=shared_redis_url, redis_prefix=redis_prefix, assertion_stream=True)
    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert client.connect() == 0
        assert client.subscribe("sites/plant-a/sensor-1/cmd") == 0
        client.publish(TELEMETRY, b"t")
        assert client.subscribe("sites/plant-a/#") == 0x80
    finally:
        client.close()
    broker.stop()  # graceful: every record is in both sinks
    local = query(policy_dir.parent / "assertions.db")
    assert [(r["action"], r["decision"]) for r in local] == [
        ("connect", "allow"), ("subscribe", "allow"), ("publish", "allow"), ("subscribe", "deny")]
    stream = f"{redis_prefix}:assertions"
    server = redis.Redis.from_url(shared_redis_url)
    assert server.xlen(stream) == 4

    central = tmp_path / "central.db"
    result = cli("log", "drain", "--db", str(central), "--redis", shared_redis_url, "--prefix", redis_prefix)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"drained 4 records into {central}\n", "")
    assert query(central) == local  # the same records, hashes and all
    assert server.xlen(stream) == 0
    verify = cli("log", "verify", "--db", str(central))
    assert (verify.returncode, verify.stdout) == (0, f"ok: node {local[0]['node']}: 4 records, chain intact\n")
    again = cli("log", "drain", "--db", str(central), "--redis", shared_redis_url, "--prefix", redis_prefix)
    assert (again.returncode, again.stdout) == (0, f"drained 0 records into {central}\n")
    assert len(query(central)) == 4


def test_log_drain_config_and_errors(tmp_path, test_pki, policy_dir, shared_redis_url, redis_prefix):
    """Redis URL and prefix come from the broker config when not given; no URL at all is one clear line."""
    config = write_cli_config(tmp_path / "drain.yaml", test_pki, policy_dir, redis_url=shared_redis_url,
                              redis_prefix=redis_prefix)
    result = cli("log", "drain", "-c", str(config), "--db", str(tmp_path / "c.db"))
    assert (result.returncode, result.stdout) == (0, f"drained 0 records into {tmp_path / 'c.db'}\n")
    bare = write_cli_config(tmp_path / "bare.yaml", test_pki, policy_dir, redis_url="")
    missing = cli("log", "drain", "-c", str(bare), "--db", str(tmp_path / "c.db"))
    assert (missing.returncode, missing.stderr.splitlines()) == (
        2, ["mqtt-pdp: error: no Redis URL: give --redis or redis_url in the broker config"])
