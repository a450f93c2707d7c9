"""An evidence copy on read-only media (a read-only mount, as a security team keeps one) is read whole:
SQLite cannot create the ``-shm`` file a WAL database needs there, and ``log verify`` and ``log query``
said the copy was "not an assertion database". Needs a mount (root); skipped where mounting is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_evidence_pending import SESSIONS, hostile_rows, writer_for
from tests.test_log_cli import ROOT, cli, query


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "evidence"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def digests(where: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(where.iterdir())}


def store(tmp_path: Path, pending: int) -> tuple[Path, object]:
    """30 records indexed, then ``pending`` batches of 5 stored whole; the writer is left open."""
    db = tmp_path / "live" / "a.db"
    db.parent.mkdir(parents=True)
    writer = writer_for(tmp_path / "live", db, 1_000_000)
    base = time.time() - 100
    for n in range(6):
        writer.write(hostile_rows(5, base + n * 10), SESSIONS, f"b{n}")
    writer.index(None)
    for n in range(6, 6 + pending):
        writer.write(hostile_rows(5, base + n * 10), SESSIONS, f"b{n}")
    return db, writer


def test_a_closed_store_on_a_read_only_mount_is_read_in_place(tmp_path: Path, mount: Path) -> None:
    db, writer = store(tmp_path, pending=0)
    writer.close()
    expected = query(db)
    shutil.copyfile(db, mount / "a.db")
    assert not (mount / "a.db-wal").exists()
    read_only(mount)
    before = digests(mount)
    result = cli("log", "verify", "--db", str(mount / "a.db"))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok: node n1: 30 records, chain intact\n", "")
    assert query(mount / "a.db") == expected
    assert digests(mount) == before


def test_a_live_copy_with_its_wal_and_pending_batches_is_read_whole_from_a_private_copy(tmp_path: Path,
                                                                                        mount: Path) -> None:
    db, writer = store(tmp_path, pending=3)
    # As a broker's files are copied while it runs: the database and its WAL, not the -shm.
    shutil.copyfile(db, mount / "a.db")
    shutil.copyfile(f"{db}-wal", mount / "a.db-wal")
    assert (mount / "a.db-wal").stat().st_size > 0
    writer.close()
    read_only(mount)
    before = digests(mount)
    result = cli("log", "verify", "--db", str(mount / "a.db"))
    assert (result.returncode, result.stdout) == (0, "ok: node n1: 45 records, chain intact\n"), result
    assert "read-only media" in result.stderr and "private copy" in result.stderr
    listed = cli("log", "query", "--db", str(mount / "a.db"), "--format", "jsonl")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 45 and listed.stderr.count("\n") == 1
    assert [r["record_id"] for r in query(db)] == [f"n1:{n}" for n in range(1, 46)]
    assert digests(mount) == before
    assert [p for p in Path(tempfile.gettempdir()).glob("mqtt-pdp-readonly-*")
            if p.stat().st_mtime > time.time() - 60] == []  # the private copies are removed when the command ends


def leftovers(since: float) -> list[Path]:
    return [p for p in Path(tempfile.gettempdir()).glob("mqtt-pdp-readonly-*") if p.stat().st_mtime >= since]


def test_a_copy_taken_with_its_shm_is_read_whole_too(tmp_path: Path, mount: Path) -> None:
    """`cp a.db*` of a running broker brings the -shm: SQLite then opens the copy in place, where its pending
    batches cannot be indexed (an outside attack: 30 of 45 records, and 'incomplete')."""
    db, writer = store(tmp_path, pending=3)
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(f"{db}{suffix}", mount / f"a.db{suffix}")
    writer.close()
    read_only(mount)
    before, started = digests(mount), time.time() - 1
    result = cli("log", "verify", "--db", str(mount / "a.db"))
    assert (result.returncode, result.stdout) == (0, "ok: node n1: 45 records, chain intact\n"), result
    assert "private copy" in result.stderr
    assert digests(mount) == before and leftovers(started) == []


@pytest.mark.parametrize("name", ["x%41.db", "q?.db", "h#1.db", "with space.db"])
def test_names_that_mean_something_in_a_uri_are_read_as_names(tmp_path: Path, mount: Path, name: str) -> None:
    """Found by an outside attack: 'x%41.db' was read as its neighbour 'xA.db', and '?' or '#' cut the name."""
    db, writer = store(tmp_path, pending=3)
    neighbour, writer2 = store(tmp_path / "n", pending=0)
    writer2.close()
    shutil.copyfile(neighbour, mount / "xA.db")  # 30 records, where the asked-for one has 45
    shutil.copyfile(db, mount / name)
    shutil.copyfile(f"{db}-wal", mount / f"{name}-wal")
    writer.close()
    read_only(mount)
    started = time.time() - 1
    result = cli("log", "verify", "--db", str(mount / name))
    assert (result.returncode, result.stdout) == (0, "ok: node n1: 45 records, chain intact\n"), result
    assert leftovers(started) == []
    assert not any(p.name in {"q", "h", "x"} for p in mount.iterdir())  # no stray files from a cut name


def test_sigterm_removes_the_private_copy(tmp_path: Path, mount: Path) -> None:
    db, writer = store(tmp_path, pending=3)
    shutil.copyfile(db, mount / "a.db")
    shutil.copyfile(f"{db}-wal", mount / "a.db-wal")
    writer.close()
    read_only(mount)
    started = time.time() - 1
    follow = subprocess.Popen([sys.executable, "-m", "pdp.cli", "log", "query", "--db", str(mount / "a.db"),
                               "--follow"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert follow.stderr is not None
        assert "private copy" in follow.stderr.readline()
        assert leftovers(started)  # the copy exists while the command runs
        follow.send_signal(signal.SIGTERM)
        assert follow.wait(30) == 128 + signal.SIGTERM, follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
    assert leftovers(started) == []
