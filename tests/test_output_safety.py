"""Analyst output and the broker's log under hostile client ids and topics from real devices on a real broker."""

from __future__ import annotations

import csv
import io
import json
import logging

from tests.support import Client
from tests.test_log_cli import cli

FORGED_ROW = "\n2026-01-01T00:00:00.000000Z  root-1  root-1  connect  -  allow  -  identity verified  -"
CLIENT_NL = "evil" + FORGED_ROW
CLIENT_HUGE = "x" * 60_000
TOPIC_ESC = "sites/plant-a/sensor-1/\x1b[2J\r\x07bell\u202eevil"
TOPIC_LONG = "sites/plant-a/sensor-1/" + "a/" * 1500 + "end"
FORMULAS = ['=HYPERLINK("http://evil.example/","click")', "@SUM(A1)", "-cmd|calc", "=1-2"]


def test_hostile_client_ids_and_topics_cannot_forge_output(make_broker, test_pki, policy_dir, caplog) -> None:
    caplog.set_level(logging.INFO, "mqtt_pdp")
    broker = make_broker()
    refused = []
    for client_id in (CLIENT_NL, CLIENT_HUGE):
        client = Client(broker.port, client_id, test_pki.device("sensor-1"), test_pki.ca_file)
        refused.append(client)
        assert client.connect() == 5
    sensor = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert sensor.connect() == 0
        for topic in (TOPIC_ESC, TOPIC_LONG, *FORMULAS):
            sensor.publish(topic, b"x", qos=1)
        sensor.publish("sites/plant-a/sensor-1/telemetry", b"last", qos=1)
    finally:
        for client in (*refused, sensor):
            client.close()
    broker.stop()
    db = policy_dir.parent / "assertions.db"

    # The records keep the exact values (JSON escapes them itself), the decision first.
    lines = cli("log", "query", "--db", str(db), "--format", "jsonl").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert list(records[0])[:3] == ["decision", "device_id", "action"]
    assert [r["client_id"] for r in records[:2]] == [CLIENT_NL, CLIENT_HUGE]
    assert [r["topic"] for r in records if r["action"] == "publish"] == [TOPIC_ESC, TOPIC_LONG, *FORMULAS,
                                                                          "sites/plant-a/sensor-1/telemetry"]

    # Table: one line per record, nothing raw, long values cut with a marker.
    table = cli("log", "query", "--db", str(db)).stdout
    rows = table.splitlines()
    assert len(rows) == 1 + len(records)
    assert not any(ch in table for ch in "\x1b\r\x07\u202e")
    assert "  evil\\n2026-01-01T00:00:00.000000Z  root-1  root…  connect" in rows[1]
    assert rows[2].split()[2] == "x" * 47 + "…"
    assert "  sites/plant-a/sensor-1/\\x1b[2J\\r\\x07bell\\u202ee…  deny" in rows[4]
    assert "  sites/plant-a/sensor-1/a/a/a/a/a/a/a/a/a/a/a/a/…  deny" in rows[5]
    assert not any(row.startswith("root-1") or " allow  -  identity verified" in row for row in rows[1:3])

    # stats: the same escaping and cutting.
    stats = cli("log", "stats", "--db", str(db), "--since", "1h").stdout
    assert not any(ch in stats for ch in "\x1b\r\x07\u202e")
    assert "  sites/plant-a/sensor-1/\\x1b[2J\\r\\x07bell\\u202eevil" in stats
    assert "  " + ("sites/plant-a/sensor-1/" + "a/" * 20)[:59] + "…" in stats
    refused_lines = stats.split("refused connects:\n")[1].splitlines()
    assert [line.split()[:2] for line in refused_lines] == [["sensor-1", "client"]]

    # CSV: quoted newlines stay in their cell; formulas become text.
    parsed = list(csv.DictReader(io.StringIO(cli("log", "query", "--db", str(db), "--format", "csv").stdout)))
    assert parsed[0]["client_id"] == CLIENT_NL
    assert [r["topic"] for r in parsed if r["action"] == "publish"][2:6] == ["'" + f for f in FORMULAS]

    # The broker's own log: one line per event, bounded, escaped.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("mqtt_pdp")]
    assert not any("\n" in m or "\r" in m or "\x1b" in m for m in ours)
    assert max(len(m) for m in ours) < 1200
    refusals = [m for m in ours if m.startswith("connect refused")]
    assert refusals[0].startswith("connect refused: client=\"evil\\n2026-01-01T00:00:00.000000Z  root-1")
    assert "client=" + "x" * 511 + "… device=sensor-1" in refusals[1]
    assert any(m.startswith("sensor-1 publish sites/plant-a/sensor-1/\\x1b[2J\\r\\x07bell") for m in ours)


def test_a_device_value_cannot_forge_key_value_fields_of_a_log_line() -> None:
    """Found by an outside attack: a client id 'x device=valve-001 fingerprint=0000 peer=10.9.9.9:1' was logged
    bare, and any key=value parser read the forged fields."""
    import shlex

    from pdp.evidence.text import field

    forged = 'x device=valve-001 fingerprint=0000 peer=10.9.9.9:1 reason="ok"'
    line = f"connect refused: client={field(forged)} device={field('sensor-001')} reason=unknown"
    pairs = dict(part.split("=", 1) for part in shlex.split(line.split(": ", 1)[1]))
    assert pairs == {"client": forged, "device": "sensor-001", "reason": "unknown"}
    assert field("sensor-1") == "sensor-1" and field("") == '""' and "\n" not in field("a\nb")
