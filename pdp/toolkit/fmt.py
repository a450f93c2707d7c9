"""``mqtt-pdp fmt``: one spelling for the rule file, so reviews show changes of meaning, not of spacing.

Each rule is written ``p, id, type, ...`` with its fields aligned in columns across the file;
comments and blank lines stay where they are (trailing whitespace removed, runs of blank lines
kept). Only files that load are formatted, and the caller checks that the formatted text loads
to the very same rules on the same lines.
"""

from __future__ import annotations


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def format_policy(text: str) -> str:
    lines = text.splitlines()
    rows = [[field.strip() for field in line.split(",")] for line in lines if _is_rule(line)]
    columns = max((len(row) for row in rows), default=0)
    widths = [max((len(row[i]) + 1 for row in rows if i < len(row) - 1), default=0) for i in range(columns)]
    out: list[str] = []
    for line in lines:
        if not _is_rule(line):
            out.append(line.rstrip())
            continue
        row = [field.strip() for field in line.split(",")]
        cells = [(field + ",").ljust(widths[i]) for i, field in enumerate(row[:-1])] + [row[-1]]
        out.append(" ".join(cells).rstrip())
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"
