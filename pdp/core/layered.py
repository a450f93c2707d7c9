"""A mapping as an earlier version of itself with a few changes laid over it.

A reload changes a handful of the 100,000 devices or of the 8,000 index buckets. Copying the whole
dictionary to change them holds the interpreter for one to ten milliseconds (more at each resize), and
the broker's event loop waits; laying the changes over the version in force costs nothing, and a lookup
is two dictionary probes. The layer is folded into a new base, in steps, once it grows past an eighth
of the base.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
FOLD_FRACTION = 8  # fold once changes and removals exceed 1/8 of the base
_STEP = 256  # entries copied or dropped between two yields (a few hundredths of a millisecond)


class Layered(Mapping[K, V], Generic[K, V]):
    __slots__ = ("base", "changes", "removed", "_len")

    def __init__(self, base: Mapping[K, V], changes: dict[K, V], removed: frozenset[K]) -> None:
        self.base, self.changes, self.removed = base, changes, removed
        self._len = len(base) - len(removed) + sum(1 for key in changes if key not in base)

    def get(self, key: K, default: Any = None) -> Any:
        found = self.changes.get(key)
        if found is not None:
            return found
        if key in self.removed:
            return default
        return self.base.get(key, default)

    def __getitem__(self, key: K) -> V:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        for key in self.base:
            if key not in self.removed and key not in self.changes:
                yield key
        yield from self.changes

    def __len__(self) -> int:
        return self._len


def overlaying(now: Mapping[K, V], removed: Iterable[K],
               put: Iterable[Iterable[tuple[K, V]]]) -> Generator[None, None, Mapping[K, V]]:
    """``now`` without ``removed`` and with ``put`` (taken a batch at a time, yielding after each), as a
    layer over ``now``'s base; folded into a plain dictionary, in steps, when the layer has grown large.
    Values are never None (None means absent)."""
    base: Mapping[K, V] = now.base if isinstance(now, Layered) else now
    changes: dict[K, V] = dict(now.changes) if isinstance(now, Layered) else {}
    gone: set[K] = set(now.removed) if isinstance(now, Layered) else set()
    for key in removed:
        changes.pop(key, None)
        if key in base:
            gone.add(key)
    for batch in put:
        for key, value in batch:
            changes[key] = value
            gone.discard(key)
        yield None
    layered: Layered[K, V] = Layered(base, changes, frozenset(gone))
    if len(changes) + len(gone) > len(base) // FOLD_FRACTION:
        return (yield from folding(layered))
    return layered


def folding(mapping: Mapping[K, V]) -> Generator[None, None, dict[K, V]]:
    """A plain dictionary of ``mapping``, copied in steps."""
    out: dict[K, V] = {}
    entries = iter(mapping.items())
    while True:
        step = dict(islice(entries, _STEP))
        if not step:
            return out
        out.update(step)
        yield None


def releasing(mapping: Mapping[Any, Any], successor: Mapping[Any, Any] | None) -> Generator[None, None, None]:
    """Empty the dictionaries behind a replaced ``mapping`` in steps, yielding in between, except those its
    ``successor`` still uses (a layer's base is shared with the layers over it).

    Dropped at once, 100,000 entries are one C-level cascade of deallocations that holds the interpreter.
    """
    shared = {id(successor), id(getattr(successor, "base", None))} if successor is not None else set()
    tables = [mapping.changes, mapping.base] if isinstance(mapping, Layered) else [mapping]
    for table in tables:
        if isinstance(table, dict) and id(table) not in shared:
            while table:
                for _ in range(min(_STEP, len(table))):
                    table.popitem()
                yield None
