"""``mqtt-pdp test``: the example policy's own tests pass, broken policies fail them, bad test files are errors."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from pdp.core.engine import decide
from pdp.errors import SourceError
from pdp.policy.load import parse_rules
from pdp.registry.device import Device
from pdp.toolkit.policy_tests import parse_cases, run_case, uncovered
from tests.test_cli import ROOT, assert_one_line_error, run
from tests.test_engine_vs_casbin import _device, _random_policy, _request

EXAMPLE = ROOT / "policies"


def _policy_dir(tmp_path: Path, policy_text: str | None = None) -> Path:
    for name in ("model.conf", "policy.csv", "devices.yaml", "policy.test.yaml"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    if policy_text is not None:
        (tmp_path / "policy.csv").write_text(policy_text)
    return tmp_path


def _args(d: Path) -> list[str]:
    return ["--model", str(d / "model.conf"), "--policy", str(d / "policy.csv"), "--registry", str(d / "devices.yaml")]


def test_example_policy_passes_its_tests_with_full_coverage() -> None:
    result = run("test", "--model", "policies/model.conf", "--policy", "policies/policy.csv",
                 "--registry", "policies/devices.yaml", "--require-coverage")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "18 cases in 1 file: 18 passed, 0 failed",
        "coverage: publish 4/4, subscribe 3/3, receive 4/4 rules decided a case",
    ]


def test_broken_policy_fails_with_the_deciding_rule_and_explanation(tmp_path: Path) -> None:
    """The mistakes the issue names: a secrets deny dropped, and a sensor rule widened to every plant."""
    text = (EXAMPLE / "policy.csv").read_text()
    text = text.replace("p, secrets-never, *, *, *, sites/+/secret/#, receive, deny\n", "")
    text = text.replace("sites/{location}/{device_id}/telemetry, publish", "sites/+/{device_id}/telemetry, publish")
    d = _policy_dir(tmp_path, text)
    result = run("test", *_args(d))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert f"FAIL {d / 'policy.test.yaml'}:18: a sensor cannot publish into another plant: expected deny, got allow" in out
    assert "rule:     sensor-telemetry" in out and "=> sensor-telemetry" in out
    assert ("FAIL " in out and "secrets are never delivered, even to a dashboard watching the plant: expected deny, "
            "got allow; expected rule secrets-never (not in the policy), decided by dashboard-watch-recv") in out
    assert "18 cases in 1 file: 16 passed, 2 failed" in out


def test_require_coverage_names_untested_rules(tmp_path: Path) -> None:
    text = (EXAMPLE / "policy.csv").read_text() + "p, cam-video, camera, *, video, video/{device_id}, publish, allow\n"
    d = _policy_dir(tmp_path, text)
    plain = run("test", *_args(d))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "coverage: publish 4/5, subscribe 3/3, receive 4/4 rules decided a case" in plain.stdout
    assert f"  not covered: publish allow cam-video ({d / 'policy.csv'}:16)" in plain.stdout
    assert run("test", *_args(d), "--require-coverage").returncode == 1


@pytest.mark.parametrize(("text", "line", "fragment"), [
    ("cases:\n  - device: ghost\n    action: publish\n    topic: a\n    expect: deny\n", 2, "device 'ghost' is not in the registry"),
    ("cases:\n  - device: sensor-001\n    action: publish\n    topic: a/#\n    expect: deny\n", 4, "wildcard"),
    ("cases:\n  - device: sensor-001\n    action: publish\n    topic: a\n    expect: maybe\n", 5, "expect 'maybe'"),
    ("cases:\n  - device: sensor-001\n    actoin: publish\n", 3, "unknown field 'actoin'"),
    ("cases:\n  - device: {type: cam, location: x}\n    action: publish\n    topic: a\n    expect: deny\n", 2,
     "missing field 'purpose'"),
    ("cases: [\n", 2, "invalid YAML"),
])
def test_bad_test_files_are_one_line_errors(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    d = _policy_dir(tmp_path)
    bad = d / "bad.test.yaml"
    bad.write_text(text)
    result = run("test", *_args(d), str(bad))
    assert_one_line_error(result, f"{bad}:{line}: ")
    assert fragment in result.stderr


def test_no_test_files_is_an_error(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path)
    (d / "policy.test.yaml").unlink()
    assert_one_line_error(run("test", *_args(d)), "no test files")


def test_generated_cases_pass_and_mutated_ones_fail() -> None:
    """Cases written from the engine's decisions on random policies pass; flipping one expectation fails it."""
    rng = random.Random(7)
    for _ in range(30):
        rules = parse_rules(_random_policy(rng, rng.randint(1, 20)), "p.csv")
        devices: dict[str, Device] = {}
        lines = ["cases:"]
        expected = []
        for _ in range(20):
            device = _device(rng)
            devices[device.device_id] = device
            action, topic = _request(rng, device, rules)
            decision = decide(rules, device.attrs, action, topic)
            expected.append(decision)
            lines += [f"  - device: {device.device_id}", f"    action: {action}", f"    topic: {topic!r}",
                      f"    expect: {'allow' if decision.allowed else 'deny'}", f"    rule: {decision.rule_id or 'none'}"]
        text = "\n".join(lines) + "\n"
        cases = parse_cases(text, "t.test.yaml", devices)
        results = [run_case(rules, case) for case in cases]
        for case, result in zip(cases, results):
            truth = decide(rules, case.attributes, case.action, case.topic)
            assert result.explanation.decision == truth
            flipped = type(case)(**{**case.__dict__, "expect_allow": not truth.allowed})
            assert not run_case(rules, flipped).passed
        decided = {r.rule_id for r in results if r.rule_id}
        assert all(rule.rule_id not in decided for rules_ in uncovered(rules, results).values() for rule in rules_)


def test_parse_error_is_located() -> None:
    with pytest.raises(SourceError) as err:
        parse_cases("cases:\n  - device: x\n", "t.yaml", {})
    assert str(err.value).startswith("t.yaml:2: ")
