"""The compiled index returns the same decision and deciding rule as the linear engine and as Casbin.

Casbin's topic matching is the specification-derived oracle (``pdp.policy.oracle``), so the
second differential checks the index's topic semantics as well as rule order and effects.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pdp.core.engine import Rule, decide
from pdp.core.index import PolicyIndex
from pdp.core.topics import bind, overlaps
from pdp.policy.load import parse_rules
from tests.test_engine_vs_casbin import Decider, casbin_builder, differential, pdp_decide
from tests.test_topics import filters

ATTRS = {"device_id": "a", "type": "t", "location": "l", "purpose": "p", "owner": "o"}


def index_candidate(rules: Sequence[Rule]) -> Decider:
    index = PolicyIndex(rules)
    return lambda device, action, topic: pdp_decide(
        lambda a, t: index.decide(device.attrs, a, t), action, topic)


def _index_and_engine(text: str) -> tuple[Sequence[Rule], Decider, Decider]:
    rules = parse_rules(text, "p.csv")
    return rules, index_candidate(rules), lambda device, action, topic: decide(rules, device.attrs, action, topic)


def test_index_equals_engine_on_many_random_policies() -> None:
    """Pure and fast: 200 random policies x 500 requests."""
    stats = differential(random.Random(1), _index_and_engine, policies=200, requests=500, max_rules=60)
    print(stats.report())
    assert stats.mismatches == [], stats.mismatches[:10]
    stats.assert_exercised()


def test_index_equals_casbin_on_twenty_thousand_requests(tmp_path: Path) -> None:
    stats = differential(random.Random(2), casbin_builder(tmp_path, index_candidate),
                         policies=100, requests=200, max_rules=25, invalid=True)
    print(stats.report())
    assert stats.mismatches == [], stats.mismatches[:10]
    assert stats.invalid > 0, stats.report()
    stats.assert_exercised()


@st.composite
def deny_patterns(draw: st.DrawFn) -> str:
    """Filters whose 'a' levels may be written as placeholders binding to 'a' (whole or inside a level)."""
    levels = draw(filters()).split("/")
    return "/".join(draw(st.sampled_from([level, "{device_id}"])) if level == "a" else level for level in levels)


@settings(max_examples=2000, deadline=None)
@given(deny_patterns(), filters())
def test_index_subscribe_deny_is_exactly_overlap(pattern: str, topic_filter: str) -> None:
    """With one subscribe deny and an allow of everything, the index refuses exactly the overlapping filters."""
    assume(pattern != "" and topic_filter != "")
    rules = [Rule("no", "*", "*", "*", pattern, "subscribe", "deny"), Rule("yes", "*", "*", "*", "#", "subscribe", "allow"),
             Rule("yes-dollar", "*", "*", "*", "$SYS/#", "subscribe", "allow"),
             Rule("yes-x", "*", "*", "*", "$x/#", "subscribe", "allow")]
    decision = PolicyIndex(rules).decide(ATTRS, "subscribe", topic_filter)
    bound = bind(pattern, ATTRS)
    assert bound is not None
    assert (decision.rule_id == "no") is overlaps(bound, topic_filter)
    assert decision == decide(rules, ATTRS, "subscribe", topic_filter)


def _earlier_version(rng: random.Random, rules: Sequence[Rule]) -> list[Rule]:
    """What the policy might have been before an edit: rules dropped, added, flipped or moved."""
    earlier = list(rules)
    for _ in range(rng.randint(0, 3)):
        choice = rng.random()
        if earlier and choice < 0.3:
            del earlier[rng.randrange(len(earlier))]
        elif earlier and choice < 0.6:
            i = rng.randrange(len(earlier))
            rule = earlier[i]
            earlier[i] = Rule(rule.rule_id, rule.type, rule.location, rule.purpose, rule.topic, rule.action,
                              "allow" if rule.effect == "deny" else "deny", rule.line)
        elif earlier and choice < 0.8:
            earlier.insert(rng.randrange(len(earlier) + 1), earlier.pop(rng.randrange(len(earlier))))
        else:
            earlier.insert(rng.randrange(len(earlier) + 1), Rule(f"old{rng.randrange(99)}", "*", "*", "*",
                                                                 rng.choice(["a/#", "+/b", "#"]), "publish", "allow"))
    return earlier


def _differential_against_engine(seed: int, make: Callable[[random.Random, list[Rule]], PolicyIndex]) -> None:
    """Random policies; ``make`` builds each one's index (however a reload would); it must decide as the engine."""
    rng = random.Random(seed)

    def build(text: str) -> tuple[Sequence[Rule], Decider, Decider]:
        rules = parse_rules(text, "p.csv")
        index = make(rng, rules)
        candidate: Decider = lambda device, action, topic: pdp_decide(
            lambda a, t: index.decide(device.attrs, a, t), action, topic)
        return rules, candidate, lambda device, action, topic: decide(rules, device.attrs, action, topic)

    stats = differential(rng, build, policies=300, requests=300, max_rules=40)
    assert stats.mismatches == [], stats.mismatches[:10]
    stats.assert_exercised()


def test_index_built_from_a_previous_version_equals_engine() -> None:
    """A reload builds the new index reusing the tries of unchanged buckets; it must decide as a fresh one."""
    shared = 0

    def make(rng: random.Random, rules: list[Rule]) -> PolicyIndex:
        nonlocal shared
        previous = PolicyIndex(_earlier_version(rng, rules))
        index = PolicyIndex(rules, previous)
        shared += sum(bucket.root is previous._buckets[key].root for key, bucket in index._buckets.items()
                      if key in previous._buckets)
        return index

    _differential_against_engine(3, make)
    assert shared > 100  # the reuse path was taken, not only fresh builds


def test_stepwise_build_yields_and_equals_one_go() -> None:
    rules = [Rule(f"r{i}", "*", "*", "*", f"a/{i}/#", "publish", "allow" if i % 3 else "deny", i)
             for i in range(2000)]
    steps = PolicyIndex.building(rules)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as done:
            index = done.value
            break
    assert yields >= 2000 // 256
    for i in range(0, 2000, 97):
        assert index.decide(ATTRS, "publish", f"a/{i}/x") == PolicyIndex(rules).decide(ATTRS, "publish", f"a/{i}/x")


def test_index_patched_in_place_equals_engine() -> None:
    """A loader's delta that replaces rules without moving any: only their buckets are rebuilt."""
    patched = 0

    def make(rng: random.Random, rules: list[Rule]) -> PolicyIndex:
        nonlocal patched
        earlier = list(rules)
        start = rng.randrange(len(rules))
        end = min(len(rules), start + rng.randint(1, 3))
        for i in range(start, end):  # what these lines said before the edit
            rule = rules[i]
            earlier[i] = Rule(rule.rule_id, rng.choice([rule.type, "*"]), rule.location, rule.purpose,
                              rng.choice([rule.topic, "a/#", "+/b"]), rng.choice(["publish", "subscribe"]),
                              rng.choice(["allow", "deny"]), rule.line)
        previous = PolicyIndex(earlier)
        index = PolicyIndex(rules, previous, (start, end, end))
        patched += any(bucket is not previous._buckets.get(key) for key, bucket in index._buckets.items())
        return index

    _differential_against_engine(4, make)
    assert patched > 100  # most edits changed some bucket (the rest left the rules as they were)
