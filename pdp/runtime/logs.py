"""How the broker's log reads: the level (changeable while running) and the line format (text or JSON lines).

amqtt's own messages (two connections gave 138 of them) sit below the operator's level: they are shown
only at debug level, where the whole story is wanted; at any other level only their warnings and errors.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY = ("amqtt", "transitions")  # libraries whose info lines are noise to an operator
# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per line, for a log shipper: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def set_level(level: str) -> str:
    """Put ``level`` in force for the whole process (also while it runs); returns the previous level."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    previous = logging.getLevelName(root.level).lower()
    value = getattr(logging, level.upper())
    root.setLevel(value)
    for name in CHATTY:
        logging.getLogger(name).setLevel(value if value <= logging.DEBUG else max(value, logging.WARNING))
    logging.getLogger("casbin").setLevel(max(value, logging.WARNING))
    return previous


def configure(level: str = "info", fmt: str = "text") -> None:
    """The CLI's logging: one handler on stderr in the chosen format, and ``level`` in force."""
    if fmt not in FORMATS:
        raise ValueError(f"log_format {fmt!r} is not one of {', '.join(FORMATS)}")
    logging.basicConfig(format=TEXT_FORMAT)
    set_level(level)
    use_format(fmt)


def use_format(fmt: str) -> None:
    """Switch every root handler to ``fmt`` (the broker config's ``log_format`` is read after logging starts)."""
    formatter: logging.Formatter = JsonLines() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


class PerKeyRateLimit:
    """At most ``burst`` log lines per key (a client id) per ``interval`` seconds; the lines held back are
    counted and the next line that goes out says how many. A flood of denials from one device is then a
    few lines per interval, not one per packet, and still says how big it was. Pure: the caller passes
    the clock."""

    def __init__(self, interval: float = 10.0, burst: int = 5, max_keys: int = 10_000) -> None:
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self._state: dict[str, list[float]] = {}  # key -> [window start, lines logged in it, lines held back]

    def admit(self, key: str, now: float) -> int | None:
        """None: hold this line back. Otherwise log it, with the returned count of lines held back before it."""
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self.max_keys:  # bounded: forget keys whose window has passed
                self._state = {k: v for k, v in self._state.items() if now - v[0] < self.interval}
                if len(self._state) >= self.max_keys:
                    return None
            state = self._state[key] = [now, 0, 0]
        elif now - state[0] >= self.interval:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return None
        held = int(state[2])
        state[1] += 1
        state[2] = 0
        return held
