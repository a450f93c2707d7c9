"""End-to-end delivered messages per second: bare amqtt vs amqtt's ACL plugin vs ours, side by side."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.loadgen import BrokerProcess, run_flow
from bench.setup import MODES, broker_config, make_env

SHAPES = [(1, 1), (10, 10)]


def run(workdir: Path, reps: int = 3, quick: bool = False) -> dict[str, Any]:
    devices = [(f"pub-{i}", "sensor") for i in range(10)] + [(f"sub-{i}", "dashboard") for i in range(10)]
    env = make_env(workdir / "throughput", devices)
    for device_id, _ in devices:
        env.device(device_id)
    per_pub = {(1, 1): 600 if quick else 3000, (10, 10): 40 if quick else 200}
    samples: dict[str, list[dict[str, Any]]] = {}
    for rep in range(reps):
        for mode in MODES:  # interleaved, so that machine noise hits every mode alike
            with BrokerProcess(mode, broker_config(env, mode)) as broker:
                for qos in (0, 1):
                    for pubs, subs in SHAPES:
                        result = run_flow(broker, env, pubs, subs, qos, per_pub[(pubs, subs)])
                        samples.setdefault(f"{mode} qos{qos} {pubs}x{subs}", []).append(result)
    rows = []
    for qos in (0, 1):
        for pubs, subs in SHAPES:
            bare = statistics.median(r["rate"] for r in samples[f"bare qos{qos} {pubs}x{subs}"])
            for mode in MODES:
                runs = samples[f"{mode} qos{qos} {pubs}x{subs}"]
                rate = statistics.median(r["rate"] for r in runs)
                rows.append({
                    "mode": mode, "qos": qos, "shape": f"{pubs}x{subs}", "rate": rate,
                    "ratio_to_bare": round(rate / bare, 3) if bare else None,
                    "broker_cpu_us_per_msg": statistics.median(r["broker_cpu_us_per_msg"] for r in runs),
                    "writer_cpu_us_per_msg": statistics.median(r.get("writer_cpu_us_per_msg", 0.0) for r in runs),
                    "lost": sum(r["lost"] for r in runs), "duplicates": sum(r["duplicates"] for r in runs),
                    "runs": len(runs),
                })
    return {"rows": rows, "samples": samples}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':6} {'qos':>3} {'shape':>6} {'msg/s':>9} {'x bare':>7} {'cpu us/msg':>10} {'writer':>6} "
             f"{'lost':>5} {'dup':>4}"]
    for r in result["rows"]:
        lines.append(f"{r['mode']:6} {r['qos']:>3} {r['shape']:>6} {r['rate']:>9.0f} {r['ratio_to_bare']:>7.2f} "
                     f"{r['broker_cpu_us_per_msg']:>10.0f} {r.get('writer_cpu_us_per_msg', 0.0):>6.0f} {r['lost']:>5} "
                     f"{r['duplicates']:>4}")
    lines.append("(cpu us/msg: the broker process; writer: its assertion writer process, in the same window)")
    return "\n".join(lines)
