"""Lint: rules that are valid but almost certainly not what the author meant.

``mqtt-pdp check`` already refuses what cannot load; these findings are about meaning.
Each finding has a severity, a code and the rule's ``file:line``. The "never decides"
checks are sound, not complete: a rule is reported only when it provably cannot decide
any request, so a report is never a false alarm (a rule that never decides for subtler
reasons may go unreported).

Placeholders are compared symbolically: a level such as ``{location}`` or ``dev-{device_id}``
is treated as a literal level, which it is for any one device (the same template binds to the
same value for the same device), so ``covers`` over the raw patterns means "covers for every
device". Patterns are found through a trie, so the pairwise checks cost about one walk per rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pdp.core.engine import Rule
from pdp.core.topics import covers, overlaps

ERROR, WARNING, INFO = "error", "warning", "info"

# code -> (severity, short name)
CODES: dict[str, tuple[str, str]] = {
    "W101": (WARNING, "shadowed-by-deny"),
    "W102": (WARNING, "redundant"),
    "W103": (WARNING, "duplicate"),
    "W201": (WARNING, "unknown-selector-value"),
    "I202": (INFO, "no-device-selected"),
    "W301": (WARNING, "wide-grant"),
    "W302": (WARNING, "sys-topic"),
    "W303": (WARNING, "subscribe-deny-without-receive-deny"),
    "W304": (WARNING, "cross-location-write"),
}
SELECTORS = ("type", "location", "purpose")


@dataclass(frozen=True, order=True)
class Finding:
    line: int
    code: str
    rule_id: str
    message: str
    severity: str = field(default=WARNING, compare=False)

    @property
    def name(self) -> str:
        return CODES[self.code][1]

    def render(self, path: str) -> str:
        return f"{path}:{self.line}: {self.severity} {self.code} {self.name}: {self.message}"


def _finding(rule: Rule, code: str, message: str) -> Finding:
    return Finding(rule.line or 0, code, rule.rule_id, message, CODES[code][0])


def _selectors_include(wide: Rule, narrow: Rule) -> bool:
    """Every device ``narrow`` selects is also selected by ``wide``."""
    return all(getattr(wide, name) in ("*", getattr(narrow, name)) for name in SELECTORS)


class _Trie:
    """Raw patterns (templates as literal levels) of one action; finds the patterns covering a pattern."""

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.end: list[int] = []
        self.hash: list[int] = []

    def add(self, pattern: str, at: int) -> None:
        node = self
        levels = pattern.split("/")
        for level in levels[:-1]:
            node = node.children.setdefault(level, _Trie())
        if levels[-1] == "#":
            node.hash.append(at)
        else:
            node.children.setdefault(levels[-1], _Trie()).end.append(at)

    def covering(self, pattern: str) -> list[int]:
        """Candidates whose pattern may cover ``pattern``; each is confirmed with ``covers``."""
        out: list[int] = []
        levels = pattern.split("/")
        stack: list[tuple[_Trie, int]] = [(self, 0)]
        while stack:
            node, i = stack.pop()
            out.extend(node.hash)
            if i == len(levels):
                out.extend(node.end)
                continue
            level = levels[i]
            plus = node.children.get("+")
            if level == "#":
                if i == 0 and plus is not None:
                    out.extend(plus.hash)  # '+/#' covers a leading '#'
                continue
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))  # the same literal, or '+' against '+'
            if plus is not None and level != "+":
                stack.append((plus, i + 1))
        return out


def _never_decides(rules: Sequence[Rule]) -> list[Finding]:
    findings: list[Finding] = []
    tries: dict[str, _Trie] = {}
    for at, rule in enumerate(rules):
        tries.setdefault(rule.action, _Trie()).add(rule.topic, at)
    seen: dict[tuple[str, str, str, str, str], int] = {}
    for at, rule in enumerate(rules):
        key = (rule.type, rule.location, rule.purpose, rule.topic, rule.action)
        if key in seen and not (rule.effect == "deny" and rules[seen[key]].effect == "allow"):
            # (a deny repeating an allow: the allow is reported as shadowed by it, below)
            other = rules[seen[key]]
            if other.effect == rule.effect:
                findings.append(_finding(rule, "W103", f"{rule.rule_id} repeats {other.rule_id} (line {other.line}) "
                                                      "and never decides"))
            else:
                findings.append(_finding(rule, "W103", f"allow {rule.rule_id} never decides: deny {other.rule_id} "
                                                      f"(line {other.line}) has the same selectors, pattern and action"))
            continue
        seen.setdefault(key, at)
        shadow: Rule | None = None
        redundant: Rule | None = None
        for other_at in sorted(set(tries[rule.action].covering(rule.topic))):
            if other_at == at:
                continue
            other = rules[other_at]
            if not _selectors_include(other, rule) or not covers(other.topic, rule.topic):
                continue
            if rule.effect == "allow" and other.effect == "deny":
                shadow = shadow or other
            elif other.effect == rule.effect and other_at < at:
                redundant = redundant or other
        if shadow is not None:
            findings.append(_finding(rule, "W101", f"allow {rule.rule_id} never decides: deny {shadow.rule_id} "
                                                  f"(line {shadow.line}) selects the same devices and covers {rule.topic}"))
        elif redundant is not None:
            findings.append(_finding(rule, "W102", f"{rule.effect} {rule.rule_id} never decides: the earlier "
                                                  f"{redundant.effect} {redundant.rule_id} (line {redundant.line}) "
                                                  f"selects the same devices and covers {rule.topic}"))
    return findings


def _selector_values(rules: Sequence[Rule], devices: Iterable[Mapping[str, str]]) -> list[Finding]:
    listed = [(attrs["type"], attrs["location"], attrs["purpose"]) for attrs in devices]
    known = {name: {values[k] for values in listed} for k, name in enumerate(SELECTORS)}
    # Every way a rule can name two or three selectors of a registered device ('*' for the other).
    combos: set[tuple[str, str, str]] = set(listed)
    combos.update((t, loc, "*") for t, loc, _ in listed)
    combos.update((t, "*", p) for t, _, p in listed)
    combos.update(("*", loc, p) for _, loc, p in listed)
    findings: list[Finding] = []
    hints: dict[tuple[str, str], str] = {}
    for rule in rules:
        unknown = False
        for name in SELECTORS:
            value = getattr(rule, name)
            if value != "*" and value not in known[name]:
                unknown = True
                hint = hints.get((name, value))
                if hint is None:
                    close = difflib.get_close_matches(value, sorted(known[name]), n=1)
                    hint = hints[(name, value)] = f" (did you mean {close[0]!r}?)" if close else ""
                findings.append(_finding(rule, "W201", f"no registered device has {name} {value!r}{hint}"))
        wanted = (rule.type, rule.location, rule.purpose)
        if unknown or wanted.count("*") >= 2:
            continue
        if wanted not in combos:
            shown = ", ".join(f"{name} {value}" for name, value in zip(SELECTORS, wanted) if value != "*")
            findings.append(_finding(rule, "I202", f"no registered device has {shown} together"))
    return findings


def _wide(rule: Rule) -> Finding | None:
    first = rule.topic.split("/")[0]
    if rule.effect != "allow" or rule.action not in ("publish", "receive") or first not in ("+", "#"):
        return None
    who = ", ".join(f"{name} {getattr(rule, name)}" for name in SELECTORS if getattr(rule, name) != "*") or "every device"
    return _finding(rule, "W301", f"{rule.action} on {rule.topic!r} for {who}: a wildcard first level reaches every "
                                  "topic tree; name the tree (e.g. sites/{location}/...)")


def _sys(rule: Rule) -> Finding | None:
    if rule.effect != "allow" or not rule.topic.startswith("$"):
        return None
    return _finding(rule, "W302", f"{rule.action} on {rule.topic!r}: '$' topics are the broker's own (e.g. $SYS); "
                                  "devices should not reach them")


def _subscribe_without_receive(rules: Sequence[Rule]) -> list[Finding]:
    receive_denies = _Trie()
    for at, rule in enumerate(rules):
        if rule.action == "receive" and rule.effect == "deny":
            receive_denies.add(rule.topic, at)
    findings = []
    for rule in rules:
        if rule.action != "subscribe" or rule.effect != "deny":
            continue
        if any(_selectors_include(rules[d], rule) and covers(rules[d].topic, rule.topic)
               for d in receive_denies.covering(rule.topic)):
            continue
        findings.append(_finding(rule, "W303", f"subscribe deny of {rule.topic!r} has no receive deny covering it: "
                                               "deliveries are decided by the receive rules alone, so the subscribe deny "
                                               f"is the only guard of these topics (add 'p, ..., {rule.topic}, receive, deny')"))
    return findings


def _template_free(pattern: str) -> str:
    return "/".join("+" if "{" in level else level for level in pattern.split("/"))


def _cross_location(rules: Sequence[Rule]) -> list[Finding]:
    """Publish allows that reach another location's part of a tree other rules keep per location."""
    trees: dict[str, tuple[int, str]] = {}  # '{location}'-relaxed pattern -> (index of the {location} level, example)
    for rule in rules:
        levels = rule.topic.split("/")
        if "{location}" in levels:
            trees.setdefault(_template_free(rule.topic), (levels.index("{location}"), rule.rule_id))
    findings = []
    meets: dict[str, list[str]] = {}  # relaxed publish pattern -> the trees it overlaps (patterns repeat a lot)
    for rule in rules:
        if rule.action != "publish" or rule.effect != "allow":
            continue
        topic = rule.topic
        for name in SELECTORS:  # a placeholder the rule's own selector fixes is that value, not any level
            value = getattr(rule, name)
            if value != "*" and name != "location":
                topic = topic.replace("{" + name + "}", value)
        levels = topic.split("/")
        relaxed = _template_free(topic)
        if relaxed not in meets:
            meets[relaxed] = [tree for tree in trees if overlaps(relaxed, tree)]
        for tree in meets[relaxed]:
            index, example = trees[tree]
            level = levels[index] if index < len(levels) else "#"
            if level == "{location}" or (rule.location != "*" and level == rule.location):
                continue
            findings.append(_finding(rule, "W304", f"devices of one location may publish into another's part of "
                                                   f"{tree!r} (kept per location by {example}): level {index + 1} is "
                                                   f"{level!r}, not {{location}}"))
            break
    return findings


def lint(rules: Sequence[Rule], devices: Iterable[Mapping[str, str]]) -> list[Finding]:
    """Every finding, in file order."""
    findings = _never_decides(rules) + _selector_values(rules, devices)
    findings += [f for rule in rules for f in (_wide(rule), _sys(rule)) if f is not None]
    findings += _subscribe_without_receive(rules) + _cross_location(rules)
    return sorted(findings)
