"""Errors in files people edit, located so that the message alone points at the fix."""

from __future__ import annotations


class SourceError(ValueError):
    """A problem at ``path:line`` of an input file; ``str()`` is the one-line message users see."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
