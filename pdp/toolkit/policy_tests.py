"""Policy tests: YAML cases beside the policy, run against the rules, with rule coverage.

A case names a device (a registered id, or attributes for one not yet registered), an action,
a topic and the expected decision, optionally the rule expected to decide. The decision is the
effective one: a registered device that is not active is refused at connect, whatever the rules
say, so its expected rule is ``none``. Coverage counts, per action, the rules that decided at
least one case: a rule no case makes decide is untested, and is listed with its ``file:line``.

Reading is strict (unknown fields, unknown devices, rules and invalid topics are errors at
``file:line``) because a typo in a test must not pass silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from pdp.core.engine import ACTIONS, Rule
from pdp.core.topics import TopicError, level_value_problem, validate_filter, validate_topic
from pdp.errors import SourceError
from pdp.registry.device import STATUSES, Device
from pdp.toolkit.explain import Explanation, explain

NONE = "none"
_CASE_FIELDS = frozenset({"name", "device", "action", "topic", "expect", "rule"})
_DEVICE_FIELDS = frozenset({"id", "type", "location", "purpose", "owner", "status"})
TEST_SUFFIX = ".test.yaml"


@dataclass(frozen=True)
class PolicyCase:
    name: str
    attributes: Mapping[str, str]
    status: str  # the registered status, or 'active' for attributes given in the case
    action: str
    topic: str
    expect_allow: bool
    expect_rule: str | None  # None: not checked; NONE: no rule decides
    path: str
    line: int


@dataclass(frozen=True)
class CaseResult:
    case: PolicyCase
    explanation: Explanation
    passed: bool
    problem: str  # '' when passed

    @property
    def rule_id(self) -> str | None:
        """The effective deciding rule: none when the device is refused at connect."""
        return None if self.explanation.admission is not None else self.explanation.decision.rule_id


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _scalar(node: yaml.Node, path: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.value == "":
        raise SourceError(path, _line(node), f"{what} must be a single, non-empty value")
    return str(node.value)


def _mapping(node: yaml.Node, path: str, what: str, known: frozenset[str]) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise SourceError(path, _line(node), f"{what} must be a mapping")
    out: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node, path, "a key")
        if key not in known:
            raise SourceError(path, _line(key_node), f"unknown field {key!r} in {what} (known: {', '.join(sorted(known))})")
        if key in out:
            raise SourceError(path, _line(key_node), f"field {key!r} given twice")
        out[key] = value_node
    return out


def _device(node: yaml.Node, path: str, devices: Mapping[str, Device]) -> tuple[dict[str, str], str]:
    if isinstance(node, yaml.ScalarNode):
        device_id = _scalar(node, path, "device")
        device = devices.get(device_id)
        if device is None:
            raise SourceError(path, _line(node), f"device {device_id!r} is not in the registry "
                                                 "(give its attributes as a mapping to test a device not yet registered)")
        return dict(device.attrs), device.status
    fields = _mapping(node, path, "device", _DEVICE_FIELDS)
    values = {name: _scalar(value, path, name) for name, value in fields.items()}
    for required in ("type", "location", "purpose"):
        if required not in values:
            raise SourceError(path, _line(node), f"device is missing field {required!r}")
    for name, value in values.items():
        problem = level_value_problem(value) if name != "status" else None
        if problem is not None:
            raise SourceError(path, _line(fields[name]), f"{name} {value!r} {problem}")
    status = values.pop("status", "active")
    if status not in STATUSES:
        raise SourceError(path, _line(fields["status"]), f"status {status!r} is not one of {', '.join(STATUSES)}")
    if "id" in values:
        values["device_id"] = values.pop("id")
    return values, status


def parse_cases(text: str, path: str, devices: Mapping[str, Device]) -> list[PolicyCase]:
    """The cases of one test file; SourceError at ``file:line`` on the first problem.

    An expected rule the policy does not have is not an error here: removing a rule is exactly
    the kind of change the tests are there to catch, so that case fails instead.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SourceError(path, mark.line + 1 if mark else None,
                          f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if root is None:
        raise SourceError(path, None, "no cases (write 'cases:' with a list of cases)")
    top = _mapping(root, path, "the test file", frozenset({"cases"}))
    if "cases" not in top or not isinstance(top["cases"], yaml.SequenceNode) or not top["cases"].value:
        raise SourceError(path, _line(root), "'cases' must be a non-empty list")
    cases: list[PolicyCase] = []
    for item in top["cases"].value:
        fields = _mapping(item, path, "a case", _CASE_FIELDS)
        for required in ("device", "action", "topic", "expect"):
            if required not in fields:
                raise SourceError(path, _line(item), f"case is missing field {required!r}")
        attributes, status = _device(fields["device"], path, devices)
        action = _scalar(fields["action"], path, "action")
        if action not in ACTIONS:
            raise SourceError(path, _line(fields["action"]), f"action {action!r} is not one of {', '.join(ACTIONS)}")
        topic = _scalar(fields["topic"], path, "topic")
        try:
            (validate_filter if action == "subscribe" else validate_topic)(topic)
        except TopicError as exc:
            raise SourceError(path, _line(fields["topic"]), str(exc)) from None
        expect = _scalar(fields["expect"], path, "expect")
        if expect not in ("allow", "deny"):
            raise SourceError(path, _line(fields["expect"]), f"expect {expect!r} is not 'allow' or 'deny'")
        rule = _scalar(fields["rule"], path, "rule") if "rule" in fields else None
        name = _scalar(fields["name"], path, "name") if "name" in fields else f"{action} {topic}"
        cases.append(PolicyCase(name, attributes, status, action, topic, expect == "allow", rule, path, _line(item)))
    return cases


def run_case(rules: Sequence[Rule], case: PolicyCase) -> CaseResult:
    admission = None if case.status == "active" else f"device {case.status}"
    e = explain(rules, case.attributes, case.action, case.topic, admission)
    result = CaseResult(case, e, True, "")
    problems = []
    if e.allowed != case.expect_allow:
        problems.append(f"expected {'allow' if case.expect_allow else 'deny'}, got {'allow' if e.allowed else 'deny'}")
    if case.expect_rule is not None and (result.rule_id or NONE) != case.expect_rule:
        missing = "" if case.expect_rule == NONE or any(r.rule_id == case.expect_rule for r in rules) else \
            " (not in the policy)"
        problems.append(f"expected rule {case.expect_rule}{missing}, decided by {result.rule_id or NONE}")
    if problems:
        return CaseResult(case, e, False, "; ".join(problems))
    return result


def uncovered(rules: Sequence[Rule], results: Sequence[CaseResult]) -> dict[str, list[Rule]]:
    """Per action, the rules that decided no case (in file order)."""
    decided = {result.rule_id for result in results}
    return {action: [rule for rule in rules if rule.action == action and rule.rule_id not in decided]
            for action in ACTIONS}
