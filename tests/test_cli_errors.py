"""The mqtt-pdp command as a new user meets it (issue 11): every bad input one line and exit 2, typos that
used to succeed silently now refused, and the conveniences a user expects (--version, options after the
subcommand, truncation stated, --follow without repeated headers)."""

from __future__ import annotations

import os
import queue
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pdp.evidence.store import AssertionStore
from tests.support import WAIT, TestPki, write_cli_config
from tests.test_log_cli import aged_db

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line (exit 2, nothing else on stderr, no traceback)."""
    lines = result.stderr.splitlines()
    assert (result.returncode, len(lines)) == (2, 1), result
    assert lines[0].startswith("mqtt-pdp: error: "), result.stderr
    return lines[0]


@pytest.fixture
def bad_dbs(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    text = tmp_path / "text.db"
    text.write_text("not a database\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (a)")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:  # another application's table of the same name
        db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, title TEXT)")
    directory = tmp_path / "dir.db"
    directory.mkdir()
    return {"empty": empty, "text": text, "other": other, "foreign": foreign, "directory": directory}


EXPECTED = {
    "empty": "{db} is an empty file, not an assertion database",
    "text": "{db} is not an assertion database: file is not a database",
    "other": "{db} is an SQLite database without a records table, not an assertion database",
    "foreign": "{db} has a records table that is not an assertion log's, not an assertion database",
    "directory": "{db} is a directory, not an assertion database",
}
LOG_COMMANDS = [["query"], ["stats"], ["verify"], ["prune", "--older-than", "1d"],
                ["drain", "--redis", "redis://127.0.0.1:9"], ["reindex"]]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_log_commands_refuse_what_is_not_an_assertion_database(bad_dbs: dict[str, Path], kind: str) -> None:
    db = bad_dbs[kind]
    before = sorted(p.name for p in db.parent.iterdir())
    size = db.stat().st_size if db.is_file() else None
    for command in LOG_COMMANDS:
        line = one_error(run("log", *command, "--db", str(db)))
        assert line == "mqtt-pdp: error: " + EXPECTED[kind].format(db=db), command
    # nothing was written into them: no schema into another application's file, no WAL files beside it
    assert sorted(p.name for p in db.parent.iterdir()) == before
    assert (db.stat().st_size if db.is_file() else None) == size


def test_missing_database_is_an_error_and_not_created(tmp_path: Path) -> None:
    typo = tmp_path / "typo.db"
    for command in LOG_COMMANDS[:4]:
        line = one_error(run("log", *command, "--db", str(typo)))
        assert line == f"mqtt-pdp: error: no assertion database at {typo} (has the broker run? use --db or -c)"
    assert not typo.exists()


def test_drain_with_a_bad_redis_url(tmp_path: Path) -> None:
    line = one_error(run("log", "drain", "--redis", "notaurl", "--db", str(tmp_path / "a.db")))
    assert line.startswith("mqtt-pdp: error: Redis URL 'notaurl': Redis URL must specify one of the following schemes")


def test_unknown_node_is_an_error(tmp_path: Path) -> None:
    db = aged_db(tmp_path, [60, 30], node="broker-1")
    assert run("log", "verify", "--db", str(db), "--node", "broker-1").stdout == "ok: node broker-1: 2 records, chain intact\n"
    for command in (["verify"], ["query"]):
        line = one_error(run("log", *command, "--db", str(db), "--node", "nosuch"))
        assert line == f"mqtt-pdp: error: no records of node 'nosuch' in {db} (nodes: broker-1)"


def test_pki_refuses_negative_days_and_unwritable_out(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    line = one_error(run("pki", "--out", str(out), "--device", "a", "--days", "-5"))
    assert line == "mqtt-pdp: error: --days -5: a certificate must be valid for 1 to 36500 days"
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_error(run("pki", "--out", str(blocker / "pki"), "--device", "a"))
    assert line.startswith(f"mqtt-pdp: error: cannot write to --out {blocker / 'pki'}: Not a directory")


def test_quoted_policy_field_is_refused_with_file_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.csv"
    policy.write_text("p, r1, *, *, *, sites/#, subscribe, allow\np, r2, *, *, *, \"sites/x\", publish, allow\n")
    line = one_error(run("check", "--policy", str(policy)))
    assert line.startswith(f"mqtt-pdp: error: {policy}:2: field '\"sites/x\"' is quoted")


def test_broker_port_in_use_is_one_line(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        import shutil

        shutil.copytree(ROOT / "policies", tmp_path / "policies")
        config_path = write_cli_config(tmp_path / "broker.yaml", pki, tmp_path / "policies")
        config = yaml.safe_load(config_path.read_text())
        config["listeners"]["default"]["bind"] = f"127.0.0.1:{port}"
        config_path.write_text(yaml.safe_dump(config))
        result = run("broker", "-c", str(config_path), cwd=tmp_path)
    finally:
        holder.close()
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "Traceback" in line
              or line.startswith("mqtt-pdp: error:") or line.startswith("  File ")]
    assert result.returncode == 2, result.stderr
    assert errors == [f"mqtt-pdp: error: broker failed: [Errno 98] error while attempting to bind on address "
                      f"('127.0.0.1', {port}): address already in use"], result.stderr


def test_version() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"mqtt-pdp {version('mqtt-pdp')}\n", "")


def test_log_level_accepted_after_the_subcommand(tmp_path: Path) -> None:
    db = aged_db(tmp_path, [60])
    before = run("--log-level", "warning", "log", "verify", "--db", str(db))
    after = run("log", "verify", "--db", str(db), "--log-level", "warning")
    assert (after.returncode, after.stdout) == (before.returncode, before.stdout) == (0, "ok: node n1: 1 records, chain intact\n")
    bad = run("log", "verify", "--db", str(db), "--log-level", "loud")
    assert bad.returncode == 2 and "invalid choice: 'loud'" in bad.stderr


def test_table_truncation_is_stated(tmp_path: Path) -> None:
    db = aged_db(tmp_path, [float(600 - i) for i in range(105)])
    result = run("log", "query", "--db", str(db))
    assert result.returncode == 0
    rows = result.stdout.splitlines()
    assert len(rows) == 1 + 100 and rows[0].startswith("TIMESTAMP") and rows[-1].split()[4] == "t/104"
    assert result.stderr == ("mqtt-pdp: showing the newest 100 matching records; more match "
                             "(use --limit N, --since or more filters)\n")
    exact = run("log", "query", "--db", str(db), "--limit", "105")
    assert (len(exact.stdout.splitlines()), exact.stderr) == (106, "")


def test_follow_prints_the_header_once(tmp_path: Path) -> None:
    from pdp.evidence.chain import ChainWriter
    from pdp.evidence.sinks import SqliteSink

    db = aged_db(tmp_path, [60])
    proc = subprocess.Popen([sys.executable, "-m", "pdp.cli", "log", "query", "--db", str(db), "--follow"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen: list[str] = []

    def until(topic: str) -> None:
        deadline = time.monotonic() + WAIT
        while not any(f" {topic} " in line for line in seen):
            seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())))

    try:
        until("t/0")
        fields = ("s1", "a" * 64, "1", "CN=test CA", "sensor", "plant-a", "test", "qa", "active")
        for batch in range(2):
            writer = ChainWriter("n1", [SqliteSink(db)], tmp_path / "state-n1")
            try:
                writer.write([(time.time(), 1, "s1", None, "publish", f"new/{batch}", True, "r", "ok", "index", 1, "rev")],
                             {1: fields})
            finally:
                writer.close()
            until(f"new/{batch}")
    finally:
        proc.terminate()
        proc.wait(WAIT)
    assert [line for line in seen if line.startswith("TIMESTAMP")] == [seen[0]]
    assert len(seen) == 4
    # the rows line up under the one header
    assert {line.index(" publish ") for line in seen[1:]} == {seen[0].index("ACTION") - 1}
    assert AssertionStore(db, readonly=True).count() == 3


def test_log_backup_copies_and_verifies_and_never_overwrites(tmp_path: Path) -> None:
    db = aged_db(tmp_path, [60, 30, 10])
    out = tmp_path / "backup.db"
    result = run("log", "backup", "--db", str(db), "--out", str(out))
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"backed up 3 records of 1 node(s) to {out}; every chain verified\n", "")
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert run("log", "verify", "--db", str(out)).stdout == "ok: node n1: 3 records, chain intact\n"
    again = one_error(run("log", "backup", "--db", str(db), "--out", str(out)))
    assert again == f"mqtt-pdp: error: {out} exists: a backup never overwrites (choose a new name, e.g. with the date)"
    missing = one_error(run("log", "backup", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "b2.db")))
    assert "no assertion database at" in missing and not (tmp_path / "b2.db").exists()


@pytest.mark.parametrize("args", [
    ["pki", "--days", "99999999999", "--device", "x"],
    ["pki", "--device", "\u00fcn\u00efcode"],
    ["pki", "--trust-domain", "EXAMPLE.org"],
    ["pki", "--trust-domain", ""],
    ["pki", "--hostname", ""],
    ["log", "query", "--limit", "abc"],
    ["log-level", "bogus"],
    ["log"],
])
def test_hostile_values_are_one_line_and_leave_nothing_behind(tmp_path, args):
    """Found by an outside attack: tracebacks (exit 1) that left a CA behind, certificates the broker would
    refuse issued with exit 0, and argparse's several-line usage text."""
    out = tmp_path / "pki"
    full = [*args, "--out", str(out)] if args[0] == "pki" else args
    result = subprocess.run([sys.executable, "-m", "pdp.cli", *full], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("mqtt-pdp: error: "), result.stderr
    assert not out.exists()
