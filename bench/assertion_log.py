"""Assertion log: sustained recording rate into SQLite, and query time by device over 1,000,000 records."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from pdp.core.admission import Admission
from pdp.core.engine import decision_for
from pdp.core.identity import CertificateInfo
from pdp.evidence.recorder import AssertionRecorder
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.evidence.writer import WriterProcess
from pdp.registry.device import Device


def _admissions(count: int) -> list[Admission]:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    out = []
    for i in range(count):
        cert = CertificateInfo(f"{i:064x}", f"{i:x}", "CN=bench CA", f"CN=dev-{i}", now, now, (), f"dev-{i}")
        out.append(Admission(True, "identity verified", None,
                             Device(f"dev-{i:06d}", "sensor", f"site{i % 50}", "telemetry", "ops", "active"), None, cert))
    return out


def record_rate(workdir: Path, records: int = 200_000) -> dict[str, Any]:
    """Capture as the broker does, ship to the writer process, and measure until every record is committed."""
    admissions = _admissions(1000)
    allow = decision_for(True, "rule-1")

    async def run() -> float:
        recorder = AssertionRecorder(WriterProcess({"node": "bench", "spool_dir": str(workdir / "spool"),
                                                    "assertion_db": str(workdir / "rate.db")}))
        recorder.start()
        start = time.perf_counter()
        for i in range(records):
            adm = admissions[i % 1000]
            recorder.decision(adm, adm.device.device_id, "127.0.0.1:40000", "receive",  # type: ignore[union-attr]
                              f"sites/site{i % 50}/dev-{i % 1000}/telemetry", allow, "l1", 800, "rev")
            if i % 5000 == 0:
                await asyncio.sleep(0)
        await recorder.close()
        return time.perf_counter() - start

    seconds = asyncio.run(run())
    return {"records": records, "seconds": round(seconds, 2), "records_per_s": round(records / seconds)}


def query_time(workdir: Path, records: int = 1_000_000, devices: int = 10_000) -> dict[str, Any]:
    """Fill a store with ``records`` records over ``devices`` devices, then time queries by device."""
    from pdp.evidence.record import AssertionRecord

    db = workdir / "query.db"
    store = AssertionStore(db)
    rng = random.Random(5)
    base = time.time() - 86400
    batch: list[AssertionRecord] = []
    for seq in range(1, records + 1):
        device = f"dev-{rng.randrange(devices):06d}"
        batch.append(AssertionRecord(
            f"bench:{seq}", "bench", seq, base + seq * 0.05, device, device, f"{int(device[4:]):064x}", "1", "CN=ca",
            "sensor", "site1", "telemetry", "ops", "active", rng.choice(["publish", "receive", "subscribe"]),
            f"sites/site1/{device}/telemetry", rng.choice(["allow", "deny"]), "rule-1", "allowed by rule rule-1",
            "rev", "l1", 0.8, "127.0.0.1:1", "0" * 64, "0" * 64))
        if len(batch) == 50_000:
            store.insert(batch)
            batch = []
    if batch:
        store.insert(batch)
    store.db.execute("ANALYZE")
    out: dict[str, Any] = {"records": records, "devices": devices}
    for label, make in (("device", lambda d, i: QueryFilters(device=d)),
                        ("client", lambda d, i: QueryFilters(client_id=d)),
                        ("fingerprint", lambda d, i: QueryFilters(fingerprint=f"{i:064x}"))):
        timings = []
        for _ in range(30):
            index = rng.randrange(devices)
            start = time.perf_counter()
            found = list(store.query(make(f"dev-{index:06d}", index)))
            timings.append(time.perf_counter() - start)
        timings.sort()
        out[label] = {"median_ms": round(statistics.median(timings) * 1000, 2), "max_ms": round(timings[-1] * 1000, 2),
                      "rows_per_query": len(found)}
    store.close()
    return out


def run(workdir: Path, quick: bool = False) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    return {"rate": record_rate(workdir, 50_000 if quick else 200_000),
            "query": query_time(workdir, 200_000 if quick else 1_000_000)}


def table(result: dict[str, Any]) -> str:
    rate, query = result["rate"], result["query"]
    lines = [f"recording: {rate['records_per_s']:,} records/s into SQLite ({rate['records']:,} records, through the "
             f"writer process: hash chain, spooling sink)"]
    for label in ("device", "client", "fingerprint"):
        q = query[label]
        lines.append(f"query by {label} over {query['records']:,} records: median {q['median_ms']} ms, "
                     f"max {q['max_ms']} ms ({q['rows_per_query']} rows)")
    return "\n".join(lines)
