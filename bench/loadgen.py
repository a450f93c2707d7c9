"""Load generation with real paho-mqtt clients against a broker in another process."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.setup import ROOT, BenchEnv
from pdp.evidence.store import uri_of

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BrokerProcess:
    """The broker under test, in its own process; ``cpu()`` is its user+system CPU seconds."""

    def __init__(self, mode: str, config: dict[str, Any]) -> None:
        self.mode = mode
        handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(config, handle)
        handle.close()
        self._config_path = handle.name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.broker_proc", mode, handle.name],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"broker {mode} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.assertion_db = next((plugin.get("assertion_db") for plugin in config.get("plugins", {}).values()
                                  if isinstance(plugin, dict) and plugin.get("assertions")), None)

    def settle(self, timeout: float = 120.0) -> float:
        """Wait until the assertion writer has indexed every batch it stored during a flow (it indexes once
        the broker is quiet); returns the writer's CPU seconds meanwhile. The next flow, of any broker, then
        runs without this one's indexing beside it."""
        if not self.assertion_db:
            return 0.0
        cpu0, deadline, empty_since = self.children_cpu(), time.perf_counter() + timeout, None
        while time.perf_counter() < deadline:
            try:
                db = sqlite3.connect(uri_of(self.assertion_db, "mode=ro"), uri=True, timeout=5)
                try:
                    pending = db.execute("SELECT count(*) FROM pending").fetchone()[0]
                finally:
                    db.close()
            except sqlite3.Error:
                pending = 0  # no store yet: nothing recorded
            now = time.perf_counter()
            if pending:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since > 0.3:  # the recorder's last batch (50 ms) has come and been indexed
                break
            time.sleep(0.05)
        return self.children_cpu() - cpu0

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def children_cpu(self) -> float:
        """CPU seconds of the broker's assertion writer process, which ``cpu`` omits (not its reload loader,
        whose start fell inside the first flow of each broker and showed as writer CPU with the log off)."""
        total = 0.0
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
                children = handle.read().split()
        except OSError:
            return 0.0
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as handle:
                    if b"pdp.evidence.writer" not in handle.read():
                        continue
                with open(f"/proc/{child}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def stop(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            Path(self._config_path).unlink(missing_ok=True)

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tls_context(env: BenchEnv, device_id: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(env.ca_file))
    cert, key = env.device(device_id)
    context.load_cert_chain(str(cert), str(key))
    return context


def connect_client(env: BenchEnv, port: int, device_id: str, *, start_loop: bool = True) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(tls_context(env, device_id))
    client.max_inflight_messages_set(100)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if rc == 0 else None
    client.connect("127.0.0.1", port, keepalive=60)
    if start_loop:
        client.loop_start()
        if not connected.wait(120):
            raise RuntimeError(f"{device_id} not connected")
    return client


class Counter:
    """Messages seen by one subscriber, with (publisher, sequence) pairs to find losses and duplicates."""

    def __init__(self) -> None:
        self.count = 0
        self.seen: set[bytes] = set()
        self.duplicates = 0
        self.last = 0.0

    def on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        key = message.payload[:16]
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
        self.count += 1
        self.last = time.perf_counter()


def subscribe_all(clients: list[mqtt.Client], topic_filter: str, qos: int, broker: str = "") -> None:
    done = threading.Semaphore(0)
    acked: set[int] = set()
    for index, client in enumerate(clients):
        client.on_subscribe = lambda c, u, mid, codes, p, index=index: (acked.add(index), done.release())
        client.subscribe(topic_filter, qos)
    for _ in clients:
        if not done.acquire(timeout=30):
            missing = [f"#{i} ({'connected' if c.is_connected() else 'not connected'})"
                       for i, c in enumerate(clients) if i not in acked]
            raise RuntimeError(f"SUBACK missing from broker {broker or '?'} within 30 s for subscriber(s) "
                               f"{', '.join(missing)}")


def run_flow(broker: BrokerProcess, env: BenchEnv, pubs: int, subs: int, qos: int, per_pub: int,
             timeout: float = 120.0) -> dict[str, Any]:
    """Each of ``pubs`` publishers sends ``per_pub`` messages; each of ``subs`` subscribers should get all."""
    subscribers = [connect_client(env, broker.port, f"sub-{i}") for i in range(subs)]
    publishers = [connect_client(env, broker.port, f"pub-{i}") for i in range(pubs)]
    counters = [Counter() for _ in subscribers]
    for client, counter in zip(subscribers, counters):
        client.on_message = counter.on_message
    subscribe_all(subscribers, "sites/bench/#", qos, broker.mode)
    expected = pubs * subs * per_pub
    cpu0, child0, t0 = broker.cpu(), broker.children_cpu(), time.perf_counter()

    def publish(index: int, client: mqtt.Client) -> None:
        topic = f"sites/bench/pub-{index}/telemetry"
        infos = [client.publish(topic, f"{index:04d}:{seq:010d}".encode().ljust(64, b"."), qos) for seq in range(per_pub)]
        if qos:
            for info in infos:
                info.wait_for_publish(timeout)

    threads = [threading.Thread(target=publish, args=(i, c)) for i, c in enumerate(publishers)]
    for thread in threads:
        thread.start()
    deadline = t0 + timeout
    last_total, last_progress = -1, time.perf_counter()
    while True:
        total = sum(c.count for c in counters)
        now = time.perf_counter()
        if total >= expected or now > deadline or now - last_progress > 10:
            break
        if total != last_total:
            last_total, last_progress = total, now
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout)
    end = max((c.last for c in counters), default=t0)
    cpu1, child1 = broker.cpu(), broker.children_cpu()
    indexing = broker.settle()
    delivered = sum(len(c.seen) for c in counters)
    for client in subscribers + publishers:
        client.disconnect()
        client.loop_stop()
    seconds = max(end - t0, 1e-9)
    return {
        "pubs": pubs, "subs": subs, "qos": qos, "expected": expected, "delivered": delivered,
        "lost": expected - delivered, "duplicates": sum(c.duplicates for c in counters),
        "seconds": round(seconds, 3), "rate": round(delivered / seconds, 1),
        "broker_cpu_us_per_msg": round((cpu1 - cpu0) / max(delivered, 1) * 1e6, 1),
        "writer_cpu_us_per_msg": round((child1 - child0) / max(delivered, 1) * 1e6, 1),
        "index_cpu_us_per_msg": round(indexing / max(delivered, 1) * 1e6, 1),
    }


def _mosquitto_tls(env: BenchEnv, device_id: str) -> list[str]:
    cert, key = env.device(device_id)
    # --insecure: the server certificate names the bench host, not 127.0.0.1; the chain is still verified.
    return ["--cafile", str(env.ca_file), "--cert", str(cert), "--key", str(key), "--insecure"]


def run_flow_mosquitto(broker: BrokerProcess, env: BenchEnv, pubs: int, subs: int, qos: int, per_pub: int,
                       timeout: float = 120.0) -> dict[str, Any]:
    """``run_flow`` with Mosquitto's C clients: the paho load generator takes 0.5-0.9 of one of the two cores
    itself, so the broker is measured with a generator that leaves it the CPU. Subscribers write to files
    (no Python reads during the flow); the flow ends when each ``mosquitto_sub -C`` has its count."""
    out_dir = Path(tempfile.mkdtemp(prefix="flow-"))
    expected_each = pubs * per_pub
    subscribers = []
    for i in range(subs):
        with open(out_dir / f"sub-{i}.txt", "wb") as out:  # -oL: the SUBACK line is seen before traffic starts
            subscribers.append(subprocess.Popen(
                ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", f"sub-{i}",
                 "-V", "mqttv311", "-t", "sites/bench/#", "-q", str(qos), "-C", str(expected_each), "-d",
                 *_mosquitto_tls(env, f"sub-{i}")], stdout=out))
    publishers: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.perf_counter() + 30
        for i in range(subs):
            while b"SUBACK" not in (out_dir / f"sub-{i}.txt").read_bytes():
                if time.perf_counter() > deadline or subscribers[i].poll() is not None:
                    raise RuntimeError(f"mosquitto_sub sub-{i} not subscribed")
                time.sleep(0.005)
        lines = [b"".join(f"{i:04d}:{seq:010d}".encode().ljust(64, b".") + b"\n" for seq in range(per_pub))
                 for i in range(pubs)]
        cpu0, child0, t0 = broker.cpu(), broker.children_cpu(), time.perf_counter()
        for i in range(pubs):
            publishers.append(subprocess.Popen(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-i", f"pub-{i}", "-V", "mqttv311",
                 "-t", f"sites/bench/pub-{i}/telemetry", "-q", str(qos), "-l", "-M", "100",
                 *_mosquitto_tls(env, f"pub-{i}")], stdin=subprocess.PIPE))
        for publisher, data in zip(publishers, lines):
            assert publisher.stdin is not None
            publisher.stdin.write(data)
            publisher.stdin.close()
        end = t0
        for subscriber in subscribers:
            try:
                subscriber.wait(max(0.1, t0 + timeout - time.perf_counter()))
            except subprocess.TimeoutExpired:
                pass
            end = max(end, time.perf_counter())
        cpu1, child1 = broker.cpu(), broker.children_cpu()
        indexing = broker.settle()
    finally:
        for proc in subscribers + publishers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    delivered = duplicates = 0
    for i in range(subs):
        seen: set[bytes] = set()
        for line in (out_dir / f"sub-{i}.txt").read_bytes().splitlines():
            if line.startswith((b"Client ", b"Subscribed")):
                continue
            key = line[:15]
            if key in seen:
                duplicates += 1
            seen.add(key)
        delivered += len(seen)
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = max(end - t0, 1e-9)
    return {
        "pubs": pubs, "subs": subs, "qos": qos, "expected": pubs * subs * per_pub, "delivered": delivered,
        "lost": pubs * subs * per_pub - delivered, "duplicates": duplicates,
        "seconds": round(seconds, 3), "rate": round(delivered / seconds, 1),
        "broker_cpu_us_per_msg": round((cpu1 - cpu0) / max(delivered, 1) * 1e6, 1),
        "writer_cpu_us_per_msg": round((child1 - child0) / max(delivered, 1) * 1e6, 1),
        "index_cpu_us_per_msg": round(indexing / max(delivered, 1) * 1e6, 1),
    }
