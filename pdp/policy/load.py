"""Loading and validating the policy: the Casbin model and the rule file policy authors edit.

Casbin loads both files; the rules the PDP evaluates are taken from what Casbin
loaded, after each line has been checked so that a mistake is reported as
``file:line: reason`` and never half-applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import casbin
from casbin.persist import load_policy_line

from pdp.core.engine import ACTIONS, EFFECTS, Rule
from pdp.errors import SourceError
from pdp.policy.oracle import CasbinReference
from pdp.core.topics import TopicError, level_value_problem, validate_pattern

RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
POLICY_FIELDS = ("id", "type", "location", "purpose", "topic", "action", "effect")

CANONICAL_MODEL = """
[request_definition]
r = dev, topic, act

[policy_definition]
p = id, type, location, purpose, topic, act, eft

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = (p.type == "*" || p.type == r.dev.type) && (p.location == "*" || p.location == r.dev.location) \
&& (p.purpose == "*" || p.purpose == r.dev.purpose) && p.act == r.act && topicMatch(r.act, r.topic, p.topic, r.dev, p.eft)
"""


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    revision: str
    model_path: str
    policy_path: str
    model_text: str = field(default="", compare=False, repr=False)
    policy_text: str = field(default="", compare=False, repr=False)

    @cached_property
    def reference(self) -> CasbinReference:
        """Casbin over the same texts, built on first use: only ``explain`` and ``verify_with_casbin`` ask it,
        and at 10,000 rules it costs more than the rest of a reload (the load-time cross-check does not need it)."""
        if not self.model_text:
            raise ValueError("this version of the policy was loaded without its texts (pdp.runtime.delta); "
                             "Casbin's reference needs them")
        return CasbinReference(self.model_text, self.policy_text)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(path, None, f"cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SourceError(path, None, f"{what} is not UTF-8 text") from None


def _model_shape(model: casbin.model.Model) -> dict[str, list[str] | str]:
    shape: dict[str, list[str] | str] = {}
    for sec in ("r", "p", "e", "m"):
        for key, assertion in model.model.get(sec, {}).items():
            shape[f"{sec}.{key}"] = list(assertion.tokens) if sec in ("r", "p") else " ".join(assertion.value.split())
    return shape


def check_model(path: str, text: str | None = None) -> None:
    """Refuse a model whose semantics differ from the ones the PDP implements."""
    if text is None:
        text = read_text(path, "model")
    canonical = casbin.model.Model()
    canonical.load_model_from_text(CANONICAL_MODEL)
    model = casbin.model.Model()
    try:
        model.load_model_from_text(text)
    except Exception as exc:  # Casbin raises bare exceptions of several kinds for a bad model.
        raise SourceError(path, None, f"Casbin cannot load the model: {exc}") from None
    if _model_shape(model) != _model_shape(canonical):
        raise SourceError(
            path, None, "model differs from the supported one (see README, 'The model'); restore policies/model.conf"
        )


def _check_rule(tokens: list[str], path: str, line: int) -> Rule:
    if tokens[0] != "p":
        raise SourceError(path, line, f"only 'p' rules are supported, not {tokens[0]!r}")
    values = tokens[1:]
    if len(values) != len(POLICY_FIELDS):
        raise SourceError(
            path, line, f"expected {len(POLICY_FIELDS)} fields after 'p' ({', '.join(POLICY_FIELDS)}), got {len(values)}"
        )
    rule_id, dtype, location, purpose, topic, action, effect = values
    for value in values:
        # CSV habit: a quoted field keeps its quotes here and in Casbin ('"sites/x"' is a topic with quotes in
        # it), so the rule silently never matched.
        if value[:1] in ('"', "'") or value[-1:] in ('"', "'"):
            raise SourceError(path, line, f"field {value!r} is quoted: write policy fields without quotes "
                                          "(quotes would be part of the value and the rule would never match)")
    if not RULE_ID_RE.match(rule_id):
        raise SourceError(path, line, f"rule id {rule_id!r} must be 1-128 of letters, digits, '_', '.', ':', '-'")
    for name, value in (("type", dtype), ("location", location), ("purpose", purpose)):
        problem = None if value == "*" else level_value_problem(value)
        if problem is not None:
            raise SourceError(path, line, f"{name} {value!r} {problem}; use a value or '*'")
    try:
        validate_pattern(topic)
    except TopicError as exc:
        raise SourceError(path, line, str(exc)) from None
    if action not in ACTIONS:
        raise SourceError(path, line, f"action {action!r} is not one of {', '.join(ACTIONS)}")
    if effect not in EFFECTS:
        raise SourceError(path, line, f"effect {effect!r} is not one of {', '.join(EFFECTS)}")
    return Rule(rule_id, dtype, location, purpose, topic, action, effect, line)


def parse_rules(text: str, path: str) -> list[Rule]:
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            raise SourceError(path, number, "contains NUL")
        rule = _check_rule([token.strip() for token in line.split(",")], path, number)
        if rule.rule_id in seen:
            raise SourceError(path, number, f"rule id {rule.rule_id!r} already used at line {seen[rule.rule_id]}")
        seen[rule.rule_id] = number
        rules.append(rule)
    return rules


def decode(data: bytes, path: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(path, None, f"{what} is not UTF-8 text") from None


def parse_policy(model_text: str, policy_text: str, model_path: str, policy_path: str) -> Policy:
    """Validate both texts and load them into Casbin; SourceError on the first problem.

    Works on texts, not paths, so that what is validated, what Casbin loads and what is hashed
    into the revision are one and the same version of each file. The same texts at the same paths
    give the same (immutable) policy without checking them again: ``mqtt-pdp broker`` validates the
    files before the broker starts and the plugin then loads them.
    """
    global _last
    last = _last
    if last is not None and last[:4] == (model_path, policy_path, model_text, policy_text):
        return last[4]
    check_model(model_path, model_text)
    if not policy_text.strip():
        raise SourceError(policy_path, None, "policy file is empty (an empty policy would deny everything; "
                                             "a file being written is read again at the next poll)")
    checked = parse_rules(policy_text, policy_path)
    if not checked:
        raise SourceError(policy_path, None, "policy has no rules (to deny everything on purpose, write one deny "
                                             "rule, e.g. 'p, deny-all, *, *, *, #, publish, deny')")
    casbin_check(policy_text, policy_path, checked)
    digest = hashlib.sha256(model_text.encode() + b"\0" + policy_text.encode()).hexdigest()[:12]
    policy = Policy(rules=tuple(checked), revision=digest, model_path=model_path, policy_path=policy_path,
                    model_text=model_text, policy_text=policy_text)
    _last = (model_path, policy_path, model_text, policy_text, policy)
    return policy


_last: tuple[str, str, str, str, Policy] | None = None  # see parse_policy: the same texts are checked once


def casbin_check(policy_text: str, policy_path: str, checked: list[Rule]) -> None:
    """Casbin must read the rules exactly as we did, without building its enforcer.

    Casbin's adapter splits a line at commas outside brackets and parentheses, then strips each
    field; on a line with no bracket or parenthesis that is our own ``split(",")`` and ``strip()``,
    so only the lines holding one are given to Casbin's own line reader to compare.
    """
    if not any(ch in policy_text for ch in "[]()"):
        return
    by_line = {rule.line: rule for rule in checked}
    for number, raw in enumerate(policy_text.splitlines(), start=1):
        line = raw.strip()
        if number not in by_line or not any(ch in line for ch in "[]()"):
            continue
        sink = SimpleNamespace(policy=[])
        try:
            load_policy_line(line, SimpleNamespace(model={"p": {"p": sink}}))
        except Exception as exc:  # Casbin raises bare exceptions for malformed lines.
            raise SourceError(policy_path, None, f"Casbin cannot load the policy: {exc}") from None
        if sink.policy != [by_line[number].as_casbin()]:
            raise SourceError(policy_path, None, "Casbin read the rules differently (brackets or parentheses in a field?)")


def load_policy(model_path: str | Path, policy_path: str | Path) -> Policy:
    """Read and validate both files; SourceError on the first problem."""
    model_path, policy_path = str(model_path), str(policy_path)
    return parse_policy(read_text(model_path, "model"), read_text(policy_path, "policy"), model_path, policy_path)
