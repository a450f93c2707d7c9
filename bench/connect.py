"""mTLS connections per second with identity extraction and registry lookup, against a bare TLS listener."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.loadgen import BrokerProcess, tls_context
from bench.setup import broker_config, make_env


def _connect_once(port: int, device_id: str, context: Any) -> bool:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(context)
    result: list[int] = []
    done = threading.Event()

    def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        result.append(rc.value)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30)
    while not done.is_set():
        client.loop(timeout=0.5)
        if len(result) == 0 and not client.is_connected() and done.wait(0):
            break
    client.disconnect()
    client.loop(timeout=0.1)
    client.socket() and client.socket().close()  # type: ignore[func-returns-value]
    return result == [0]


def run(workdir: Path, count: int = 300, reps: int = 3) -> dict[str, Any]:
    devices = [(f"dev-{i}", "sensor") for i in range(count)]
    env = make_env(workdir / "connect", devices)
    contexts = [(f"dev-{i}", tls_context(env, f"dev-{i}")) for i in range(count)]
    samples: dict[str, list[dict[str, float]]] = {"bare": [], "ours": [], "ours-nolog": []}
    for _ in range(reps):
        for mode in samples:
            with BrokerProcess(mode, broker_config(env, mode)) as broker:
                cpu0, t0 = broker.cpu(), time.perf_counter()
                ok = sum(_connect_once(broker.port, device_id, ctx) for device_id, ctx in contexts)
                seconds = time.perf_counter() - t0
                samples[mode].append({"ok": ok, "rate": ok / seconds,
                                      "broker_cpu_ms_per_connect": (broker.cpu() - cpu0) / max(ok, 1) * 1000})
    rows = []
    bare = statistics.median(s["rate"] for s in samples["bare"])
    for mode, runs in samples.items():
        rate = statistics.median(s["rate"] for s in runs)
        rows.append({"mode": mode, "connects_per_s": round(rate, 1), "ratio_to_bare": round(rate / bare, 3),
                     "broker_cpu_ms_per_connect": round(statistics.median(s["broker_cpu_ms_per_connect"] for s in runs), 2),
                     "refused": sum(count - s["ok"] for s in runs)})
    return {"rows": rows, "connections_per_run": count}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':6} {'connects/s':>10} {'x bare':>7} {'broker cpu ms/conn':>18} {'refused':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['mode']:6} {r['connects_per_s']:>10.0f} {r['ratio_to_bare']:>7.2f} "
                     f"{r['broker_cpu_ms_per_connect']:>18.2f} {r['refused']:>7}")
    return "\n".join(lines)
