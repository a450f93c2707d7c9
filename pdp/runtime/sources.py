"""Reading the files policy authors edit so that only complete, consistent versions are ever applied.

An editor or ``cp`` writes a file in several steps; a read in between sees a valid
but shorter policy or registry. So a read counts only when two reads separated by
a settle interval give the same bytes and the files' identities (inode, size,
mtime) did not move meanwhile; otherwise the change is read again at the next poll.

Several files change together through ``write_together``: it announces the change
with a marker file beside each target, replaces each file by an atomic rename, and
removes the markers. A reader that sees a marker, or sees any file move while it
reads, waits for the next poll, so it never applies half of such a change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

APPLY_MARKER = ".mqtt-pdp-apply"
# A marker is honoured only within this many seconds of its time, on either side: an older one was left by a
# crashed writer, and one dated in the future (clock skew, a restored backup, touch -d) would otherwise hold
# every reload back for as long as its date lies ahead.
STALE_MARKER_SECONDS = 5.0
APPLY_LOCK = ".mqtt-pdp-apply.lock"  # held by one write_together at a time per directory (never removed)
LOCK_WAIT_SECONDS = 30.0

FileSignature = tuple[tuple[str, int, int, int], ...]


def signature(paths: Sequence[str]) -> FileSignature:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((path, -1, -1, -1))
    return tuple(out)


def change_in_progress(paths: Sequence[str], now: float | None = None) -> bool:
    """True while ``write_together`` is replacing files in the directory of any of ``paths``."""
    now = time.time() if now is None else now
    for directory in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        try:
            started = os.stat(os.path.join(directory, APPLY_MARKER)).st_mtime
        except OSError:
            continue
        if abs(now - started) < STALE_MARKER_SECONDS:
            return True
    return False


def _read_all(paths: Sequence[str]) -> dict[str, bytes | OSError]:
    out: dict[str, bytes | OSError] = {}
    for path in paths:
        try:
            out[path] = Path(path).read_bytes()
        except OSError as exc:
            out[path] = exc
    return out


def read_stable(paths: Sequence[str], settle: float) -> tuple[FileSignature, dict[str, bytes | OSError]] | None:
    """The files' contents when they hold still across ``settle`` seconds, else None (try again later).

    A missing or unreadable file is returned as its OSError, so that the caller can report it
    like any other problem with the file.
    """
    if change_in_progress(paths):
        return None
    before = signature(paths)
    first = _read_all(paths)
    time.sleep(settle)
    second = _read_all(paths)
    after = signature(paths)
    if before != after or change_in_progress(paths):
        return None
    for path in paths:
        a, b = first[path], second[path]
        if isinstance(a, OSError) != isinstance(b, OSError) or (not isinstance(a, OSError) and a != b):
            return None
    return after, second


def write_together(contents: Mapping[str, bytes], pause_between_renames: float = 0.0) -> None:
    """Replace several files so that a reader using ``read_stable`` sees all old or all new.

    Each file is written to a temporary file in its own directory, flushed to disk, and renamed
    over the target while the markers announce the change. ``pause_between_renames`` widens the
    window between two renames (a slow disk), so tests can show that readers wait for all of them.
    """
    directories = sorted({os.path.dirname(os.path.abspath(p)) for p in contents})
    with _locked(directories):
        _write_together(contents, directories, pause_between_renames)


@contextlib.contextmanager
def _locked(directories: Sequence[str]) -> Iterator[None]:
    """One ``write_together`` at a time per directory: two run at once could leave a pair nobody wrote
    (the policy of one and the registry of the other). Locks are taken in sorted order (no deadlock)."""
    with contextlib.ExitStack() as stack:
        for directory in directories:
            handle = stack.enter_context(open(os.path.join(directory, APPLY_LOCK), "a+b"))
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OSError(f"another change to the files in {directory} has been in progress for "
                                      f"{LOCK_WAIT_SECONDS:g} s (lock {APPLY_LOCK}); try again") from None
                    time.sleep(0.05)
        yield


def _write_together(contents: Mapping[str, bytes], directories: list[str], pause_between_renames: float) -> None:
    staged: list[tuple[str, str]] = []
    try:
        for target, data in contents.items():
            fd, tmp = tempfile.mkstemp(prefix=".mqtt-pdp-", dir=os.path.dirname(os.path.abspath(target)))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if os.path.exists(target):
                os.chmod(tmp, os.stat(target).st_mode & 0o7777)
            staged.append((tmp, target))
        markers = [os.path.join(d, APPLY_MARKER) for d in directories]
        for marker in markers:
            Path(marker).write_text(f"{os.getpid()}\n")
        try:
            for number, (tmp, target) in enumerate(staged):
                if number and pause_between_renames:
                    time.sleep(pause_between_renames)
                os.replace(tmp, target)
            staged = []
            for directory in directories:
                _fsync_directory(directory)
        finally:
            for marker in markers:
                Path(marker).unlink(missing_ok=True)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
