"""How cost grows with the fleet: N connected devices, each subscribed to its own command topic.

The N device clients are real paho-mqtt clients driven from one thread through a
selector (paho's external-loop mode), so that thousands fit in one process.
"""

from __future__ import annotations

import random
import selectors
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.loadgen import BrokerProcess, connect_client, tls_context
from bench.setup import broker_config, make_env


class Fleet:
    def __init__(self, env: Any, port: int, device_ids: list[str]) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self.received = 0
        self.connacks = 0
        self.subacks = 0
        for device_id in device_ids:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
            client.tls_set_context(tls_context(env, device_id))
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.connect("127.0.0.1", port, keepalive=600)
            self.selector.register(client.socket(), selectors.EVENT_READ, client)
            self.clients.append(client)
            if len(self.clients) % 50 == 0:
                self.pump(0)

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        if rc == 0:
            self.connacks += 1
            device_id = client._client_id.decode()
            client.subscribe(f"sites/bench/{device_id}/cmd", 0)

    def _on_subscribe(self, *args: Any) -> None:
        self.subacks += 1

    def _on_message(self, *args: Any) -> None:
        self.received += 1

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.data.loop_read()
        for client in self.clients:
            if client.want_write():
                client.loop_write()

    def pump_until(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            self.pump(0.05)
        return True

    def close(self) -> None:
        for client in self.clients:
            try:
                client.disconnect()
                client.loop_write()
                client.socket() and client.socket().close()  # type: ignore[func-returns-value]
            except (OSError, AttributeError):
                pass
        self.selector.close()


def run_one(env: Any, mode: str, size: int, messages: int, rng: random.Random) -> dict[str, Any]:
    device_ids = [f"dev-{i:05d}" for i in range(size)]
    with BrokerProcess(mode, broker_config(env, mode)) as broker:
        # The publisher first: paho's own loop uses select(), which cannot watch a socket numbered >= 1024.
        publisher = connect_client(env, broker.port, "sub-0")
        t_connect = time.perf_counter()
        fleet = Fleet(env, broker.port, device_ids)
        try:
            if not fleet.pump_until(lambda: fleet.subacks >= size, 300):
                return {"mode": mode, "devices": size, "error": f"only {fleet.subacks}/{size} subscribed within 300 s"}
            connect_s = time.perf_counter() - t_connect
            targets = [rng.choice(device_ids) for _ in range(messages)]
            cpu0, t0 = broker.cpu(), time.perf_counter()

            def publish() -> None:
                for target in targets:
                    publisher.publish(f"sites/bench/{target}/cmd", b"x" * 64, 0)

            thread = threading.Thread(target=publish)
            thread.start()
            fleet.pump_until(lambda: fleet.received >= messages, 120)
            seconds = time.perf_counter() - t0
            thread.join(60)
            cpu = broker.cpu() - cpu0
            publisher.disconnect()
            publisher.loop_stop()
            return {"mode": mode, "devices": size, "messages": messages, "delivered": fleet.received,
                    "rate": round(fleet.received / seconds, 1), "connect_s": round(connect_s, 1),
                    "broker_cpu_us_per_msg": round(cpu / max(fleet.received, 1) * 1e6, 1)}
        finally:
            fleet.close()


def run(workdir: Path, sizes: tuple[int, ...] = (100, 1000, 10000), messages: int = 1000) -> dict[str, Any]:
    largest = max(sizes)
    devices = [(f"dev-{i:05d}", "sensor") for i in range(largest)] + [("sub-0", "dashboard")]
    env = make_env(workdir / "fleet", devices)
    rng = random.Random(3)
    rows = []
    for size in sizes:
        for mode in ("bare", "ours", "ours-nolog"):
            try:
                rows.append(run_one(env, mode, size, messages if size < 10000 else messages // 2, rng))
            except (RuntimeError, OSError) as exc:  # report it in the table; the other rows still count
                rows.append({"mode": mode, "devices": size, "error": str(exc)})
    return {"rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':6} {'devices':>7} {'msg/s':>8} {'cpu us/msg':>10} {'delivered':>9} {'connect s':>9}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['mode']:6} {r['devices']:>7} {r['error']}")
            continue
        lines.append(f"{r['mode']:6} {r['devices']:>7} {r['rate']:>8.0f} {r['broker_cpu_us_per_msg']:>10.0f} "
                     f"{r['delivered']:>9} {r['connect_s']:>9.1f}")
    return "\n".join(lines)
