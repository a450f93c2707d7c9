"""Text from devices made safe for people and tools: terminals, log files, spreadsheets.

Client ids, topics and refusal reasons come from devices; a device that can put a
newline or an escape sequence in them can forge rows of a table or lines of the
broker's log, and a value starting with ``=`` runs as a formula in a spreadsheet.
Everything a human or a SIEM reads goes through these functions; the database and
JSON keep the exact values (JSON escapes control characters itself).
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\\]")
CUT_MARKER = "…"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"  # so that an escaped form can never be mistaken for a literal one
    code = ord(char)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape(text: str) -> str:
    """Control characters, newlines and bidi overrides as visible escapes (``\\n``, ``\\x1b``); backslash doubled."""
    return _CONTROL.sub(_escape, text)


def cut(text: str, limit: int) -> str:
    """At most ``limit`` characters; a cut text ends with the marker, so it is never taken for the whole value."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(CUT_MARKER))] + CUT_MARKER


def safe_text(value: object, limit: int | None = None) -> str:
    """For human formats (tables, stats, messages): escaped, then cut to ``limit`` with a marker."""
    text = escape(str(value))
    return cut(text, limit) if limit is not None else text


def safe(value: object, limit: int = 512) -> str:
    """For the broker's log lines: one line per event whatever a device sends, and bounded in length."""
    if value is None:
        return "None"
    return safe_text(value, limit)


def field(value: object, limit: int = 512) -> str:
    """A device's value (client id, device id, topic) as one ``key=value`` field of a log line.

    ``safe``, then quoted (inner quotes escaped) when it is empty or holds a space, '=' or '"': otherwise a
    client id ``x device=valve-001 peer=10.9.9.9:1`` read as fields of its own to any key=value parser.
    """
    text = safe(value, limit)
    if text and not any(ch in text for ch in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A spreadsheet must not run a device's topic as a formula: such a cell gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
