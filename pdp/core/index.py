"""The compiled policy: the same decisions as ``pdp.core.engine.decide``, in microseconds at any policy size.

Rules are bucketed by action and by their (type, location, purpose) selectors;
each bucket is a topic trie whose edges are literal levels, ``+``, ``#`` or
template levels holding placeholders, bound to the device while walking. A
request visits at most the eight buckets its device can select and only the
trie paths its topic can follow, so the cost does not grow with unrelated rules.

A subscribe deny applies when its pattern *overlaps* the filter
(``pdp.core.topics.overlaps``), an allow when it covers it. For a filter without
wildcards the two relations and plain matching coincide (it selects exactly one
topic name), so such a subscribe walks the same tries as before. A filter with
``+`` or ``#`` first walks tries holding only the subscribe denies, for overlap:
a filter ``+`` meets every pattern level, a filter ``#`` the whole subtree below;
an applicable deny decides at once, otherwise the usual walk finds the allows.

Immutable once built; the broker swaps whole indexes on reload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdp.core.engine import Decision, Rule, decision_for

NO_MATCH_DECISION = decision_for(False, None)

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


@dataclass(slots=True)
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    templates: list[tuple[tuple[str, ...], _Node]] = field(default_factory=list)
    plus: _Node | None = None
    hash_rules: list[int] = field(default_factory=list)  # patterns ending in '#' right below this node
    end_rules: list[int] = field(default_factory=list)  # patterns ending at this node

    def child(self, level: str) -> _Node:
        if level == "+":
            if self.plus is None:
                self.plus = _Node()
            return self.plus
        if "{" in level:
            parts = tuple(_PLACEHOLDER_RE.split(level))  # literal, name, literal, name, ..., literal
            for existing, node in self.templates:
                if existing == parts:
                    return node
            node = _Node()
            self.templates.append((parts, node))
            return node
        node = self.literal.get(level)
        if node is None:
            node = self.literal[level] = _Node()
        return node


_SUBSCRIBE_DENY = "subscribe deny"  # the bucket kind of subscribe denies; other kinds are the action


def _bind(parts: tuple[str, ...], attributes: Mapping[str, str]) -> str:
    return "".join(attributes[p] if i % 2 else p for i, p in enumerate(parts))


def _walk(node: _Node, levels: list[str], i: int, attrs: Mapping[str, str], dollar: bool, subscribe: bool,
          out: list[int]) -> None:
    """Collect the rules whose bound pattern matches the topic name (publish, receive) or covers the
    filter (subscribe, see ``pdp.core.topics.covers``); only the branches the request's levels select are visited."""
    if node.hash_rules and not (i == 0 and dollar):
        out.extend(node.hash_rules)
    if i == len(levels):
        out.extend(node.end_rules)
        return
    level = levels[i]
    if subscribe and level == "#":
        # Only a '#' at this depth covers it (added above); a leading '#' selects one level or more, as '+/#'.
        if i == 0 and node.plus is not None:
            out.extend(node.plus.hash_rules)
        return
    if subscribe and level == "+":
        if node.plus is not None:
            _walk(node.plus, levels, i + 1, attrs, dollar, subscribe, out)
        return
    child = node.literal.get(level)
    if child is not None:
        _walk(child, levels, i + 1, attrs, dollar, subscribe, out)
    for parts, template_child in node.templates:
        if _bind(parts, attrs) == level:
            _walk(template_child, levels, i + 1, attrs, dollar, subscribe, out)
    if node.plus is not None and not (i == 0 and dollar):
        _walk(node.plus, levels, i + 1, attrs, dollar, subscribe, out)


def _subtree(node: _Node, out: list[int]) -> None:
    """Every rule at or below ``node``: a filter '#' selects some topic of each of them (placeholder
    values are safe levels, checked by the registry, so every template level binds to some level)."""
    out.extend(node.hash_rules)
    out.extend(node.end_rules)
    for child in node.literal.values():
        _subtree(child, out)
    for _, child in node.templates:
        _subtree(child, out)
    if node.plus is not None:
        _subtree(node.plus, out)


def _overlap(node: _Node, levels: list[str], i: int, attrs: Mapping[str, str], dollar: bool, out: list[int]) -> None:
    """Collect the rules whose bound pattern overlaps the filter (``pdp.core.topics.overlaps``).

    A filter literal follows the same edges as a topic name; a filter ``+`` follows every edge
    (a pattern literal or bound template is one level it can take); a filter ``#`` takes the parent
    and the whole subtree. At the first level, a filter starting with a wildcard never meets a
    pattern whose first level starts with '$', and a filter starting with '$' never meets a wildcard.
    The empty topic is no topic name: the filter '+' and the pattern '/#' (or the filter '/#' and
    the pattern '+') only share it, so they do not overlap.
    """
    if node.hash_rules and not (i == 0 and dollar):
        out.extend(node.hash_rules)
    if i == len(levels):
        out.extend(node.end_rules)
        return
    level = levels[i]
    if level == "#":
        if not (i == 1 and levels[0] == ""):
            out.extend(node.end_rules)  # the parent: 'a/#' selects 'a'
        for key, child in node.literal.items():
            if not (i == 0 and key.startswith("$")):
                _subtree(child, out)
        for parts, child in node.templates:
            if not (i == 0 and _bind(parts, attrs).startswith("$")):
                _subtree(child, out)
        if node.plus is not None:
            _subtree(node.plus, out)
        return
    if level == "+":
        last = i + 1 == len(levels)
        for key, child in node.literal.items():
            if not (i == 0 and (key.startswith("$") or (last and key == ""))):
                _overlap(child, levels, i + 1, attrs, dollar, out)
        for parts, child in node.templates:
            if not (i == 0 and _bind(parts, attrs).startswith("$")):
                _overlap(child, levels, i + 1, attrs, dollar, out)
        if node.plus is not None:
            _overlap(node.plus, levels, i + 1, attrs, dollar, out)
        return
    child = node.literal.get(level)
    if child is not None:
        _overlap(child, levels, i + 1, attrs, dollar, out)
    for parts, template_child in node.templates:
        if _bind(parts, attrs) == level:
            _overlap(template_child, levels, i + 1, attrs, dollar, out)
    if node.plus is not None and not (i == 0 and dollar):
        _overlap(node.plus, levels, i + 1, attrs, dollar, out)


class PolicyIndex:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = tuple(rules)
        self._deny = tuple(rule.effect == "deny" for rule in self._rules)
        self._buckets: dict[tuple[str, str, str, str], _Node] = {}
        for order, rule in enumerate(self._rules):
            self._insert((rule.action, rule.type, rule.location, rule.purpose), rule.topic, order)
            if rule.action == "subscribe" and rule.effect == "deny":
                self._insert((_SUBSCRIBE_DENY, rule.type, rule.location, rule.purpose), rule.topic, order)
        self._roots: dict[tuple[str, str, str, str], tuple[_Node, ...]] = {}

    def _insert(self, key: tuple[str, str, str, str], pattern: str, order: int) -> None:
        node = self._buckets.get(key)
        if node is None:
            node = self._buckets[key] = _Node()
        levels = pattern.split("/")
        for level in levels[:-1]:
            node = node.child(level)
        if levels[-1] == "#":
            node.hash_rules.append(order)
        else:
            node.child(levels[-1]).end_rules.append(order)

    def __len__(self) -> int:
        return len(self._rules)

    def release(self) -> None:
        """Empty a replaced index one bucket at a time (see ``decision_point.release``); it then matches nothing."""
        self._roots = {}
        buckets = self._buckets
        while buckets:
            buckets.popitem()

    def _roots_for(self, action: str, attrs: Mapping[str, str]) -> tuple[_Node, ...]:
        key = (action, attrs["type"], attrs["location"], attrs["purpose"])
        roots = self._roots.get(key)
        if roots is None:
            buckets = self._buckets
            roots = tuple(
                node
                for t in (key[1], "*")
                for loc in (key[2], "*")
                for p in (key[3], "*")
                if (node := buckets.get((action, t, loc, p))) is not None
            )
            self._roots[key] = roots  # a memo of a pure function; safe to race on
        return roots

    def decide(self, attributes: Mapping[str, str], action: str, topic: str) -> Decision:
        subscribe = action == "subscribe"
        if subscribe and ("+" in topic or "#" in topic):
            # Subscribe denies by overlap first; none overlapping means none covers the filter,
            # so the walk below then finds only allows.
            deny_roots = self._roots_for(_SUBSCRIBE_DENY, attributes)
            if deny_roots:
                denies: list[int] = []
                levels = topic.split("/")
                dollar = topic.startswith("$")
                for root in deny_roots:
                    _overlap(root, levels, 0, attributes, dollar, denies)
                if denies:
                    return decision_for(False, self._rules[min(denies)].rule_id)
        matched: list[int] = []
        roots = self._roots_for(action, attributes)
        if roots:
            levels = topic.split("/")
            dollar = topic.startswith("$")
            for root in roots:
                _walk(root, levels, 0, attributes, dollar, subscribe, matched)
        if not matched:
            return NO_MATCH_DECISION
        deny = self._deny
        denies = [order for order in matched if deny[order]]
        if denies:
            return decision_for(False, self._rules[min(denies)].rule_id)
        return decision_for(True, self._rules[min(matched)].rule_id)
