"""Blast radius of a policy or registry change: what each device gains and loses, grouped.

Whether a device may use a topic depends only on which rules apply to it, not on their order
(order only picks the deciding rule), so a device's permissions can change only where a
changed rule (added, removed or edited, compared by content) or its own registry record
changed. For each affected device the topics (or, for subscribe, the filters) it gains or
loses are found symbolically: inside each relevant allow pattern, a finite set of
representative topics is enumerated (at each wildcard level, every literal that any relevant
pattern has at that depth plus one fresh value; ``#`` expanded one level past the longest
pattern), and every boolean combination of MQTT filters is decided by these
representatives. A pattern all of whose (previously) granted topics are lost is reported
whole ("loses receive on sites/plant-3/+/cmd"), otherwise as a part with an example topic.

Devices share one computation when their patterns, with placeholders kept as written, compare
level by level exactly as their bound forms do (checked per device); the report then groups
devices by entry and by type, location and purpose. ``tests/test_toolkit_diff.py`` compares the
answer with brute-force evaluation of both policies over every topic of a small universe.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdp.core.engine import ACTIONS, Rule
from pdp.core.topics import bind, covers, matches, overlaps
from pdp.registry.device import Device

MAX_REPRESENTATIVES = 50_000  # per pattern; beyond it the entry is marked as not fully analysed
SELECTORS = ("type", "location", "purpose")
Content = tuple[str, str, str, str, str, str]  # type, location, purpose, topic, action, effect


def content(rule: Rule) -> Content:
    return (rule.type, rule.location, rule.purpose, rule.topic, rule.action, rule.effect)


@dataclass(frozen=True)
class Change:
    kind: str  # 'gain' | 'lose'
    action: str
    pattern: str  # a bound pattern, or placeholders kept as written for a shared computation
    whole: bool  # every topic of the pattern (that was / is granted) changes
    example: str | None  # a topic or filter that changes, when only part does
    complete: bool = True


@dataclass(frozen=True)
class RuleChanges:
    added: tuple[Rule, ...]
    removed: tuple[Rule, ...]


def rule_changes(old: Sequence[Rule], new: Sequence[Rule]) -> RuleChanges:
    """Rules by content: an edited rule is one removed and one added; reordering changes nothing here."""
    old_count, new_count = Counter(map(content, old)), Counter(map(content, new))
    added, removed = [], []
    budget = new_count - old_count
    for rule in new:
        if budget[content(rule)] > 0:
            budget[content(rule)] -= 1
            added.append(rule)
    budget = old_count - new_count
    for rule in old:
        if budget[content(rule)] > 0:
            budget[content(rule)] -= 1
            removed.append(rule)
    return RuleChanges(tuple(added), tuple(removed))


def _selects(rule: Rule | Content, values: tuple[str, str, str]) -> bool:
    fields = (rule.type, rule.location, rule.purpose) if isinstance(rule, Rule) else rule[:3]
    return all(s in ("*", v) for s, v in zip(fields, values))


def _relaxed(pattern: str) -> str:
    return "/".join("+" if "{" in level else level for level in pattern.split("/"))


# -- regions of topics and filters, decided by representatives ---------------------------------


def _fresh(literals: Iterable[str]) -> str:
    taken = set(literals)
    fresh = "fresh"
    while fresh in taken:
        fresh += "_"
    return fresh


class _Space:
    """The relevant patterns of one action for one device (old and new), and their representatives."""

    def __init__(self, action: str, old: tuple[list[str], list[str]], new: tuple[list[str], list[str]]) -> None:
        self.action = action
        self.old, self.new = old, new
        patterns = [p for side in (old, new) for group in side for p in group]
        self.depth = max((len(p.split("/")) for p in patterns), default=1) + 1
        self.literals: dict[int, set[str]] = defaultdict(set)
        for p in patterns:
            for i, level in enumerate(p.split("/")):
                if level not in ("+", "#"):
                    self.literals[i].add(level)
        self.fresh = _fresh(level for levels in self.literals.values() for level in levels)
        taken = {level for levels in self.literals.values() for level in levels}
        self.shown_fresh = "x" if "x" not in taken else self.fresh  # how the fresh level reads in an example

    def _choices(self, i: int) -> list[str]:
        out = sorted(self.literals.get(i, ())) + [self.fresh]
        return out + ["+"] if self.action == "subscribe" else out

    def representatives(self, pattern: str) -> tuple[list[str], bool]:
        """Topics (or filters) inside ``pattern`` standing for every region the patterns cut; complete flag."""
        out: list[str] = []
        subscribe = self.action == "subscribe"
        levels = pattern.split("/")

        def walk(prefix: list[str], i: int) -> bool:
            if len(out) > MAX_REPRESENTATIVES:
                return False
            if i == len(levels):
                out.append("/".join(prefix))
                return True
            level = levels[i]
            if level == "#":
                if prefix:
                    out.append("/".join(prefix))  # '#' also selects the parent
                if subscribe:
                    out.append("/".join([*prefix, "#"]))
                if len(prefix) < self.depth:
                    for choice in self._choices(len(prefix)):
                        if not walk([*prefix, choice], i):
                            return False
                return True
            if level == "+":
                for choice in self._choices(i):
                    if not walk([*prefix, choice], i + 1):
                        return False
                return True
            return walk([*prefix, level], i + 1)

        complete = walk([], 0)
        if subscribe and levels == ["+", "#"]:
            out.append("#")
        valid = [t for t in dict.fromkeys(out) if t != "" and self._inside(pattern, t)]
        return valid, complete

    def _inside(self, pattern: str, topic: str) -> bool:
        return covers(pattern, topic) if self.action == "subscribe" else matches(pattern, topic)

    def allowed(self, side: tuple[list[str], list[str]], topic: str) -> bool:
        allows, denies = side
        if self.action == "subscribe":
            return any(covers(a, topic) for a in allows) and not any(overlaps(d, topic) for d in denies)
        return any(matches(a, topic) for a in allows) and not any(matches(d, topic) for d in denies)

    def changes(self) -> list[Change]:
        out: list[Change] = []
        for kind, before, after in (("lose", self.old, self.new), ("gain", self.new, self.old)):
            for pattern in dict.fromkeys(before[0]):
                reps, complete = self.representatives(pattern)
                changed = [t for t in reps if self.allowed(before, t) and not self.allowed(after, t)]
                if not changed:
                    continue
                # Whole only when every region of the pattern changed: a region that was denied before and
                # stays denied after (another rule's deny) makes it a part, like one that stays granted.
                whole = len(changed) == len(reps)
                example = None if whole else "/".join(
                    self.shown_fresh if level == self.fresh else level for level in changed[0].split("/"))
                out.append(Change(kind, self.action, pattern, whole, example, complete))
        return out


# -- devices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceChange:
    device_id: str
    changes: tuple[Change, ...]
    admission: str | None  # e.g. 'becomes suspended', 'added (active)', 'removed'


def _applicable(rules: Sequence[Rule], values: tuple[str, str, str]) -> list[Rule]:
    return [rule for rule in rules if _selects(rule, values)]


class _BySelectors:
    """Rules bucketed by their selectors: the rules a device's values pick, in file order, from eight buckets."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self._buckets: dict[tuple[str, str, str], list[tuple[int, Rule]]] = defaultdict(list)
        for order, rule in enumerate(rules):
            self._buckets[(rule.type, rule.location, rule.purpose)].append((order, rule))

    def picked(self, values: tuple[str, str, str]) -> list[Rule]:
        t, loc, p = values
        found = [item for key in ((a, b, c) for a in (t, "*") for b in (loc, "*") for c in (p, "*"))
                 for item in self._buckets.get(key, ())]
        return [rule for _, rule in sorted(found, key=lambda item: item[0])]


def _relevant(rules: Sequence[Rule], changed: Sequence[Rule]) -> list[Rule]:
    """Rules whose patterns can meet a changed pattern, and those meeting such an allow (for exact regions).

    Decided on the patterns with placeholder levels read as '+', so it holds for every device; the
    caller then keeps the rules a device's selectors pick.
    """
    memo: dict[tuple[str, str], bool] = {}

    def meets(rule: Rule, targets: set[tuple[str, str]]) -> bool:
        relaxed = _relaxed(rule.topic)
        for action, pattern in targets:
            if action != rule.action:
                continue
            key = (relaxed, pattern)
            if key not in memo:
                memo[key] = overlaps(relaxed, pattern)
            if memo[key]:
                return True
        return False

    changed_relaxed = {(c.action, _relaxed(c.topic)) for c in changed}
    first = [r for r in rules if meets(r, changed_relaxed)]
    allows = {(r.action, _relaxed(r.topic)) for r in first if r.effect == "allow"} | changed_relaxed
    return [r for r in rules if meets(r, allows)]


def _sides(rules: Sequence[Rule], action: str, attrs: Mapping[str, str] | None) -> tuple[list[str], list[str]]:
    allows, denies = [], []
    for rule in rules:
        if rule.action != action:
            continue
        pattern = rule.topic if attrs is None else bind(rule.topic, attrs)
        if pattern is None:
            continue
        (allows if rule.effect == "allow" else denies).append(pattern)
    return allows, denies


def _shareable(patterns: Iterable[str], attrs: Mapping[str, str]) -> bool:
    """Patterns with placeholders kept compare level by level as their bound forms do, for this device."""
    seen: dict[tuple[int, str], str] = {}
    for pattern in patterns:
        for i, level in enumerate(pattern.split("/")):
            bound = bind(level, attrs) if "{" in level else level
            if bound is None:
                return False
            if seen.setdefault((i, bound), level) != level:
                return False
    return True


def device_changes(old_rules: Sequence[Rule], new_rules: Sequence[Rule], old_devices: Mapping[str, Device],
                   new_devices: Mapping[str, Device]) -> list[DeviceChange]:
    """What each device gains and loses; devices with no change are left out."""
    delta = rule_changes(old_rules, new_rules)
    changed = list(delta.added) + list(delta.removed)
    out: list[DeviceChange] = []
    per_values: dict[tuple[str, str, str], tuple[list[Rule], list[Rule]] | None] = {}
    old_candidates = _BySelectors(_relevant(old_rules, changed))
    new_candidates = _BySelectors(_relevant(new_rules, changed))
    changed_by = _BySelectors(changed)
    memo: dict[tuple, tuple[Change, ...]] = {}
    for device_id in sorted(set(old_devices) | set(new_devices)):
        old_d, new_d = old_devices.get(device_id), new_devices.get(device_id)
        old_on = old_d is not None and old_d.status == "active"
        new_on = new_d is not None and new_d.status == "active"
        if not old_on and not new_on:
            continue
        same_record = old_on and new_on and old_d.attrs == new_d.attrs  # type: ignore[union-attr]
        if same_record:
            values = (new_d.type, new_d.location, new_d.purpose)  # type: ignore[union-attr]
            if values not in per_values:
                if not changed_by.picked(values):
                    per_values[values] = None
                else:
                    per_values[values] = (old_candidates.picked(values), new_candidates.picked(values))
            relevant = per_values[values]
            if relevant is None:
                continue
            old_rel, new_rel = relevant
        else:
            old_rel = _applicable(old_rules, (old_d.type, old_d.location, old_d.purpose)) if old_on else []  # type: ignore[union-attr]
            new_rel = _applicable(new_rules, (new_d.type, new_d.location, new_d.purpose)) if new_on else []  # type: ignore[union-attr]
        attrs_old = old_d.attrs if old_on else None  # type: ignore[union-attr]
        attrs_new = new_d.attrs if new_on else None  # type: ignore[union-attr]
        share = same_record and _shareable([r.topic for r in (*old_rel, *new_rel)], attrs_new or {})
        found: list[Change] = []
        for action in ACTIONS:
            if share:
                old_side, new_side = _sides(old_rel, action, None), _sides(new_rel, action, None)
                key = (action, tuple(map(tuple, old_side)), tuple(map(tuple, new_side)))
            else:
                old_side = _sides(old_rel, action, attrs_old) if old_on else ([], [])
                new_side = _sides(new_rel, action, attrs_new) if new_on else ([], [])
                key = (action, tuple(map(tuple, old_side)), tuple(map(tuple, new_side)), "bound")
            if key not in memo:
                memo[key] = tuple(_Space(action, old_side, new_side).changes())
            for change in memo[key]:
                pattern = bind(change.pattern, attrs_new or attrs_old or {}) if share else change.pattern
                found.append(Change(change.kind, change.action, pattern or change.pattern, change.whole,
                                    change.example if not share or change.example is None
                                    else (bind(change.example, attrs_new or {}) or change.example), change.complete))
        admission = None
        if old_on != new_on:
            admission = ("added" if old_d is None else f"becomes {new_d.status}") if new_on else \
                ("removed" if new_d is None else f"becomes {new_d.status}")  # type: ignore[union-attr]
        elif not same_record:
            admission = "attributes changed"
        if found or admission:
            out.append(DeviceChange(device_id, tuple(found), admission))
    return out


# -- report -----------------------------------------------------------------------------------


def _template(pattern: str, attrs: Mapping[str, str]) -> str:
    """The pattern with the device's own id and location written as placeholders again, so that devices
    differing only by them share an entry ("all 2,314 camera devices gain receive on sites/{location}/...")."""
    device_id, location = attrs["device_id"], attrs["location"]
    return "/".join("{location}" if level == location else
                    level.replace(device_id, "{device_id}") if device_id in level else level
                    for level in pattern.split("/"))


def grouped(changes: Sequence[DeviceChange], devices: Mapping[str, Device]) -> list[tuple[Change, list[str]]]:
    """Entries with the devices that share them (device ids written back as {device_id})."""
    by_entry: dict[Change, list[str]] = defaultdict(list)
    for dc in changes:
        attrs = devices[dc.device_id].attrs
        for change in dc.changes:
            entry = Change(change.kind, change.action, _template(change.pattern, attrs), change.whole,
                           None if change.example is None else _template(change.example, attrs), change.complete)
            by_entry[entry].append(dc.device_id)
    order = {"lose": 0, "gain": 1}
    return sorted(by_entry.items(), key=lambda item: (order[item[0].kind], item[0].action, item[0].pattern, -len(item[1])))


def phrase(change: Change) -> str:
    verb = "lose" if change.kind == "lose" else "gain"
    what = f"{change.action} on {change.pattern}" if change.whole else \
        f"part of {change.action} on {change.pattern} (e.g. {change.example})"
    return f"{verb} {what}" + ("" if change.complete else " [too many topics to analyse fully]")
