"""Repeated identical refusals become one record with a count, so a device retrying every second cannot
flood the log (or the disk) and still leaves evidence of every attempt.

The first refusal of a kind (same peer address, reason and certificate) is recorded at
once; identical ones within the next ``window`` seconds are only counted, and when the
window ends one record says how many there were, from when to when. Pure: the caller
passes the time and writes the records.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Window:
    payload: Any
    opened: float
    count: int = 0  # suppressed so far
    first: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class Repeats:
    payload: Any  # what the caller gave with the first refusal of the window
    count: int
    first: float
    last: float

    def note(self) -> str:
        return f"repeated {self.count} more time(s) from {self.first:.3f} to {self.last:.3f} (one record for all)"


class RefusalLimiter:
    def __init__(self, window: float = 60.0, max_keys: int = 10_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self._open: dict[Hashable, _Window] = {}

    def admit(self, key: Hashable, payload: Any, now: float) -> bool:
        """True: record this refusal now. False: it was counted into the open window of its kind."""
        window = self._open.get(key)
        if window is not None and now - window.opened < self.window:
            if not window.count:
                window.first = now
            window.count += 1
            window.last = now
            return False
        self._open[key] = _Window(payload, now)
        return True

    def due(self, now: float, everything: bool = False) -> list[Repeats]:
        """The windows that ended (all of them with ``everything``, at shutdown) and had repeats, to be recorded.

        More distinct kinds than ``max_keys`` close every window early: memory stays bounded, records still count.
        """
        closing = everything or len(self._open) > self.max_keys
        out: list[Repeats] = []
        for key in list(self._open):
            window = self._open[key]
            if closing or now - window.opened >= self.window:
                del self._open[key]
                if window.count:
                    out.append(Repeats(window.payload, window.count, window.first, window.last))
        return out
