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

Immutable once built; the broker swaps whole indexes on reload, and a new index shares the
unchanged buckets' tries with the one it replaces.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pdp.core.engine import Decision, Rule, decision_for
from pdp.core.layered import overlaying, releasing

NO_MATCH_DECISION = decision_for(False, None)

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One bucket's trie over its patterns, in rule order. The trie holds positions within the bucket
    (``patterns``); ``orders`` maps each to its rule's position in the policy. So a bucket whose patterns
    did not change keeps its trie across a reload even when rules before it moved."""

    root: _Node
    patterns: tuple[str, ...]
    orders: tuple[int, ...]


_STEP = 64  # rules or buckets handled between two yields of a build (about a tenth of a millisecond)


def _trie(patterns: Sequence[str]) -> Generator[None, None, _Node]:
    """A trie over ``patterns`` (the generator's return value), built in steps (see ``PolicyIndex.building``)."""
    root = _Node()
    for local, pattern in enumerate(patterns):
        node = root
        levels = pattern.split("/")
        for level in levels[:-1]:
            node = node.child(level)
        if levels[-1] == "#":
            node.hash_rules.append(local)
        else:
            node.child(levels[-1]).end_rules.append(local)
        if local % _STEP == _STEP - 1:
            yield None
    return root


def run_to_end(steps: Generator[None, None, T]) -> T:
    """A stepwise build run in one go: its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _bucket_keys(rule: Rule) -> tuple[tuple[str, str, str, str], ...]:
    """The buckets a rule is in: its action's, and for a subscribe deny also the overlap bucket."""
    key = (rule.action, rule.type, rule.location, rule.purpose)
    if rule.action == "subscribe" and rule.effect == "deny":
        return key, (_SUBSCRIBE_DENY, rule.type, rule.location, rule.purpose)
    return (key,)


class PolicyIndex:
    _rules: tuple[Rule, ...]
    _deny: tuple[bool, ...]
    _buckets: Mapping[tuple[str, str, str, str], _Bucket]  # a dict, or a layer over the previous index's
    _roots: dict[tuple[str, str, str, str], tuple[_Bucket, ...]]

    def __new__(cls, rules: Sequence[Rule], previous: PolicyIndex | None = None,
                replaced: tuple[int, int, int] | None = None) -> PolicyIndex:
        """Built in one go; ``building`` is the same in steps."""
        return run_to_end(PolicyIndex.building(rules, previous, replaced))

    @staticmethod
    def building(rules: Sequence[Rule], previous: PolicyIndex | None = None,
                 replaced: tuple[int, int, int] | None = None) -> Generator[None, None, PolicyIndex]:
        """The index (the generator's return value), built in steps of well under a millisecond each.

        The broker builds a reloaded policy's index on its event loop between messages, a step at a time:
        built in a worker thread, it held the interpreter lock against message delivery for the whole build.
        With ``previous`` (the index in force), a bucket whose patterns are unchanged keeps its trie, so a
        one-line edit rebuilds only the buckets it touches. ``replaced`` = (start, old end, new end) says
        that ``rules[start:new end]`` took the place of ``previous``'s ``[start:old end]`` and every other rule
        is unchanged (a loader's delta knows it): when no rule moved, only the buckets of the replaced rules
        are visited at all.
        """
        if previous is not None and replaced is not None and replaced[1] == replaced[2]:
            return (yield from PolicyIndex._patched(tuple(rules), previous, replaced[0], replaced[1]))
        groups: dict[tuple[str, str, str, str], tuple[list[str], list[int]]] = {}
        ordered = tuple(rules)
        deny: list[bool] = []
        for order, rule in enumerate(ordered):
            deny.append(rule.effect == "deny")
            for bucket_key in _bucket_keys(rule):
                group = groups.get(bucket_key)
                if group is None:
                    group = groups[bucket_key] = ([], [])
                group[0].append(rule.topic)
                group[1].append(order)
            if order % _STEP == _STEP - 1:
                yield None
        before = previous._buckets if previous is not None else {}
        buckets: dict[tuple[str, str, str, str], _Bucket] = {}
        for count, (key, (topics, orders)) in enumerate(groups.items()):
            if count % _STEP == _STEP - 1:
                yield None
            patterns = tuple(topics)
            old = before.get(key)
            if old is not None and old.patterns == patterns:
                # The same object when nothing moved: a reload then leaves no new long-lived objects behind
                # for the collector's next full pass over the heap.
                buckets[key] = old if old.orders == tuple(orders) else _Bucket(old.root, patterns, tuple(orders))
            else:
                buckets[key] = _Bucket((yield from _trie(patterns)), patterns, tuple(orders))
        index = object.__new__(PolicyIndex)
        index._rules = ordered
        index._deny = tuple(deny)
        index._buckets = buckets
        index._roots = {}
        return index

    @staticmethod
    def _patched(rules: tuple[Rule, ...], previous: PolicyIndex, start: int,
                 end: int) -> Generator[None, None, PolicyIndex]:
        """``previous`` with rules[start:end] replaced in place (positions unchanged): only their buckets change."""
        affected: dict[tuple[str, str, str, str], list[int]] = {}
        for rule in (*previous._rules[start:end], *rules[start:end]):
            for key in _bucket_keys(rule):
                affected.setdefault(key, [])
        for order in range(start, end):
            for key in _bucket_keys(rules[order]):
                affected[key].append(order)
        removed: list[tuple[str, str, str, str]] = []
        put: list[tuple[tuple[str, str, str, str], _Bucket]] = []
        for key, added in affected.items():
            old = previous._buckets.get(key)
            orders = sorted([order for order in old.orders if not start <= order < end] + added) if old else added
            if not orders:
                removed.append(key)
                continue
            patterns = tuple(rules[order].topic for order in orders)
            if old is not None and old.patterns == patterns:
                put.append((key, _Bucket(old.root, patterns, tuple(orders))))
            else:
                put.append((key, _Bucket((yield from _trie(patterns)), patterns, tuple(orders))))
            yield None
        deny = previous._deny
        index = object.__new__(PolicyIndex)
        index._rules = rules
        index._deny = (*deny[:start], *(rule.effect == "deny" for rule in rules[start:end]), *deny[end:])
        index._buckets = yield from overlaying(previous._buckets, removed, [put])
        index._roots = {}
        return index

    def __len__(self) -> int:
        return len(self._rules)

    def releasing(self, successor: PolicyIndex | None = None) -> Generator[None, None, None]:
        """Empty a replaced index in steps, yielding in between (see ``decision_point.releasing``); it then
        matches nothing. What ``successor`` shares with it (tries, a base of buckets) survives."""
        self._roots = {}
        yield from releasing(self._buckets, successor._buckets if successor is not None else None)
        self._buckets = {}

    def _roots_for(self, action: str, attrs: Mapping[str, str]) -> tuple[_Bucket, ...]:
        key = (action, attrs["type"], attrs["location"], attrs["purpose"])
        roots = self._roots.get(key)
        if roots is None:
            buckets = self._buckets
            roots = tuple(
                bucket
                for t in (key[1], "*")
                for loc in (key[2], "*")
                for p in (key[3], "*")
                if (bucket := buckets.get((action, t, loc, p))) is not None
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
                for bucket in deny_roots:
                    found: list[int] = []
                    _overlap(bucket.root, levels, 0, attributes, dollar, found)
                    denies.extend([bucket.orders[local] for local in found])
                if denies:
                    return decision_for(False, self._rules[min(denies)].rule_id)
        matched: list[int] = []
        roots = self._roots_for(action, attributes)
        if roots:
            levels = topic.split("/")
            dollar = topic.startswith("$")
            for bucket in roots:
                found = []
                _walk(bucket.root, levels, 0, attributes, dollar, subscribe, found)
                if found:
                    orders = bucket.orders
                    matched.extend([orders[local] for local in found])
        if not matched:
            return NO_MATCH_DECISION
        deny = self._deny
        denies = [order for order in matched if deny[order]]
        if denies:
            return decision_for(False, self._rules[min(denies)].rule_id)
        return decision_for(True, self._rules[min(matched)].rule_id)
