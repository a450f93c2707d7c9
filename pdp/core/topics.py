"""MQTT topic names, filters and identity-bound patterns, with MQTT 3.1.1 semantics.

Pure functions only. Three relations matter for authorization:

* ``matches(filter, topic)``: the filter selects the topic name (``+`` is one
  level, ``#`` is the last level and also matches the parent, a filter whose
  first level is a wildcard never selects a ``$`` topic).
* ``covers(pattern, filter)``: every topic the filter can ever select is also
  selected by the pattern. Subscriptions are granted on this relation, so
  ``a/+`` never grants ``a/#``.
* ``overlaps(a, b)``: some valid topic name is selected by both. Subscriptions
  are refused on this relation, so a deny of ``a/secret/#`` also refuses the
  wider ``a/#``, ``+/secret`` and ``#``, which would otherwise deliver its topics.
* ``bind(pattern, attributes)``: substitutes ``{device_id}``, ``{type}``, ...
  with the requesting device's own attribute values, level by level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDERS: frozenset[str] = frozenset({"device_id", "type", "location", "purpose", "owner"})
MAX_TOPIC_BYTES = 65535
MAX_LEVEL_VALUE_LENGTH = 128

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")


class TopicError(ValueError):
    """A topic name, filter or pattern that MQTT (or we) do not accept."""


def level_value_problem(value: str) -> str | None:
    """Why ``value`` cannot stand as one topic level bound into a pattern, or None.

    Identity and attribute values are substituted into topic patterns; if one of
    them could contain a separator or a wildcard, a device could widen its own rights.
    """
    if not value:
        return "is empty"
    if len(value) > MAX_LEVEL_VALUE_LENGTH:
        return f"is longer than {MAX_LEVEL_VALUE_LENGTH} characters"
    for forbidden in ("/", "+", "#"):
        if forbidden in value:
            return f"contains {forbidden!r}"
    if _CONTROL_RE.search(value):
        return "contains a control character"
    if value.startswith("$"):
        return "starts with '$'"
    if value != value.strip():
        return "has leading or trailing whitespace"
    return None


def _check_common(text: str, what: str) -> None:
    if not isinstance(text, str) or text == "":
        raise TopicError(f"{what} is empty")
    if "\x00" in text:
        raise TopicError(f"{what} contains NUL")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")


def validate_topic(topic: str) -> None:
    """Raise TopicError unless ``topic`` is a valid topic name to publish to."""
    _check_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise TopicError(f"topic {topic!r} contains a wildcard")


def validate_filter(topic_filter: str) -> None:
    """Raise TopicError unless ``topic_filter`` is a valid subscription filter."""
    _check_common(topic_filter, "filter")
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise TopicError(f"filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise TopicError(f"filter {topic_filter!r}: '+' must be a whole level")


def validate_pattern(pattern: str) -> None:
    """Raise TopicError unless ``pattern`` is a valid filter whose placeholders are all known."""
    for name in _PLACEHOLDER_RE.findall(pattern):
        if name not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise TopicError(f"pattern {pattern!r}: unknown placeholder {{{name}}} (known: {known})")
    stripped = _PLACEHOLDER_RE.sub("x", pattern)
    if "{" in stripped or "}" in stripped:
        raise TopicError(f"pattern {pattern!r}: unbalanced '{{' or '}}'")
    validate_filter(pattern)


def has_placeholders(pattern: str) -> bool:
    return "{" in pattern


def bind(pattern: str, attributes: Mapping[str, str]) -> str | None:
    """The pattern with placeholders replaced by the device's values, or None if one cannot bind.

    A value that is missing or unsafe as a level makes the pattern bind to
    nothing, so a rule never matches more because of a bad attribute.
    """
    if "{" not in pattern:
        return pattern
    failed = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal failed
        value = attributes.get(match.group(1))
        if value is None or level_value_problem(value) is not None:
            failed = True
            return ""
        return value

    bound = _PLACEHOLDER_RE.sub(substitute, pattern)
    return None if failed else bound


def matches(topic_filter: str, topic: str) -> bool:
    """True when the (valid) filter selects the (valid) topic name."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


def covers(pattern: str, topic_filter: str) -> bool:
    """True when every topic ``topic_filter`` can select is also selected by ``pattern``.

    Both are valid filters. This is containment of the selected sets, not string matching.
    """
    p_levels = pattern.split("/")
    f_levels = topic_filter.split("/")
    # A pattern starting with a wildcard never selects '$' topics; a filter that
    # starts with a literal '$' level selects only '$' topics.
    if p_levels[0] in ("+", "#") and f_levels[0].startswith("$"):
        return False
    for index, p_level in enumerate(p_levels):
        if p_level == "#":
            return True
        if index >= len(f_levels):
            return False
        f_level = f_levels[index]
        if f_level == "#":
            # A leading '#' selects topics of one level or more (never none), as '+/#' does.
            return index == 0 and p_levels == ["+", "#"]
        if p_level == "+":
            continue
        if f_level != p_level:
            return False
    # A filter with more levels than a '#'-free pattern selects topics the pattern does not.
    return len(f_levels) == len(p_levels)


def overlaps(a: str, b: str) -> bool:
    """True when at least one valid topic name is selected by both (valid) filters ``a`` and ``b``.

    Symmetric. Exactly: there is a non-empty topic name without wildcards that
    ``matches(a, t)`` and ``matches(b, t)``. Level by level, two literals must be
    equal, ``+`` meets any single level, and ``#`` meets everything from its level
    on, including the parent (``a/#`` and ``a`` overlap on ``a``). A filter starting
    with a wildcard never meets one whose first level is a literal starting with
    ``$``. The empty topic is not a topic name, so ``+`` and ``/#`` do not overlap:
    the only topic both select is the single empty level.

    A subscribe deny applies on this relation: refusing only the filters a deny
    covers would let ``a/#`` through a deny of ``a/secret/#`` and deliver its topics.
    """
    a_levels = a.split("/")
    b_levels = b.split("/")
    a_first, b_first = a_levels[0], b_levels[0]
    if (a_first in ("+", "#") and b_first.startswith("$")) or (b_first in ("+", "#") and a_first.startswith("$")):
        return False
    for a_level, b_level in zip(a_levels, b_levels):
        if a_level == "#" or b_level == "#":
            # Both prefixes agree; the other side's remaining levels (a '+' as any level,
            # a '#' as none) make a topic of at least one more level, never the empty one.
            return True
        if a_level != b_level and a_level != "+" and b_level != "+":
            return False
    shorter = min(len(a_levels), len(b_levels))
    if len(a_levels) == len(b_levels):
        return True
    longer = a_levels if len(a_levels) > shorter else b_levels
    if longer[shorter] != "#":
        return False
    # The shorter filter ends where the longer has '#': they meet on the parent, a topic of
    # ``shorter`` levels; of one level that is empty ('+' against '/#') it is no topic name.
    return not (shorter == 1 and "" in (a_first, b_first))
