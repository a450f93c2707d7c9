"""An index of the broker's subscription filters, so a message is matched against the filters it can match.

amqtt 0.12.1 tests every published topic against every subscription filter;
with one filter per device that grows linearly with the fleet. This trie
answers the same question (MQTT semantics, as ``pdp.core.topics.matches``) by
walking only the branches the topic's levels select.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    filter: str | None = None  # the filter ending exactly here
    hash_filter: str | None = None  # '<path>/#' below this node


class FilterIndex:
    def __init__(self) -> None:
        self._root = _Node()
        self._filters: set[str] = set()

    def __len__(self) -> int:
        return len(self._filters)

    def __contains__(self, topic_filter: str) -> bool:
        return topic_filter in self._filters

    def add(self, topic_filter: str) -> None:
        if topic_filter in self._filters:
            return
        self._filters.add(topic_filter)
        levels = topic_filter.split("/")
        node = self._root
        for level in levels[:-1]:
            node = node.children.setdefault(level, _Node())
        if levels[-1] == "#":
            node.hash_filter = topic_filter
        else:
            node.children.setdefault(levels[-1], _Node()).filter = topic_filter

    def remove(self, topic_filter: str) -> None:
        if topic_filter not in self._filters:
            return
        self._filters.discard(topic_filter)
        levels = topic_filter.split("/")
        path = [self._root]
        for level in levels[:-1]:
            path.append(path[-1].children[level])
        if levels[-1] == "#":
            path[-1].hash_filter = None
        else:
            leaf = path[-1].children[levels[-1]]
            leaf.filter = None
            path.append(leaf)
        # prune empty branches
        for depth in range(len(path) - 1, 0, -1):
            node = path[depth]
            if node.children or node.filter is not None or node.hash_filter is not None:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def rebuild(self, filters: set[str] | list[str]) -> None:
        self._root = _Node()
        self._filters = set()
        for topic_filter in filters:
            self.add(topic_filter)

    def match(self, topic: str) -> list[str]:
        """Every indexed filter that selects the topic name."""
        out: list[str] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.hash_filter is not None and not (i == 0 and dollar):
                out.append(node.hash_filter)
            if i == len(levels):
                if node.filter is not None:
                    out.append(node.filter)
                continue
            child = node.children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if not (i == 0 and dollar):
                plus = node.children.get("+")
                if plus is not None and levels[i] != "+":
                    stack.append((plus, i + 1))
        return out
