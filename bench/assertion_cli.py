"""Assertion log at 1,000,000 records, as an analyst meets it: whole ``mqtt-pdp log`` commands, timed
end to end (interpreter start-up and imports included), and the writer's recording rate into that store.

The store is filled through the writer's own chain code (``ChainWriter``), so hashes are real and
``log verify`` walks a real chain: 10,000 devices, 50 sites, 1% of topics under ``sites/<site>/secret/``,
a quarter denied, spread evenly over the last eight days.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdp.evidence.chain import ChainWriter
from pdp.evidence.record import Row, SessionFields
from pdp.evidence.sinks import SqliteSink

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 10_000


def _sessions() -> dict[int, SessionFields]:
    return {i: (f"dev-{i:06d}", f"{i:064x}", f"{i:x}", "CN=bench CA", "sensor", f"site{i % 50}", "telemetry", "ops",
                "active") for i in range(DEVICES)}


def _rows(first: int, count: int, base: float, step: float) -> list[Row]:
    out: list[Row] = []
    for n in range(first, first + count):
        device = (n * 7919) % DEVICES
        secret = n % 100 == 0
        topic = f"sites/site{device % 50}/{'secret' if secret else f'dev-{device:06d}'}/telemetry"
        allowed = n % 4 != 0
        rule = f"rule-{n % 20}"
        out.append((base + n * step, device, f"dev-{device:06d}", "127.0.0.1:40000", "publish" if n % 2 else "receive",
                    topic, allowed, rule, f"{'allowed' if allowed else 'denied'} by rule {rule}", "l1", 800, "p1.r1"))
    return out


def fill(db: Path, state: Path, records: int, batch: int = 5000, anchors: Path | None = None) -> ChainWriter:
    """With ``anchors``: heads signed every 1,000 records as the broker's default, key ``anchors/key``."""
    sessions = _sessions()
    base, step = time.time() - 8 * 86400, 8 * 86400 / records
    anchorer = None
    if anchors is not None:
        from pdp.evidence.anchor import Anchorer, generate_key

        generate_key(anchors / "key")
        anchorer = Anchorer("bench", anchors / "key", anchors, every=1000, interval=3600)
    writer = ChainWriter("bench", [SqliteSink(db)], state, anchorer)
    for first in range(0, records, batch):
        rows = _rows(first, min(batch, records - first), base, step)
        writer.write(rows, {k: sessions[k] for k in {r[1] for r in rows}}, f"fill:{first + len(rows)}")
    return writer


def recording_rate(writer: ChainWriter, records: int, batch: int = 5000, tag: str = "rate") -> dict[str, Any]:
    """Batches of 5,000 into the store that already holds the fill, as the writer process takes them: the
    broker's pickled frame unpickled, chain and hashes, the in-flight copy, the SQLite transaction, signed heads.
    Into the records at once, or stored whole (pending) when the writer's ``index_backlog`` allows it."""
    sessions = _sessions()
    start_n = writer.chain.seq
    base = time.time()
    frames = []
    for i in range(0, records, batch):
        rows = _rows(start_n + i, batch, base, 0.0001)
        frames.append(pickle.dumps(("batch", rows, {k: sessions[k] for k in {r[1] for r in rows}}, f"{tag}:{i}"),
                                   pickle.HIGHEST_PROTOCOL))
    started = time.perf_counter()
    for frame in frames:
        _, rows, batch_sessions, batch_id = pickle.loads(frame)
        writer.write(rows, batch_sessions, batch_id, frame)
    seconds = time.perf_counter() - started
    return {"records": records, "seconds": round(seconds, 2), "records_per_s": round(records / seconds)}


def time_command(args: list[str], reps: int, root: Path = ROOT) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    timings = []
    for _ in range(reps):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=root)
        timings.append(time.perf_counter() - started)
        if done.returncode not in (0, 3):
            raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.decode()[-500:]}")
    return {"median_ms": round(statistics.median(timings) * 1000), "max_ms": round(max(timings) * 1000)}


_FILL_ELSEWHERE = """
import json, sys, time
from pathlib import Path
from bench.assertion_cli import fill, recording_rate
db, anchors, records, rate_records = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
anchors.mkdir(exist_ok=True)
started = time.perf_counter()
writer = fill(db, db.parent / (db.stem + "-state"), records, anchors=anchors)
filled = time.perf_counter() - started
rate = recording_rate(writer, rate_records)
writer.close()
print(json.dumps({"fill_seconds": round(filled, 1), "rate": rate}))
"""


def fill_with(code_root: Path, db: Path, anchors: Path, records: int, rate_records: int) -> dict[str, Any]:
    """The fill and the recording rate with another checkout's code, into a store of that code's own format."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run([sys.executable, "-c", _FILL_ELSEWHERE, str(db), str(anchors), str(records),
                           str(rate_records)], capture_output=True, text=True, env=env, cwd=code_root, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def commands_for(db: Path, anchors: Path) -> dict[str, list[str]]:
    log = ["-m", "pdp.cli", "log"]
    device = f"dev-{1234:06d}"
    return {
        "python -c pass (interpreter alone)": ["-c", "pass"],
        "query --device (table)": [*log, "query", "--db", str(db), "--device", device],
        "query --client (table)": [*log, "query", "--db", str(db), "--client", device],
        "query --fingerprint (table)": [*log, "query", "--db", str(db), "--fingerprint", f"{1234:064x}"],
        "query --rule (table)": [*log, "query", "--db", str(db), "--rule", "rule-7"],
        "query --decision deny (table)": [*log, "query", "--db", str(db), "--decision", "deny"],
        "query --device --format jsonl (all of it)": [*log, "query", "--db", str(db), "--device", device, "--format",
                                                      "jsonl"],
        "query --topic 'sites/+/secret/#' --since 7d (table)": [*log, "query", "--db", str(db), "--topic",
                                                                "sites/+/secret/#", "--since", "7d"],
        "query --topic 'sites/+/secret/#' --since 7d --format jsonl": [*log, "query", "--db", str(db), "--topic",
                                                                       "sites/+/secret/#", "--since", "7d", "--format",
                                                                       "jsonl"],
        "stats --since 24h": [*log, "stats", "--db", str(db), "--since", "24h"],
        "verify --incremental (since the newest signed head)": [
            *log, "verify", "--db", str(db), "--anchors", str(anchors), "--public-key", str(anchors / "key.pub"),
            "--incremental"],
        "verify (full)": [*log, "verify", "--db", str(db)],
        "verify --deep (full, and every page and index entry)": [*log, "verify", "--db", str(db), "--deep"],
        "verify --anchors (full)": [*log, "verify", "--db", str(db), "--anchors", str(anchors), "--public-key",
                                    str(anchors / "key.pub")],
    }


def run(workdir: Path, quick: bool = False, code_root: Path | None = None) -> dict[str, Any]:
    """With ``code_root`` (e.g. a checkout of the previous version) that code also fills a store of its own
    (its own indexes and format) and measures its recording rate, and each command is also timed with that
    code on that store, interleaved with this one's: a side-by-side comparison under the same load."""
    workdir.mkdir(parents=True, exist_ok=True)
    records = 100_000 if quick else 1_000_000
    rate_records = 20_000 if quick else 200_000
    before_fill = None
    if code_root is not None:
        before_fill = fill_with(code_root, workdir / "before.db", workdir / "before-anchors", records, rate_records)
    db = workdir / "cli.db"
    started = time.perf_counter()
    anchors = workdir / "anchors"
    anchors.mkdir(exist_ok=True)
    writer = fill(db, workdir / "state", records, anchors=anchors)
    filled = time.perf_counter() - started
    rate = recording_rate(writer, rate_records)
    # As the broker's writer records below its backlog: each batch stored whole, indexed once it is quiet.
    writer.index_backlog = 2**62
    whole = recording_rate(writer, rate_records, tag="whole")
    started = time.perf_counter()
    indexed = writer.index(None)
    indexing = time.perf_counter() - started
    whole["indexed_per_s"] = round(indexed / indexing)
    writer.close()
    commands = commands_for(db, anchors)
    before_commands = commands_for(workdir / "before.db", workdir / "before-anchors")
    times: dict[str, Any] = {}
    before: dict[str, Any] = {}
    for label, args in commands.items():
        reps = 1 if "verify" in label else 3
        if code_root is not None and "--deep" not in args:  # (new with this version)
            before[label] = time_command(before_commands[label], reps, code_root)
        times[label] = time_command(args, reps)
    return {"records": records + rate["records"] + whole["records"], "fill_seconds": round(filled, 1), "rate": rate,
            "whole": whole, "commands": times,
            "before": before, "before_fill": before_fill, "code_root": str(code_root) if code_root else None,
            "load": os.getloadavg()}


def table(result: dict[str, Any]) -> str:
    rate = result["rate"]
    lines = [f"store: {result['records']:,} records (filled in {result['fill_seconds']} s); load average at the end "
             f"{', '.join(f'{x:.2f}' for x in result['load'])}",
             f"recording into it: {rate['records_per_s']:,} records/s ({rate['records']:,} records in batches of 5,000 "
             "as the writer process takes them: frame unpickled, chain, in-flight copy, SQLite, signed heads; no pipe)"]
    whole = result.get("whole")
    if whole:
        lines.append(f"  stored whole as the broker's writer does below its backlog: {whole['records_per_s']:,} records/s;"
                     f" indexed afterwards at {whole['indexed_per_s']:,} records/s")
    before = result.get("before") or {}
    if result.get("before_fill"):
        was = result["before_fill"]["rate"]
        lines.append(f"  before ({result['code_root']}, into a store it filled, in {result['before_fill']['fill_seconds']}"
                     f" s): {was['records_per_s']:,} records/s")
    if before:
        lines.append(f"  (before: the same command with the code in {result['code_root']} on the store it filled, "
                     "interleaved)")
    for label, t in result["commands"].items():
        line = f"  {label:<62} median {t['median_ms']:>6} ms  max {t['max_ms']:>6} ms"
        if label in before:
            line += f"   before: median {before[label]['median_ms']:>6} ms"
        lines.append(line)
    return "\n".join(lines)
