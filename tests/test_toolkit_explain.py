"""``explain`` traces every rule and reaches exactly the engine's decision; the CLI shows its work.

The differential reuses the generators of ``tests/test_engine_vs_casbin.py`` (every placeholder,
wildcards at every depth, '$' topics, subscribe denies by overlap), so the explanation is checked
against the engine on requests that the rules actually decide.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from pdp.core.engine import Rule, decide
from pdp.core.index import PolicyIndex
from pdp.policy.load import parse_rules
from pdp.toolkit.explain import APPLIES, DECIDES, SELECTOR, TOPIC, UNBOUND, explain
from tests.test_cli import ROOT, assert_one_line_error, run
from tests.test_engine_vs_casbin import Decider, differential, pdp_decide

POLICY = ROOT / "policies" / "policy.csv"


def _explain_and_engine(text: str) -> tuple[Sequence[Rule], Decider, Decider]:
    rules = parse_rules(text, "p.csv")
    index = PolicyIndex(rules)

    def explained(device, action, topic):  # type: ignore[no-untyped-def]
        def one(a: str, t: str):  # type: ignore[no-untyped-def]
            e = explain(rules, device.attrs, a, t)
            # The trace is consistent with its decision: one rule decides exactly when a rule applies.
            assert (e.deciding is None) == (e.decision.rule_id is None)
            assert e.deciding is None or e.deciding.rule.rule_id == e.decision.rule_id
            assert all(trace.rule.action == a for trace in e.traces)
            assert index.decide(device.attrs, a, t) == e.decision
            return e.decision
        return pdp_decide(one, action, topic)

    return rules, explained, lambda device, action, topic: pdp_decide(
        lambda a, t: decide(rules, device.attrs, a, t), action, topic)


def test_explanation_equals_engine_and_index_on_random_policies() -> None:
    stats = differential(random.Random(12), _explain_and_engine, policies=80, requests=200, max_rules=40)
    assert stats.mismatches == [], stats.mismatches[:10]
    stats.assert_exercised()


def test_each_outcome_is_named() -> None:
    rules = parse_rules(
        "p, other-type, cam, *, *, a/#, publish, allow\n"
        "p, needs-owner, *, *, *, o/{owner}/x, publish, allow\n"
        "p, wrong-topic, *, *, *, b/{device_id}, publish, allow\n"
        "p, first-allow, *, *, *, a/{device_id}, publish, allow\n"
        "p, later-allow, *, *, *, a/+, publish, allow\n"
        "p, sub, *, *, *, a/#, subscribe, allow\n", "p.csv")
    attrs = {"device_id": "d1", "type": "sensor", "location": "l", "purpose": "p"}  # no owner
    e = explain(rules, attrs, "publish", "a/d1")
    outcomes = {t.rule.rule_id: (t.outcome, t.detail) for t in e.traces}
    assert set(outcomes) == {"other-type", "needs-owner", "wrong-topic", "first-allow", "later-allow"}
    assert e.other_actions == 1
    assert outcomes["other-type"] == (SELECTOR, "type cam \u2260 sensor")
    assert outcomes["needs-owner"] == (UNBOUND, "{owner} has no value")
    assert outcomes["wrong-topic"][0] == TOPIC and "b/d1 does not match" in outcomes["wrong-topic"][1]
    assert outcomes["first-allow"][0] == DECIDES
    assert outcomes["later-allow"] == (APPLIES, "a/+ matches the topic; the earlier allow first-allow decides")
    assert e.bindings == {"owner": None, "device_id": "d1"}
    assert e.allowed
    refused = explain(rules, attrs, "publish", "a/d1", admission="device suspended")
    assert refused.decision.allowed and not refused.allowed


def test_subscribe_deny_overlap_is_explained() -> None:
    rules = parse_rules("p, watch, *, *, *, a/#, subscribe, allow\np, hide, *, *, *, a/secret/#, subscribe, deny\n",
                        "p.csv")
    e = explain(rules, {"device_id": "d", "type": "t", "location": "l", "purpose": "p"}, "subscribe", "a/#")
    assert [(t.rule.rule_id, t.outcome) for t in e.traces] == [("watch", APPLIES), ("hide", DECIDES)]
    assert e.traces[1].detail == "a/secret/# overlaps the filter"
    assert e.traces[0].detail.endswith("deny hide overrides it")


def test_cli_explain_deny_trace_and_exit_status() -> None:
    result = run("explain", "--device", "dashboard-001", "--topic", "sites/plant-a/secret/key", "--action", "receive")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        "decision: deny",
        f"rule:     secrets-never ({POLICY}:15)",
        "reason:   denied by rule secrets-never",
        "device:   device_id=dashboard-001 type=dashboard location=plant-a purpose=monitoring owner=ops-team status=active",
        "binds:    {device_id}=dashboard-001 {location}=plant-a",
    ]
    assert lines[5] == "rules:    4 receive rules considered in file order (7 rules of other actions skipped)"
    assert lines[-1] == "casbin:   deny (secrets-never)"
    trace = "\n".join(lines[6:-1])
    assert f"=> secrets-never         {POLICY}:15  deny   decides: sites/+/secret/# matches the topic" in trace
    assert ("dashboard-watch-recv" in trace and "sites/{location}/# \u2192 sites/plant-a/# matches the topic; "
            "deny secrets-never overrides it" in trace)
    assert "selector mismatch: type sensor \u2260 dashboard" in trace


def test_cli_explain_allow_suspended_unknown_and_adhoc() -> None:
    allowed = run("explain", "--device", "sensor-001", "--topic", "sites/plant-a/sensor-001/telemetry",
                  "--action", "publish", "--brief")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.splitlines()[:3] == [
        "decision: allow", f"rule:     sensor-telemetry ({POLICY}:5)", "reason:   allowed by rule sensor-telemetry"]
    assert allowed.stdout.splitlines()[-1] == "casbin:   allow (sensor-telemetry)"
    assert not any(line.startswith("  ") for line in allowed.stdout.splitlines())  # --brief: no trace

    suspended = run("explain", "--device", "sensor-900", "--topic", "sites/plant-a/sensor-900/telemetry",
                    "--action", "publish")
    assert suspended.returncode == 1, suspended.stderr
    assert suspended.stdout.splitlines()[:3] == [
        "decision: deny", "rule:     none (refused at connect, before any rule)",
        "reason:   refused at connect (device suspended); the rules alone would allow (allowed by rule sensor-telemetry)"]

    unknown = run("explain", "--device", "ghost", "--topic", "a", "--action", "publish")
    assert unknown.returncode == 1, unknown.stderr
    assert "refused at connect (unknown device: 'ghost' is not in" in unknown.stdout

    adhoc = run("explain", "--device", "s-9", "--type", "sensor", "--location", "plant-c", "--purpose", "telemetry",
                "--topic", "sites/plant-c/s-9/telemetry", "--action", "publish")
    assert adhoc.returncode == 0, adhoc.stderr
    assert "device:   type=sensor location=plant-c purpose=telemetry device_id=s-9 status=unregistered" in adhoc.stdout
    assert "note:     not in the registry: decided as if registered with these attributes and active" in adhoc.stdout
    # The same device in another plant publishes to its own plant's topic only.
    other = run("explain", "--device", "s-9", "--type", "sensor", "--location", "plant-d", "--purpose", "telemetry",
                "--topic", "sites/plant-c/s-9/telemetry", "--action", "publish")
    assert other.returncode == 1, other.stderr


def test_cli_explain_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("explain", "--device", "sensor-001", "--topic", "a/#", "--action", "publish"), "wildcard")
    assert_one_line_error(run("explain", "--topic", "a", "--action", "publish"), "give --device ID")
    assert_one_line_error(run("explain", "--device", "new-1", "--type", "sensor", "--topic", "a", "--action", "publish"),
                          "needs --location, --purpose")
    bad = tmp_path / "policy.csv"
    bad.write_text("p, r1, *, *, *, a/#, publish, allow\np, r2, *, *, *, a/#/b, publish, allow\n")
    assert_one_line_error(run("explain", "--policy", str(bad), "--device", "sensor-001", "--topic", "a",
                              "--action", "publish"), f"{bad}:2:")


def test_help_of_the_policy_author_commands() -> None:
    for command in (["explain"], ["test"], ["who-can"], ["diff"], ["fmt"], ["report"], ["report", "unused"], ["check"]):
        result = run(*command, "--help")
        assert (result.returncode, result.stderr) == (0, ""), command
        assert result.stdout.startswith(" ".join(["usage: mqtt-pdp", *command]) + " [-h]"), result.stdout.splitlines()[0]


def test_explain_refuses_values_no_registry_could_hold() -> None:
    """Found by an outside attack: 'explain --device a/b' was a silent deny (exit 1) where 'test' says why (2)."""
    for option, value in (("--device", "a/b"), ("--type", "sen+sor")):
        extra = ["--type", "sensor"] if option != "--type" else ["--device", "d1"]
        result = run("explain", option, value, *extra, "--location", "a", "--purpose", "t", "--topic", "x",
                     "--action", "publish")
        assert_one_line_error(result, f"{option} {value!r}")
