"""Rows as a table for people, JSON for tools and CSV for spreadsheets, with device text made safe in each."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import Any, TextIO

from pdp.evidence.text import csv_cell, cut, safe_text

FORMATS = ("table", "json", "csv")
TABLE_WIDTH = 64


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value) or "-"
    return safe_text(value)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, out: TextIO) -> None:
    """``rows`` as ``fmt``. JSON is one array of objects (every key, exact values); table and CSV show ``columns``."""
    if fmt == "json":
        out.write(json.dumps(list(rows), indent=2, default=str) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(_text(row.get(c)) if isinstance(row.get(c), (list, tuple)) else
                                      ("" if row.get(c) is None else row.get(c))) for c in columns])
    else:
        cells = [[_text(row.get(c)) for c in columns] for row in rows]
        widths = [min(TABLE_WIDTH, max([len(c)] + [len(r[i]) for r in cells])) for i, c in enumerate(columns)]
        out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        for r in cells:
            out.write("  ".join(cut(v, w).ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
    out.flush()
