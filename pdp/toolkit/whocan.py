"""Who can publish, subscribe to or receive on a topic: answered from the rules, not device by device.

For each rule of the action, the question "for which devices does this rule apply to the
topic?" is solved symbolically: the pattern with its placeholder levels read as ``+`` must
stand in the engine's relation to the topic (matches, covers, or for a subscribe deny
overlaps), and each placeholder level facing a literal topic level fixes that attribute's
value (``dev-{device_id}`` facing ``dev-42`` means ``device_id == 42``). A rule then selects
the devices whose selectors and fixed attributes agree, found through an index of the registry
by attribute value. Only a pattern the solver does not handle (two placeholders in one level,
a placeholder level starting with ``$``) is checked device by device with the engine's own
``topic_applies``, and only over the devices its selectors pick.

Deny overrides and first-allow-decides are then applied over these device sets in file order,
so the answer is the engine's decision for every device (``tests/test_toolkit_whocan.py``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pdp.core.engine import Rule, topic_applies
from pdp.core.topics import covers, level_value_problem, matches, overlaps
from pdp.registry.device import Device

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
NEVER = None


class _PerDevice:
    """The rule needs the engine per device (a pattern the solver does not reduce to equalities)."""


PER_DEVICE = _PerDevice()


def _relation(action: str, effect: str, pattern: str, topic: str) -> bool:
    if action == "subscribe":
        return overlaps(pattern, topic) if effect == "deny" else covers(pattern, topic)
    return matches(pattern, topic)


def solve(rule: Rule, topic: str) -> dict[str, str] | _PerDevice | None:
    """The attribute values a device needs for the rule's pattern to apply to ``topic``.

    ``{}``: every device (its selectors permitting); None: no device; PER_DEVICE: not solved here.
    """
    levels = rule.topic.split("/")
    templates: list[tuple[int, str, str, str]] = []  # (index, prefix, name, suffix)
    for index, level in enumerate(levels):
        if "{" not in level:
            continue
        parts = _PLACEHOLDER_RE.split(level)
        if len(parts) != 3 or parts[0].startswith("$"):
            return PER_DEVICE
        templates.append((index, parts[0], parts[1], parts[2]))
    if not templates:
        return {} if _relation(rule.action, rule.effect, rule.topic, topic) else NEVER
    relaxed = "/".join("+" if "{" in level else level for level in levels)
    if not _relation(rule.action, rule.effect, relaxed, topic):
        return NEVER
    t_levels = topic.split("/")
    overlap = rule.action == "subscribe" and rule.effect == "deny"
    hash_at = t_levels.index("#") if "#" in t_levels else len(t_levels)
    fixed: dict[str, str] = {}
    for index, prefix, name, suffix in templates:
        if overlap and (index >= hash_at or t_levels[index] == "+"):
            continue  # the filter's wildcard meets any value
        if index >= len(t_levels) or t_levels[index] in ("+", "#"):
            return NEVER  # a bound (literal) level never covers a wildcard
        level = t_levels[index]
        if not (level.startswith(prefix) and level.endswith(suffix) and len(level) > len(prefix) + len(suffix)):
            return NEVER
        value = level[len(prefix):len(level) - len(suffix)]
        if level_value_problem(value) is not None or fixed.setdefault(name, value) != value:
            return NEVER
    return fixed


@dataclass
class FleetIndex:
    """The registry's devices by attribute value, built per attribute on first use."""

    devices: Mapping[str, Device]
    _by: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def with_value(self, name: str, value: str) -> set[str]:
        if name == "device_id":
            return {value} if value in self.devices else set()
        index = self._by.get(name)
        if index is None:
            index = self._by[name] = defaultdict(set)
            for device_id, device in self.devices.items():
                index[getattr(device, name)].add(device_id)  # the field, not .attrs: no mapping built per device
        return index.get(value, set())

    def selecting(self, equalities: Mapping[str, str]) -> Iterable[str]:
        if not equalities:
            return self.devices.keys()
        sets = sorted((self.with_value(name, value) for name, value in equalities.items()), key=len)
        result = set(sets[0])
        for other in sets[1:]:
            result &= other
            if not result:
                break
        return result


@dataclass(frozen=True)
class WhoCan:
    action: str
    topic: str
    allowed: Mapping[str, Rule]  # device id -> the allow rule that decides
    denied: Mapping[str, Rule]  # device id -> the deny rule that decides (devices some rule applies to)
    per_device_rules: int  # rules the solver left to the engine, device by device


def who_can(rules: Sequence[Rule], fleet: FleetIndex, action: str, topic: str) -> WhoCan:
    """Every device's decision for one request, for the devices some rule applies to; the rest are denied by no rule."""
    denied: dict[str, Rule] = {}
    allowed_by: list[tuple[Rule, Iterable[str]]] = []
    per_device = 0
    for rule in rules:
        if rule.action != action:
            continue
        solved = solve(rule, topic)
        if solved is None:
            continue
        selectors = {name: getattr(rule, name) for name in ("type", "location", "purpose") if getattr(rule, name) != "*"}
        if isinstance(solved, _PerDevice):
            per_device += 1
            devices = [d for d in fleet.selecting(selectors)
                       if topic_applies(action, topic, rule.topic, fleet.devices[d].attrs, rule.effect)]
        else:
            if any(selectors.get(name, value) != value for name, value in solved.items()):
                continue  # e.g. type sensor but {type} must be camera
            devices = fleet.selecting({**selectors, **solved})
        if rule.effect == "deny":
            for device_id in devices:
                denied.setdefault(device_id, rule)
        else:
            allowed_by.append((rule, devices))
    allowed: dict[str, Rule] = {}
    for rule, devices in allowed_by:
        for device_id in devices:
            if device_id not in denied:
                allowed.setdefault(device_id, rule)
    return WhoCan(action, topic, allowed, denied, per_device)


@dataclass(frozen=True)
class Group:
    count: int
    label: str  # e.g. "all 2,314 camera devices in plant-3"
    members: tuple[str, ...] = ()


def group_devices(device_ids: Iterable[str], devices: Mapping[str, Device], totals: "GroupTotals",
                  list_up_to: int = 3) -> list[Group]:
    """A few lines for many devices: whole types, then whole type+location, then type+location+purpose."""
    chosen = [devices[d] for d in device_ids]

    def label(members: list[Device], what: str, total: int) -> Group:
        n = len(members)
        count = (f"all {n:,}" if n > 1 else "the only") if n == total else f"{n:,} of {total:,}"
        names = f": {', '.join(sorted(d.device_id for d in members))}" if n <= list_up_to else ""
        return Group(n, f"{count} {what.format(s='s' if n > 1 or total > 1 else '')}{names}",
                     tuple(d.device_id for d in members))

    out: list[Group] = []
    rest: list[Device] = []
    by_type: dict[str, list[Device]] = defaultdict(list)
    for d in chosen:
        by_type[d.type].append(d)
    for t, members in sorted(by_type.items()):
        if len(members) == totals.by_type[t]:
            out.append(label(members, f"{t} device{{s}}", totals.by_type[t]))
        else:
            rest.extend(members)
    by_tl: dict[tuple[str, str], list[Device]] = defaultdict(list)
    for d in rest:
        by_tl[(d.type, d.location)].append(d)
    rest = []
    for (t, loc), members in sorted(by_tl.items()):
        if len(members) == totals.by_type_location[(t, loc)]:
            out.append(label(members, f"{t} device{{s}} in {loc}", totals.by_type_location[(t, loc)]))
        else:
            rest.extend(members)
    by_tlp: dict[tuple[str, str, str], list[Device]] = defaultdict(list)
    for d in rest:
        by_tlp[(d.type, d.location, d.purpose)].append(d)
    for (t, loc, p), members in sorted(by_tlp.items()):
        out.append(label(members, f"{t} device{{s}} in {loc} with purpose {p}", totals.by_type_location_purpose[(t, loc, p)]))
    return out


@dataclass(frozen=True)
class GroupTotals:
    by_type: Counter[str]
    by_type_location: Counter[tuple[str, str]]
    by_type_location_purpose: Counter[tuple[str, str, str]]

    @classmethod
    def of(cls, devices: Iterable[Device]) -> GroupTotals:
        listed = list(devices)
        return cls(Counter(d.type for d in listed), Counter((d.type, d.location) for d in listed),
                   Counter((d.type, d.location, d.purpose) for d in listed))
