"""A policy edit of 10,000 rules: rebuilt and swapped on one broker, then visible on a second broker process."""

from __future__ import annotations

import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.latency import make_policy
from bench.setup import BENCH_POLICY, make_env
from tests.support import BrokerProcess, TestPki, write_cli_config


def run(workdir: Path, redis_url: str, rules: int = 10_000, reps: int = 3) -> dict[str, Any]:
    import random

    work = workdir / "propagation"
    env = make_env(work / "env", [("dev-1", "sensor")])
    pki = TestPki(work / "pki")
    rng = random.Random(11)
    policy = env.dir / "policy.csv"
    prefix = f"mqtt-pdp-bench-{int(time.time())}"
    common = dict(redis_url=redis_url, redis_prefix=prefix)
    first = BrokerProcess(write_cli_config(work / "a.yaml", pki, env.dir, reload_interval=0.1, **common), work)
    second = BrokerProcess(write_cli_config(work / "b.yaml", pki, env.dir, reload_interval=3600, **common), work)
    samples = []
    try:
        for _ in range(reps):
            text = BENCH_POLICY + make_policy(rules, rng)
            start = time.perf_counter()
            policy.write_text(text)
            line_a = first.wait_line(r"policy reloaded: revision", timeout=30)
            seen_a = time.perf_counter()
            second.wait_line(r"policy reloaded: revision", timeout=30)
            seen_b = time.perf_counter()
            rebuild = float(re.search(r"in ([0-9.]+) s", line_a).group(1))  # type: ignore[union-attr]
            samples.append({"rebuild_s": rebuild, "first_broker_s": seen_a - start, "second_broker_s": seen_b - start})
    finally:
        first.stop()
        second.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "rules": rules + len(BENCH_POLICY.splitlines()),
        "samples": samples,
        "rebuild_s": round(statistics.median(s["rebuild_s"] for s in samples), 3),
        "first_broker_s": round(statistics.median(s["first_broker_s"] for s in samples), 3),
        "second_broker_s": round(statistics.median(s["second_broker_s"] for s in samples), 3),
    }


def table(result: dict[str, Any]) -> str:
    return (f"{result['rules']} rules: rebuilt and swapped in {result['rebuild_s']:.3f} s (median); "
            f"in force on the editing broker {result['first_broker_s']:.3f} s after the write "
            f"(includes its 0.1 s poll), on the second broker {result['second_broker_s']:.3f} s after the write")
