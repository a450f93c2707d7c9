"""The PDP's decision and deciding rule equal Casbin's, loaded from the same model and policy files.

Casbin's ``topicMatch`` is the oracle in ``pdp.policy.oracle``, written from the MQTT
specification without our topic code, so these differentials check topic semantics too.
The generators are shared with ``tests/test_index.py`` and ``tests/test_oracle.py``: random
policies use every placeholder, whole and inside a level, wildcards at every depth, '$'
topics, empty levels and denies of every action; requests are mostly derived from the
policy's own patterns, bound to the device and mutated, so that rules actually decide.
Each run counts what decided and fails when the generated load stops exercising it.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdp.core.engine import ACTIONS, Decision, Rule, decide
from pdp.core.topics import TopicError, validate_filter, validate_topic
from pdp.policy.load import load_policy
from pdp.policy.oracle import topic_match
from pdp.registry.device import Device

ROOT = Path(__file__).resolve().parent.parent
DEVICE_IDS = ["d0", "d1", "d2", "d3"]
TYPES = ["sensor", "gateway", "cam"]
LOCATIONS = ["plant-a", "plant-b"]
PURPOSES = ["telemetry", "control"]
OWNERS = ["ops", "lab"]
PLACEHOLDERS = ("device_id", "type", "location", "purpose", "owner")
# Literals overlap device values, so literal rules compete with placeholder rules for the same levels.
LITERALS = ["sites", "x", "cmd", "", "plant-a", "sensor", "d1", "ops", "dev-d2"]
DOLLAR = ["$SYS", "$x"]
TEMPLATES = ["{%s}", "{%s}", "dev-{%s}", "{%s}-x", "{%s}.{%s}"]

Decider = Callable[[Device, str, str], Decision]
OVERLAP_ONLY = "subscribe deny overlapping, not covering"


def _device(rng: random.Random) -> Device:
    return Device(rng.choice(DEVICE_IDS), rng.choice(TYPES), rng.choice(LOCATIONS), rng.choice(PURPOSES),
                  rng.choice(OWNERS), "active")


def _pattern_level(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.4:
        template = rng.choice(TEMPLATES)
        return template % tuple(rng.choice(PLACEHOLDERS) for _ in range(template.count("%s")))
    if roll < 0.6:
        return "+"
    return rng.choice(LITERALS)


def _pattern(rng: random.Random) -> str:
    levels = [_pattern_level(rng) for _ in range(rng.randint(0, 4))]
    if rng.random() < 0.45 or not levels:
        levels.append("#")
    if rng.random() < 0.08:
        levels[0] = rng.choice(DOLLAR)
    return "/".join(levels) or "#"  # a single empty level is not a filter


def _random_policy(rng: random.Random, n: int) -> str:
    lines = []
    for i in range(n):
        lines.append(", ".join([
            "p", f"r{i}",
            rng.choice(TYPES + ["*", "*"]), rng.choice(LOCATIONS + ["*", "*"]), rng.choice(PURPOSES + ["*", "*"]),
            _pattern(rng), rng.choice(ACTIONS), rng.choice(["allow", "allow", "deny"]),
        ]))
    return "\n".join(lines) + "\n"


def _bind(pattern: str, device: Device) -> str:
    """Plain substitution: the test's own binding, only used to aim requests at rules."""
    for name, value in device.attrs.items():
        pattern = pattern.replace("{" + name + "}", value)
    return pattern


def _some_level(rng: random.Random, device: Device) -> str:
    return rng.choice(LITERALS + [device.device_id, device.location, device.type, f"dev-{device.device_id}"])


def _topic_from(rng: random.Random, bound: str, device: Device) -> list[str]:
    """A topic name the bound pattern selects: each '+' one level, '#' zero to two levels."""
    levels: list[str] = []
    for level in bound.split("/"):
        if level == "+":
            levels.append(_some_level(rng, device))
        elif level == "#":
            levels.extend(_some_level(rng, device) for _ in range(rng.randint(0, 2)))
        else:
            levels.append(level)
    return levels


def _filter_from(rng: random.Random, bound: str, device: Device) -> list[str]:
    """A filter near the bound pattern: wildcards kept, narrowed or widened ('a/+' becomes 'a/#').

    Sometimes cut short and ended with '#' ('a/secret/#' becomes 'a/#' or '#'): a filter
    wider than a subscribe deny, which the deny must refuse though it does not cover it.
    """
    levels: list[str] = []
    for level in bound.split("/"):
        roll = rng.random()
        if level == "+":
            levels.append("+" if roll < 0.45 else "#" if roll < 0.6 else _some_level(rng, device))
        elif level == "#":
            if roll < 0.4:
                levels.append("#")
            elif roll < 0.55:
                levels.append("+")
            elif roll < 0.7:
                levels.extend(["+", "#"])
            elif roll < 0.85:
                levels.extend(_some_level(rng, device) for _ in range(rng.randint(1, 2)))
            # else: the parent alone
        else:
            levels.append("+" if roll < 0.1 else level)
    if rng.random() < 0.1:
        levels.append("#")
    if levels and rng.random() < 0.12:
        levels = levels[:rng.randrange(len(levels))] + ["#"]
    return levels


def _mutate(rng: random.Random, levels: list[str], device: Device) -> list[str]:
    levels = list(levels)
    kind = rng.randrange(6)
    at = rng.randrange(len(levels)) if levels else 0
    if kind == 0 and levels:
        levels[at] = _some_level(rng, device)
    elif kind == 1 and levels:
        del levels[-1]
    elif kind == 2:
        levels.append(_some_level(rng, device))
    elif kind == 3:
        levels[:1] = [rng.choice(DOLLAR)]
    elif kind == 4:
        levels.insert(at, "")
    elif kind == 5:
        levels.insert(0, rng.choice(DOLLAR))
    return levels


def _random_levels(rng: random.Random, device: Device, subscribe: bool) -> list[str]:
    levels = [_some_level(rng, device) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.1:
        levels[0] = rng.choice(DOLLAR)
    if subscribe:
        levels = [level if rng.random() < 0.7 else "+" for level in levels]
        if rng.random() < 0.4:
            levels.append("#")
    return levels


def _valid(action: str, topic: str) -> bool:
    try:
        (validate_filter if action == "subscribe" else validate_topic)(topic)
    except TopicError:
        return False
    return True


INVALID = {
    "publish": ["", "a/+", "x/#", "+", "a\x00b", "x" * 65536, "é" * 32768],
    "receive": ["", "sites/+/x", "#", "a\x00"],
    "subscribe": ["", "a/#/b", "a#", "x/b+", "+a", "a\x00", "#/", "x/" + "y" * 65535],
}


def _request(rng: random.Random, device: Device, rules: Sequence[Rule] = (), invalid: bool = False) -> tuple[str, str]:
    """(action, topic): usually aimed at one of ``rules`` (those that apply to the device), sometimes random.

    Valid, except for a few deliberately invalid ones when ``invalid``.
    """
    if invalid and rng.random() < 0.03:
        action = rng.choice(ACTIONS)
        return action, rng.choice(INVALID[action])
    for _ in range(20):
        if rules and rng.random() < 0.9:
            rule = rng.choice(rules)
            action = rule.action if rng.random() < 0.95 else rng.choice(ACTIONS)
            owner = device if rng.random() < 0.9 else _device(rng)  # sometimes another device's values
            bound = _bind(rule.topic, owner)
            if action == "subscribe":
                levels = _filter_from(rng, bound, device)
            else:
                levels = _topic_from(rng, bound, device)
            if rng.random() < 0.2:
                levels = _mutate(rng, levels, device)
        else:
            action = rng.choice(ACTIONS)
            levels = _random_levels(rng, device, action == "subscribe")
        topic = "/".join(levels)
        if _valid(action, topic):
            return action, topic
    return action, "x"


def pdp_decide(decide_fn: Callable[[str, str], Decision], action: str, topic: str) -> Decision:
    """What the decision point does: an invalid topic or filter never reaches the rules."""
    if not _valid(action, topic):
        return Decision(False, None, "invalid")
    return decide_fn(action, topic)


@dataclass
class Stats:
    """What a differential run compared, what disagreed, and which rules decided."""

    decisions: int = 0
    mismatches: list[tuple[str, str, Device, Decision, Decision]] = field(default_factory=list)
    no_match: int = 0
    invalid: int = 0
    dollar: int = 0
    decided: Counter[str] = field(default_factory=Counter)

    def add(self, rules: dict[str, Rule], device: Device, action: str, topic: str, ours: Decision,
            reference: Decision) -> None:
        self.decisions += 1
        if (ours.allowed, ours.rule_id) != (reference.allowed, reference.rule_id):
            self.mismatches.append((action, topic, device, ours, reference))
        if topic.startswith("$"):
            self.dollar += 1
        if not _valid(action, topic):
            self.invalid += 1
            return
        if reference.rule_id is None:
            self.no_match += 1
            return
        rule = rules[reference.rule_id]
        self.decided[f"{action} {rule.effect}"] += 1
        if action == "subscribe" and rule.effect == "deny" and not topic_match(action, topic, rule.topic, device.attrs):
            self.decided[OVERLAP_ONLY] += 1  # the deny overlaps the filter without covering it (the oracle's covers)
        for level in rule.topic.split("/"):
            for name in PLACEHOLDERS:
                if "{" + name + "}" in level:
                    self.decided["{" + name + "}"] += 1
                    self.decided["{" + name + "} whole level" if level == "{" + name + "}" else
                                 "{" + name + "} inside a level"] += 1
        if rule.topic.startswith("$"):
            self.decided["'$' pattern"] += 1
        if "#" in rule.topic:
            self.decided["'#' pattern"] += 1
        if "+" in rule.topic:
            self.decided["'+' pattern"] += 1

    def report(self) -> str:
        share = {key: f"{count / self.decisions:.1%}" for key, count in sorted(self.decided.items())}
        return (f"{self.decisions} decisions, {len(self.mismatches)} mismatches, "
                f"no matching rule {self.no_match / self.decisions:.1%} (invalid ones aside), invalid {self.invalid}, "
                f"'$' requests {self.dollar}; {OVERLAP_ONLY}: {self.decided[OVERLAP_ONLY]}; decided by: {share}")

    def assert_exercised(self) -> None:
        """Fail when the generators stop reaching the semantics they are meant to test."""
        floor = 0.01 * self.decisions
        for name in PLACEHOLDERS:
            key = "{" + name + "}"
            assert self.decided[key] >= floor, (key, self.report())
            for where in (" whole level", " inside a level"):
                assert self.decided[key + where] >= floor / 4, (key + where, self.report())
        for action in ACTIONS:
            for effect in ("allow", "deny"):
                assert self.decided[f"{action} {effect}"] >= floor, (action, effect, self.report())
        for key in ("'$' pattern", "'#' pattern", "'+' pattern", OVERLAP_ONLY):
            assert self.decided[key] >= floor / 4, (key, self.report())
        assert self.no_match < 0.4 * self.decisions, self.report()


def differential(
    rng: random.Random,
    build: Callable[[str], tuple[Sequence[Rule], Decider, Decider]],
    policies: int,
    requests: int,
    max_rules: int,
    invalid: bool = False,
) -> Stats:
    """Compare two deciders on random policies; ``build`` turns a policy text into (rules, candidate, reference)."""
    stats = Stats()
    for _ in range(policies):
        rules, candidate, reference = build(_random_policy(rng, rng.randint(1, max_rules)))
        by_id = {rule.rule_id: rule for rule in rules}
        applicable: dict[tuple[str, str, str], list[Rule]] = {}
        for _ in range(requests):
            device = _device(rng)
            key = (device.type, device.location, device.purpose)
            if key not in applicable:
                applicable[key] = [rule for rule in rules if all(
                    value in ("*", own) for value, own in zip((rule.type, rule.location, rule.purpose), key))]
            action, topic = _request(rng, device, applicable[key], invalid)
            stats.add(by_id, device, action, topic, candidate(device, action, topic), reference(device, action, topic))
    return stats


def casbin_builder(tmp_path: Path, candidate: Callable[[Sequence[Rule]], Callable[[Device, str, str], Decision]]
                   ) -> Callable[[str], tuple[Sequence[Rule], Decider, Decider]]:
    """Policies written to files and loaded as the PDP loads them; the reference is Casbin."""
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")

    def build(text: str) -> tuple[Sequence[Rule], Decider, Decider]:
        (tmp_path / "policy.csv").write_text(text)
        policy = load_policy(tmp_path / "model.conf", tmp_path / "policy.csv")
        return policy.rules, candidate(policy.rules), policy.reference.decide

    return build


def engine_candidate(rules: Sequence[Rule]) -> Decider:
    return lambda device, action, topic: pdp_decide(
        lambda a, t: decide(rules, device.attrs, a, t), action, topic)


def test_differential_against_casbin(tmp_path: Path) -> None:
    stats = differential(random.Random(20261125), casbin_builder(tmp_path, engine_candidate),
                         policies=40, requests=100, max_rules=40, invalid=True)
    print(stats.report())
    assert stats.mismatches == [], stats.mismatches[:10]
    assert stats.invalid > 0, stats.report()
    stats.assert_exercised()


def test_example_policy_loads_and_agrees() -> None:
    policy = load_policy(ROOT / "policies" / "model.conf", ROOT / "policies" / "policy.csv")
    device = Device("sensor-001", "sensor", "plant-a", "telemetry", "ops-team", "active")
    for action, topic, allowed in [
        ("publish", "sites/plant-a/sensor-001/telemetry", True),
        ("publish", "sites/plant-a/sensor-002/telemetry", False),
        ("subscribe", "sites/plant-a/sensor-001/cmd", True),
        ("subscribe", "sites/plant-a/#", False),
    ]:
        ours = decide(policy.rules, device.attributes(), action, topic)
        assert ours.allowed is allowed
        assert ours == policy.reference.decide(device, action, topic)
