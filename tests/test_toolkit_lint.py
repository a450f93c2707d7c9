"""Lint in ``mqtt-pdp check``: each finding on a deliberately broken policy, none on the example,
and the "never decides" findings are sound: a flagged rule decides no request on random policies."""

from __future__ import annotations

import random
from pathlib import Path

from pdp.core.engine import decide
from pdp.policy.load import parse_rules
from pdp.registry.file import load_registry
from pdp.toolkit.lint import lint
from tests.test_cli import ROOT, run
from tests.test_engine_vs_casbin import _device, _random_policy, _request

DEVICES = [d.attrs for d in load_registry(ROOT / "policies" / "devices.yaml").devices.values()]

BROKEN = """\
# A policy with one mistake of each kind lint reports
p, sensor-telemetry, sensor, *, telemetry, sites/{location}/{device_id}/telemetry, publish, allow
p, sensr-typo, sensr, *, *, sites/{location}/{device_id}/x, publish, allow
p, dup, sensor, *, telemetry, sites/{location}/{device_id}/telemetry, publish, allow
p, all-pub, sensor, *, *, #, publish, allow
p, sys, *, *, *, $SYS/#, subscribe, allow
p, hide, *, *, *, sites/+/secret/#, subscribe, deny
p, cross, dashboard, *, *, sites/+/+/telemetry, publish, allow
p, watch, dashboard, *, *, sites/{location}/#, receive, allow
p, watch-again, dashboard, plant-a, monitoring, sites/{location}/+/telemetry, receive, allow
p, no-cmd, *, *, *, sites/+/+/cmd, publish, deny
p, cmd, dashboard, *, *, sites/{location}/+/cmd, publish, allow
p, combo, actuator, *, telemetry, a/b, receive, allow
"""


def test_each_finding_on_a_broken_policy() -> None:
    findings = lint(parse_rules(BROKEN, "p.csv"), DEVICES)
    got = [(f.line, f.code, f.severity) for f in findings]
    assert got == [
        (3, "W201", "warning"),  # sensr: "did you mean 'sensor'?"
        (4, "W103", "warning"),  # dup
        (5, "W301", "warning"),  # publish on '#'
        (5, "W304", "warning"),  # ... which also writes into other plants
        (6, "W302", "warning"),  # $SYS
        (7, "W303", "warning"),  # subscribe deny, no receive deny
        (8, "W304", "warning"),  # dashboards publish telemetry for any plant
        (10, "W102", "warning"),  # covered by the earlier 'watch'
        (12, "W101", "warning"),  # shadowed by no-cmd
        (13, "I202", "info"),  # no actuator has purpose telemetry
    ], "\n".join(f.render("p.csv") for f in findings)
    assert "did you mean 'sensor'?" in findings[0].message
    assert findings[-2].render("p.csv").startswith("p.csv:12: warning W101 shadowed-by-deny: allow cmd never decides: "
                                                   "deny no-cmd (line 11)")


def test_example_policy_is_clean() -> None:
    rules = parse_rules((ROOT / "policies" / "policy.csv").read_text(), "p.csv")
    assert lint(rules, DEVICES) == []


def test_never_decides_findings_are_sound() -> None:
    """A rule lint says never decides decides none of thousands of requests aimed at it."""
    rng = random.Random(3)
    flagged_total = 0
    for _ in range(150):
        rules = parse_rules(_random_policy(rng, rng.randint(2, 30)), "p.csv")
        flagged = {f.rule_id for f in lint(rules, DEVICES) if f.code in ("W101", "W102", "W103")}
        flagged_total += len(flagged)
        targets = [r for r in rules if r.rule_id in flagged]
        for _ in range(60 if targets else 0):
            device = _device(rng)
            action, topic = _request(rng, device, targets)
            assert decide(rules, device.attrs, action, topic).rule_id not in flagged, (action, topic, flagged)
    assert flagged_total > 30  # the generator makes such rules, so the check is not vacuous


def test_check_prints_findings_and_strict_fails(tmp_path: Path) -> None:
    policy = tmp_path / "policy.csv"
    policy.write_text(BROKEN)
    plain = run("check", "--policy", str(policy))
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert lines[2] == f"{policy}:3: warning W201 unknown-selector-value: no registered device has type 'sensr' (did you mean 'sensor'?)"
    assert lines[-1] == "lint: 10 findings (9 warnings)"
    strict = run("check", "--policy", str(policy), "--strict")
    assert strict.returncode == 1 and strict.stdout.splitlines()[-1] == "lint: 10 findings (9 warnings) (--strict: failing)"
    clean = run("check", "--policy", "policies/policy.csv", "--strict")
    assert clean.returncode == 0 and len(clean.stdout.splitlines()) == 2, clean.stdout


def test_a_placeholder_fixed_by_the_rules_own_selector_is_not_a_cross_location_write() -> None:
    """Found by an outside attack: '{type}/#' for type sensor was flagged W304 (it can only be 'sensor/#')."""
    from pdp.policy.load import parse_rules
    from pdp.toolkit.lint import lint

    rules = parse_rules("p, keep, *, *, *, sites/{location}/{device_id}/cmd, subscribe, allow\n"
                        "p, wide3, sensor, *, *, {type}/#, publish, allow\n"
                        "p, wide4, *, *, *, {type}/#, publish, allow\n", "policy.csv")
    codes = {(f.rule_id, f.code) for f in lint(rules, [{"type": "sensor", "location": "a", "purpose": "t"}])}
    assert ("wide3", "W304") not in codes and ("wide4", "W304") in codes
