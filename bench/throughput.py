"""End-to-end delivered messages per second: bare amqtt vs amqtt's ACL plugin vs ours, side by side.

Two load generators, in the same run: paho clients in this process (Python: they take 0.5-0.9 of one of
the machine's two cores themselves), and Mosquitto's C clients (``mosquitto_pub -l`` / ``mosquitto_sub -C``),
which leave the broker and its assertion writer the CPU. Rows say which.
"""

from __future__ import annotations

import shutil
import statistics
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.loadgen import BrokerProcess, run_flow, run_flow_mosquitto
from bench.setup import MODES, broker_config, make_env

SHAPES = [(1, 1), (10, 10)]


def generators() -> tuple[str, ...]:
    return ("paho", "mosquitto") if shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub") else ("paho",)


def run(workdir: Path, reps: int = 5, quick: bool = False) -> dict[str, Any]:
    """Every broker runs at once, and each flow runs against each mode in turn, in an order that rotates
    from one repetition to the next: a ratio is taken between flows seconds apart, never between brokers
    minutes apart (this shared machine's steal time came and went in bursts that hit one broker's whole
    series when each broker ran its flows in one go)."""
    devices = [(f"pub-{i}", "sensor") for i in range(10)] + [(f"sub-{i}", "dashboard") for i in range(10)]
    env = make_env(workdir / "throughput", devices)
    for device_id, _ in devices:
        env.device(device_id)
    # Flows of 2-12 s each, the same for both generators. The paho flows were 0.2-0.8 s (3,000 and 200 messages
    # per publisher; the mosquitto ones five times that): a third of a second is a few of the kernel's 10 ms CPU
    # ticks, and one scheduling hiccup of the shared machine moved a single ratio anywhere from 0.64 to 2.34.
    # Side by side with paho at 10x10 (2026-11-26), six repetitions of 1,000 messages per publisher at QoS 0
    # gave single ratios of 1.03-1.11, where 200 gave 0.86-1.15. (The mosquitto clients' start, a process and
    # a TLS handshake each, is inside their window: longer flows make it a smaller part.)
    per_pub = {(1, 1): 600 if quick else 30000, (10, 10): 40 if quick else 1000}
    flows = {"paho": run_flow, "mosquitto": run_flow_mosquitto}
    samples: dict[str, list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        brokers = {mode: stack.enter_context(BrokerProcess(mode, broker_config(env, mode))) for mode in MODES}
        for rep in range(reps):
            for generator in generators():
                for qos in (0, 1):
                    for index, (pubs, subs) in enumerate(SHAPES):
                        turn = rep + index + qos
                        for mode in MODES[turn % len(MODES):] + MODES[:turn % len(MODES)]:
                            if generator == "mosquitto" and mode == "acl":
                                continue  # stock amqtt's ACL plugin let no message of the mosquitto clients through
                            result = flows[generator](brokers[mode], env, pubs, subs, qos,
                                                      per_pub[(pubs, subs)])
                            result["rep"] = rep
                            samples.setdefault(f"{generator} {mode} qos{qos} {pubs}x{subs}", []).append(result)
    rows = []
    for generator in generators():
        for qos in (0, 1):
            for pubs, subs in SHAPES:
                bare = samples[f"{generator} bare qos{qos} {pubs}x{subs}"]
                for mode in MODES:
                    runs = samples.get(f"{generator} {mode} qos{qos} {pubs}x{subs}")
                    if not runs:
                        continue
                    paired = [r["rate"] / b["rate"] for r, b in zip(runs, bare) if b["rate"]]
                    rows.append({
                        "generator": generator, "mode": mode, "qos": qos, "shape": f"{pubs}x{subs}",
                        "rate": statistics.median(r["rate"] for r in runs),
                        "ratio_to_bare": round(statistics.median(paired), 3) if paired else None,
                        "ratio_min": round(min(paired), 3) if paired else None,
                        "ratio_max": round(max(paired), 3) if paired else None,
                        "broker_cpu_us_per_msg": statistics.median(r["broker_cpu_us_per_msg"] for r in runs),
                        "writer_cpu_us_per_msg": statistics.median(r.get("writer_cpu_us_per_msg", 0.0) for r in runs),
                        "index_cpu_us_per_msg": statistics.median(r.get("index_cpu_us_per_msg", 0.0) for r in runs),
                        "lost": sum(r["lost"] for r in runs), "duplicates": sum(r["duplicates"] for r in runs),
                        "runs": len(runs),
                    })
    return {"rows": rows, "samples": samples}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'generator':9} {'mode':10} {'qos':>3} {'shape':>6} {'msg/s':>9} {'x bare':>7} {'range':>11} {'cpu us/msg':>10} "
             f"{'writer':>6} "
             f"{'index':>5} {'lost':>5} {'dup':>4}"]
    for r in result["rows"]:
        lines.append(f"{r.get('generator', 'paho'):9} {r['mode']:10} {r['qos']:>3} {r['shape']:>6} {r['rate']:>9.0f} {r['ratio_to_bare']:>7.2f} "
                     f"{r.get('ratio_min', 0):>5.2f}-{r.get('ratio_max', 0):<5.2f} "
                     f"{r['broker_cpu_us_per_msg']:>10.0f} {r.get('writer_cpu_us_per_msg', 0.0):>6.0f} "
                     f"{r.get('index_cpu_us_per_msg', 0.0):>5.0f} {r['lost']:>5} "
                     f"{r['duplicates']:>4}")
    lines.append("(x bare: the median over repetitions of the rate against bare amqtt's in the same repetition, "
                 "range: the lowest and highest of those; msg/s: the median rate)")
    lines.append("(cpu us/msg: the broker process; writer: its assertion writer process, in the same window; index: "
                 "the writer after the flow, indexing the records it stored during it, before the next flow starts)")
    return "\n".join(lines)
