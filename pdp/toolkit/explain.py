"""Why one request is allowed or denied: every rule of the requested action, traced.

The engine (``pdp.core.engine.decide``) answers with the deciding rule only; a policy author
also needs to see the rules that did *not* apply and why (a selector, a placeholder that
could not bind, a pattern that does not match, cover or overlap), and that a device that is
not active never gets as far as the rules. The trace follows the engine's own steps and
calls its own relations, and the decision it reaches is checked against the engine's in
``tests/test_toolkit_explain.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdp.core.engine import Decision, Rule, decision_for
from pdp.core.topics import covers, level_value_problem, matches, overlaps

SELECTORS: tuple[str, ...] = ("type", "location", "purpose")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")

# Outcomes of one rule for one request.
OTHER_ACTION = "other action"
SELECTOR = "selector mismatch"
UNBOUND = "placeholder unbound"
TOPIC = "topic mismatch"
DECIDES = "decides"
APPLIES = "applies, does not decide"


@dataclass(frozen=True)
class RuleTrace:
    rule: Rule
    outcome: str  # one of the constants above
    detail: str  # why, in words
    bound: str | None = None  # the pattern after binding, when it bound

    @property
    def applies(self) -> bool:
        return self.outcome in (DECIDES, APPLIES)


@dataclass(frozen=True)
class Explanation:
    attributes: Mapping[str, str]
    action: str
    topic: str
    decision: Decision  # what the rules decide
    traces: tuple[RuleTrace, ...]  # the rules of the requested action, in file order
    other_actions: int  # rules of other actions, not considered
    bindings: Mapping[str, str | None]  # each placeholder the considered rules use -> the value it binds to
    admission: str | None = None  # why the device is refused at connect, or None when it may connect

    @property
    def allowed(self) -> bool:
        """The effective outcome: a device refused at connect never publishes, subscribes or receives."""
        return self.admission is None and self.decision.allowed

    @property
    def deciding(self) -> RuleTrace | None:
        return next((trace for trace in self.traces if trace.outcome == DECIDES), None)


def _relation(action: str, effect: str) -> tuple[str, str]:
    """The relation the engine uses between the bound pattern and the request, as (holds, fails) words."""
    if action == "subscribe":
        if effect == "deny":
            return "overlaps the filter", "does not overlap the filter"
        return "covers the filter", "does not cover the filter"
    return "matches the topic", "does not match the topic"


def _topic_holds(action: str, effect: str, bound: str, topic: str) -> bool:
    if action == "subscribe":
        return overlaps(bound, topic) if effect == "deny" else covers(bound, topic)
    return matches(bound, topic)


def binding_problem(pattern: str, attributes: Mapping[str, str]) -> str | None:
    """Why ``pattern`` cannot bind to these attributes (the engine then skips the rule), or None."""
    for name in _PLACEHOLDER_RE.findall(pattern):
        value = attributes.get(name)
        if value is None:
            return f"{{{name}}} has no value"
        problem = level_value_problem(value)
        if problem is not None:
            return f"{{{name}}} = {value!r} {problem}"
    return None


def bind_pattern(pattern: str, attributes: Mapping[str, str]) -> str:
    return _PLACEHOLDER_RE.sub(lambda m: attributes[m.group(1)], pattern)


def explain(rules: Sequence[Rule], attributes: Mapping[str, str], action: str, topic: str,
            admission: str | None = None) -> Explanation:
    """Trace every rule of ``action`` for the request, in file order, and reach the engine's decision.

    ``admission`` is why the device would be refused at connect (unknown, suspended, ...), given by
    the caller from the registry; the rules are still traced, so the author sees what they would decide.
    """
    considered = [rule for rule in rules if rule.action == action]
    first: dict[str, list[int]] = {"deny": [], "allow": []}
    staged: list[tuple[Rule, str, str, str | None]] = []
    bindings: dict[str, str | None] = {}
    for rule in considered:
        for name in _PLACEHOLDER_RE.findall(rule.topic):
            bindings.setdefault(name, attributes.get(name))
        mismatched = [f"{name} {getattr(rule, name)} \u2260 {attributes.get(name)}" for name in SELECTORS
                      if getattr(rule, name) != "*" and getattr(rule, name) != attributes.get(name)]
        if mismatched:
            staged.append((rule, SELECTOR, ", ".join(mismatched), None))
            continue
        problem = binding_problem(rule.topic, attributes)
        if problem is not None:
            staged.append((rule, UNBOUND, problem, None))
            continue
        bound = bind_pattern(rule.topic, attributes)
        holds, fails = _relation(action, rule.effect)
        shown = bound if bound == rule.topic else f"{rule.topic} → {bound}"
        if not _topic_holds(action, rule.effect, bound, topic):
            staged.append((rule, TOPIC, f"{shown} {fails}", bound))
            continue
        first[rule.effect].append(len(staged))
        staged.append((rule, "applies", f"{shown} {holds}", bound))
    decider = first["deny"][0] if first["deny"] else first["allow"][0] if first["allow"] else None
    traces: list[RuleTrace] = []
    for at, (rule, outcome, detail, bound) in enumerate(staged):
        if outcome == "applies":
            if at == decider:
                outcome = DECIDES
            else:
                outcome = APPLIES
                if first["deny"] and rule.effect == "allow":
                    detail += f"; deny {staged[decider][0].rule_id} overrides it"
                else:
                    detail += f"; the earlier {staged[decider][0].effect} {staged[decider][0].rule_id} decides"
        traces.append(RuleTrace(rule, outcome, detail, bound))
    if decider is None:
        decision = decision_for(False, None)
    else:
        decision = decision_for(staged[decider][0].effect == "allow", staged[decider][0].rule_id)
    return Explanation(dict(attributes), action, topic, decision, tuple(traces), len(rules) - len(considered),
                       bindings, admission)


def render(explanation: Explanation, policy_path: str, *, device_line: str, casbin: Decision | None = None,
           verbose: bool = True) -> list[str]:
    """The explanation as the lines ``mqtt-pdp explain`` prints."""
    e = explanation
    lines = [f"decision: {'allow' if e.allowed else 'deny'}"]
    deciding = e.deciding
    if e.admission is not None:
        lines.append("rule:     none (refused at connect, before any rule)")
    elif deciding is not None:
        lines.append(f"rule:     {deciding.rule.rule_id} ({policy_path}:{deciding.rule.line})")
    else:
        lines.append("rule:     none")
    if e.admission is not None:
        rules_say = "allow" if e.decision.allowed else "deny"
        lines.append(f"reason:   refused at connect ({e.admission}); the rules alone would {rules_say} "
                     f"({e.decision.reason})")
    else:
        lines.append(f"reason:   {e.decision.reason}")
    lines.append(f"device:   {device_line}")
    if e.bindings:
        lines.append("binds:    " + " ".join(f"{{{name}}}={value if value is not None else '(none)'}"
                                           for name, value in sorted(e.bindings.items())))
    if verbose:
        lines.append(f"rules:    {len(e.traces)} {e.action} rules considered in file order"
                     f"{f' ({e.other_actions} rules of other actions skipped)' if e.other_actions else ''}")
        width = max((len(t.rule.rule_id) for t in e.traces), default=0)
        where_width = max((len(f"{policy_path}:{t.rule.line}") for t in e.traces), default=0)
        for trace in e.traces:
            mark = {DECIDES: "=>", APPLIES: "+ "}.get(trace.outcome, "  ")
            where = f"{policy_path}:{trace.rule.line}"
            lines.append(f"  {mark} {trace.rule.rule_id:<{width}}  {where:<{where_width}}  "
                         f"{trace.rule.effect:<5}  {trace.outcome}: {trace.detail}")
    if casbin is not None:
        agree = (casbin.allowed, casbin.rule_id) == (e.decision.allowed, e.decision.rule_id)
        lines.append(f"casbin:   {'allow' if casbin.allowed else 'deny'} ({casbin.rule_id or 'no rule'})"
                     f"{'' if agree else '  MISMATCH: please report this'}")
    return lines
