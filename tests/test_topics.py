"""MQTT topic semantics, proved against paho-mqtt's topic_matches_sub and by exhaustive containment checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from pdp.core.topics import (
    TopicError,
    bind,
    covers,
    level_value_problem,
    matches,
    overlaps,
    validate_filter,
    validate_pattern,
    validate_topic,
)

LITERALS = ["a", "b", "", "$SYS", "$x"]

literal_level = st.sampled_from(LITERALS)
topic_names = st.lists(literal_level, min_size=1, max_size=4).map("/".join)


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(literal_level, st.just("+")), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=3000, deadline=None)
@given(filters(), topic_names)
def test_matches_agrees_with_paho(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic) == topic_matches_sub(topic_filter, topic)


def _universe(*texts: str) -> list[str]:
    """Every topic that can separate two filters built from these texts: their literals plus fresh ones."""
    levels = {level for text in texts for level in text.split("/") if level not in ("+", "#")}
    levels |= {"fresh", ""}
    depth = max(len(text.split("/")) for text in texts) + 1
    alphabet = sorted(levels | {"$fresh"})
    topics = []
    for n in range(1, depth + 1):
        for combo in itertools.product(alphabet, repeat=n):
            if "$fresh" in combo[1:]:
                continue  # a fresh '$' level only behaves differently in the first level
            topics.append("/".join(combo))
    return topics


@settings(max_examples=1500, deadline=None)
@given(filters(), filters())
def test_covers_is_exactly_set_containment(pattern: str, topic_filter: str) -> None:
    universe = _universe(pattern, topic_filter)
    contained = all(topic_matches_sub(pattern, t) for t in universe if topic_matches_sub(topic_filter, t))
    assert covers(pattern, topic_filter) == contained


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        ("a/+", "a/#", False),
        ("a/#", "a/+/c", True),
        ("a/#", "a", True),
        ("a/+", "a", False),
        ("#", "$SYS/#", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("#", "+/x", True),
        ("#", "#", True),
        ("a/+/#", "a/#", False),
        ("+/#", "a/#", True),
        ("+/+/#", "/#", False),  # '/#' selects the empty level by the parent rule; coverage counts it
    ],
)
def test_covers_examples(pattern: str, topic_filter: str, expected: bool) -> None:
    assert covers(pattern, topic_filter) is expected


def common_topics(a: str, b: str) -> list[str]:
    """Every topic name of a finite universe that both filters select (paho as the matcher).

    The universe: topics of 1 to max(levels of a, levels of b) levels over both filters'
    literal levels, 'fresh', the empty level and, first only, '$fresh'. It is complete for
    overlap: a common topic stays common when each level that is no literal of either filter
    becomes 'fresh' (at the first level '$fresh' if it started with '$'), and when it is cut
    to the longer filter's length (a common topic longer than both means both end in '#',
    whose prefixes the cut keeps).
    """
    levels = {level for text in (a, b) for level in text.split("/") if level not in ("+", "#")} | {"fresh", ""}
    depth = max(len(a.split("/")), len(b.split("/")))
    found = []
    for n in range(1, depth + 1):
        for first in sorted(levels | {"$fresh"}):
            for rest in itertools.product(sorted(levels), repeat=n - 1):
                topic = "/".join((first, *rest))
                if topic and topic_matches_sub(a, topic) and topic_matches_sub(b, topic):
                    found.append(topic)
    return found


@settings(max_examples=1500, deadline=None)
@given(filters(), filters())
def test_overlaps_is_exactly_a_common_topic(a: str, b: str) -> None:
    assume(a != "" and b != "")  # '' is not a filter
    assert overlaps(a, b) == bool(common_topics(a, b))


@settings(max_examples=1000, deadline=None)
@given(filters(), filters())
def test_overlaps_is_symmetric_and_weaker_than_covers(a: str, b: str) -> None:
    assume(a != "" and b != "")
    assert overlaps(a, b) == overlaps(b, a)
    if covers(a, b):
        assert overlaps(a, b)  # every valid filter selects some topic name
    if matches(a, b) and "+" not in b and "#" not in b:
        assert overlaps(a, b)  # a filter meets every topic name it selects


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # The issue: a deny of 'a/secret/#' must meet every filter that could deliver its topics.
        ("a/secret/#", "a/#", True),
        ("a/secret/#", "+/secret", True),
        ("a/secret/#", "#", True),
        ("a/secret/#", "a/+/x", True),
        ("a/secret/#", "a/secret", True),  # '#' selects the parent
        ("a/secret/#", "a/public/#", False),
        ("a/secret/#", "a/+", True),
        ("a/secret/#", "a", False),
        ("a/secret", "a/secret/+", False),
        ("a/+", "+/b", True),
        ("a/+", "a/b/c", False),
        ("a//b", "a/+/b", True),
        ("a//b", "a/b", False),
        # '$' topics: a wildcard first level never meets a literal '$' first level.
        ("#", "$SYS/#", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/+/x", True),
        ("$SYS/#", "$x/#", False),
        ("x/$SYS", "x/+", True),
        # The empty topic is no topic name: '+' and '/#' share only it.
        ("+", "/#", False),
        ("#", "/#", True),
        ("+/#", "/#", True),
        ("+", "/", False),
        ("+/+", "/", True),
    ],
)
def test_overlaps_examples(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected
    assert bool(common_topics(a, b)) is expected


def test_bind_is_level_by_level_and_refuses_unsafe_values() -> None:
    attrs = {"device_id": "s-1", "location": "plant-a", "type": "sensor", "purpose": "p", "owner": "o"}
    assert bind("sites/{location}/{device_id}/#", attrs) == "sites/plant-a/s-1/#"
    assert bind("x/{type}-{purpose}", attrs) == "x/sensor-p"
    for unsafe in ("a/b", "+", "#", "$x", "", "a\x00b"):
        assert bind("sites/{device_id}", {**attrs, "device_id": unsafe}) is None
    assert bind("sites/{owner}", {"device_id": "x"}) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [("a/b", "contains '/'"), ("a+", "contains '+'"), ("#", "contains '#'"), ("\x00", "contains a control character"),
     ("$x", "starts with '$'"), ("", "is empty"), ("x" * 129, "is longer than 128 characters"),
     (" a", "has leading or trailing whitespace"), ("a\n", "contains a control character")],
)
def test_level_value_problem_rejects_injection(value: str, problem: str) -> None:
    assert level_value_problem(value) == problem


@pytest.mark.parametrize("value", ["sensor-001", "plant-a", "a.b_c:d", "x" * 128, "a$"])
def test_level_value_problem_accepts_safe_values(value: str) -> None:
    assert level_value_problem(value) is None


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "a\x00"])
def test_invalid_filters(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\x00"])
def test_invalid_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(bad)


@pytest.mark.parametrize("bad", ["a/{serial}", "a/{device_id", "a/}x", "a/{}"])
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_pattern(bad)
