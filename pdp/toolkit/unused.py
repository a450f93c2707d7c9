"""Least privilege from evidence: allow rules and per-device grants no recorded access used.

Input is what the assertion log records for allowed requests (device, its attributes at the
time, action, topic or filter, deciding rule); output is, per allow rule, whether it decided
anything in the period, which of the devices it grants (active devices its selectors pick)
never used it, and a narrower pattern when every use fits one: a ``+`` level every device
filled with one value becomes that literal, or, when each device used its own attribute there,
that placeholder (``sites/{location}/+/cmd`` used only as each device's own id suggests
``sites/{location}/{device_id}/cmd``); a ``#`` becomes the common tail of the uses. A suggestion
is kept only if it still grants every recorded use (checked with the engine's own relation).

The core is here; ``pdp.cli.policy_commands.unused_rows`` reads the log into it, and the
``unused`` report is registered beside the governance reports in ``pdp.cli.report_commands``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdp.core.engine import Rule, topic_applies

PLACEHOLDERS = ("device_id", "type", "location", "purpose", "owner")


@dataclass(frozen=True)
class Use:
    """One allowed request from the assertion log."""

    device_id: str
    attributes: Mapping[str, str]  # the device's attributes when it was decided
    action: str
    topic: str
    rule_id: str


@dataclass(frozen=True)
class RuleUsage:
    rule: Rule
    uses: int
    devices_used: frozenset[str]
    devices_granted: frozenset[str]  # active registered devices the rule's selectors pick
    suggestion: str | None  # a narrower pattern covering every use, when the evidence supports one

    @property
    def unused_by(self) -> frozenset[str]:
        return self.devices_granted - self.devices_used


def _plus_level(values: list[tuple[str, Mapping[str, str]]]) -> str | None:
    """What a '+' level can narrow to: a placeholder every use matched (two devices or more), or one literal."""
    devices = {attrs.get("device_id") for _, attrs in values}
    if len(devices) > 1:
        for name in PLACEHOLDERS:
            if all(attrs.get(name) == level for level, attrs in values):
                return "{" + name + "}"
    distinct = {level for level, _ in values}
    if len(distinct) == 1:
        level = distinct.pop()
        if level not in ("+", "#"):
            return level
    return None


def suggest(rule: Rule, uses: Sequence[Use]) -> str | None:
    """A pattern narrower than the rule's that still selects every use, or None."""
    if not uses:
        return None
    levels = rule.topic.split("/")
    topics = [(use.topic.split("/"), use.attributes) for use in uses]
    out: list[str] = []
    for i, level in enumerate(levels):
        if level == "+":
            narrowed = _plus_level([(t[i], a) for t, a in topics if i < len(t)])
            out.append(narrowed or "+")
        elif level == "#":
            tails = [t[i:] for t, _ in topics]
            common: list[str] = []
            for column in zip(*tails):
                if len(set(column)) != 1 or column[0] == "#":
                    break
                common.append(column[0])
            if all(tail == common for tail in tails):
                out.extend(common)  # every use ended exactly there
            else:
                out.extend([*common, "#"])
        else:
            out.append(level)
    if not out:
        return None
    suggestion = "/".join(out)
    if suggestion == rule.topic:
        return None
    if not all(topic_applies(use.action, use.topic, suggestion, use.attributes, "allow") for use in uses):
        return None
    return suggestion


def usage(rules: Sequence[Rule], granted: Mapping[str, Iterable[str]], uses: Iterable[Use]) -> list[RuleUsage]:
    """Per allow rule (file order): uses, devices that used it, devices granted, and a suggestion.

    ``granted`` maps rule id to the active devices its selectors pick (the caller knows the registry).
    """
    by_rule: dict[str, list[Use]] = defaultdict(list)
    for use in uses:
        by_rule[use.rule_id].append(use)
    out = []
    for rule in rules:
        if rule.effect != "allow":
            continue
        mine = [use for use in by_rule.get(rule.rule_id, ()) if use.action == rule.action]
        out.append(RuleUsage(rule, len(mine), frozenset(use.device_id for use in mine),
                             frozenset(granted.get(rule.rule_id, ())), suggest(rule, mine)))
    return out
