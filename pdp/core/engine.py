"""The policy decision: which rule decides an (device, action, topic) request, and how.

Semantics (the same as the Casbin model in ``policies/model.conf``):
a rule applies when its type, location and purpose each equal the device's
value or are ``*``, its action is the requested one, and its topic pattern,
bound to the device's own attributes, matches the topic (publish, receive),
covers the filter (subscribe allow) or overlaps it (subscribe deny: a filter
that could select any topic the deny selects is refused, so ``a/#`` cannot
route around a deny of ``a/secret/#``). Any applicable deny decides (the first
one in file order); otherwise the first applicable allow decides; otherwise deny.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pdp.core.topics import bind, covers, matches, overlaps

ACTIONS: tuple[str, ...] = ("publish", "subscribe", "receive")
EFFECTS: tuple[str, ...] = ("allow", "deny")
NO_MATCH = "no matching rule"


@dataclass(frozen=True)
class Rule:
    rule_id: str
    type: str
    location: str
    purpose: str
    topic: str
    action: str
    effect: str
    line: int | None = None

    def as_casbin(self) -> list[str]:
        return [self.rule_id, self.type, self.location, self.purpose, self.topic, self.action, self.effect]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule_id: str | None
    reason: str


def decision_for(allowed: bool, rule_id: str | None) -> Decision:
    """The decision with its standard reason, from its outcome and deciding rule."""
    if rule_id is None:
        return Decision(False, None, NO_MATCH)
    return Decision(allowed, rule_id, f"{'allowed' if allowed else 'denied'} by rule {rule_id}")


def topic_applies(action: str, topic: str, pattern: str, attributes: Mapping[str, str], effect: str) -> bool:
    """Whether a rule's pattern, bound to the device, selects the requested topic or filter.

    For subscribe the effect matters: an allow must cover the whole filter (``a/+``
    never grants ``a/#``), a deny refuses any filter that could deliver one of its
    topics (``a/secret/#`` refuses ``a/#``). Both err towards refusing.
    """
    bound = bind(pattern, attributes)
    if bound is None:
        return False
    if action == "subscribe":
        return overlaps(bound, topic) if effect == "deny" else covers(bound, topic)
    return matches(bound, topic)


def _selects(value: str, device_value: str) -> bool:
    return value == "*" or value == device_value


def decide(rules: Sequence[Rule], attributes: Mapping[str, str], action: str, topic: str) -> Decision:
    """Evaluate rules (in file order) for one request; deny overrides allow, no match is deny."""
    first_allow: Rule | None = None
    for rule in rules:
        if rule.action != action:
            continue
        if not (
            _selects(rule.type, attributes["type"])
            and _selects(rule.location, attributes["location"])
            and _selects(rule.purpose, attributes["purpose"])
        ):
            continue
        if not topic_applies(action, topic, rule.topic, attributes, rule.effect):
            continue
        if rule.effect == "deny":
            return decision_for(False, rule.rule_id)
        if first_allow is None:
            first_allow = rule
    return decision_for(first_allow is not None, first_allow.rule_id if first_allow else None)
