"""``mqtt-pdp report unused``: rules and grants no recorded access used, and the narrower patterns the evidence supports."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pdp.policy.load import parse_rules
from pdp.toolkit.unused import Use, suggest, usage
from tests.test_cli import ROOT, assert_one_line_error, run

POLICY = ROOT / "policies" / "policy.csv"
DAY = 86400.0
ATTRS = {
    "sensor-001": ("sensor", "plant-a", "telemetry", "ops-team"),
    "dashboard-001": ("dashboard", "plant-a", "monitoring", "ops-team"),
    "valve-001": ("actuator", "plant-a", "control", "process-team"),
}


def _db(tmp_path: Path, uses: list[tuple[float, str, str, str, str]]) -> Path:
    """An assertion log written the way the broker writes it: (age, device, action, topic, rule) allowed."""
    from pdp.evidence.chain import ChainWriter
    from pdp.evidence.sinks import SqliteSink

    db = tmp_path / "assertions.db"
    keys = {device: i for i, device in enumerate(ATTRS, start=1)}
    sessions = {keys[d]: (d, "a" * 64, "1", "CN=test CA", *ATTRS[d], "active") for d in ATTRS}
    now = time.time()
    rows = [(now - age, keys[device], device, None, action, topic, True, rule, f"allowed by rule {rule}", "index", 1000,
             "rev") for age, device, action, topic, rule in uses]
    writer = ChainWriter("n1", [SqliteSink(db)], tmp_path / "state")
    try:
        writer.write(rows, sessions)
    finally:
        writer.close()
    return db


def test_report_unused_on_the_example_policy(tmp_path: Path) -> None:
    db = _db(tmp_path, [
        (DAY, "sensor-001", "publish", "sites/plant-a/sensor-001/telemetry", "sensor-telemetry"),
        (DAY, "sensor-001", "publish", "sites/plant-a/sensor-001/telemetry", "sensor-telemetry"),
        (DAY, "dashboard-001", "subscribe", "sites/plant-a/#", "dashboard-watch-sub"),
        (DAY, "dashboard-001", "receive", "sites/plant-a/sensor-001/telemetry", "dashboard-watch-recv"),
        (DAY, "dashboard-001", "publish", "sites/plant-a/valve-001/cmd", "dashboard-command"),
        (DAY, "valve-001", "receive", "sites/plant-a/valve-001/cmd", "actuator-cmd-recv"),
        (40 * DAY, "sensor-001", "subscribe", "sites/plant-a/sensor-001/cmd", "sensor-cmd-sub"),  # before the period
    ])
    result = run("report", "unused", "--since", "30d", "--db", str(db), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = [(r["finding"], r["rule"], r["where"], r["devices"], r["detail"]) for r in json.loads(result.stdout)]
    assert rows == [
        ("unused grant", "sensor-telemetry", f"{POLICY}:5", 1,
         "used by 1 of 2; not by: the only sensor device in plant-b: sensor-002"),
        ("unused rule", "sensor-status-will", f"{POLICY}:6", 2, "decided no request in the period"),
        ("unused rule", "sensor-cmd-sub", f"{POLICY}:7", 2, "decided no request in the period"),
        ("unused rule", "sensor-cmd-recv", f"{POLICY}:8", 2, "decided no request in the period"),
        ("unused rule", "actuator-cmd-sub", f"{POLICY}:9", 1, "decided no request in the period"),
        ("unused rule", "actuator-state", f"{POLICY}:11", 1, "decided no request in the period"),
        ("narrower", "dashboard-watch-recv", f"{POLICY}:13", 1,
         "-> sites/{location}/sensor-001/telemetry (grants every one of the 1 recorded uses)"),
        ("narrower", "dashboard-command", f"{POLICY}:14", 1, "-> sites/{location}/valve-001/cmd (grants every one of the 1 recorded uses)"),
    ]
    table = run("report", "unused", "--since", "30d", "--db", str(db), "--fail-over", "3")
    assert table.returncode == 1 and table.stderr == "unused: 8 finding(s)\n", table.stderr
    assert table.stdout.splitlines()[0].split() == ["FINDING", "RULE", "WHERE", "ACTION", "PATTERN", "DEVICES", "DETAIL"]
    assert_one_line_error(run("report", "unused", "--db", str(tmp_path / "none.db")), "no assertion database")
    assert_one_line_error(run("report", "unused", "--db", str(db), "--since", "yesterday"), "cannot read time")


def test_suggestions_prefer_the_device_own_attribute() -> None:
    rule = parse_rules("p, cmd, *, *, *, sites/{location}/+/cmd/#, receive, allow\n", "p.csv")[0]
    uses = [Use(d, {"device_id": d, "type": "s", "location": "l1", "purpose": "p", "owner": "o"}, "receive",
                f"sites/l1/{d}/cmd/{leaf}", "cmd") for d in ("s1", "s2") for leaf in ("a", "b")]
    assert suggest(rule, uses) == "sites/{location}/{device_id}/cmd/#"
    assert suggest(rule, uses[:1]) == "sites/{location}/s1/cmd/a"
    subscribe = parse_rules("p, w, *, *, *, sites/{location}/#, subscribe, allow\n", "p.csv")[0]
    wide = [Use("s1", uses[0].attributes, "subscribe", "sites/l1/+/telemetry", "w")]
    assert suggest(subscribe, wide) == "sites/{location}/+/telemetry"  # still covers the filter used
    report = usage([rule], {"cmd": ["s1", "s2", "s3"]}, uses)
    assert report[0].unused_by == {"s3"} and report[0].uses == 4
