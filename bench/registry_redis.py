"""The Redis registry at fleet size: broker start, one change applied everywhere, memory per device.

    python -m bench.registry_redis [--devices 100000] [--rounds 5] [--redis URL]

Real processes throughout: a redis-server of its own (unless --redis), two ``mqtt-pdp broker``
processes following the registry, paho clients over TLS. Measured:

* import: ``RedisRegistryStore.replace_all`` of N devices;
* start: exec of ``mqtt-pdp broker`` to its "listener default on" line, registry loaded from Redis;
* RSS once listening, and the same broker with a 10-device registry: (difference) / N per device;
* propagation: one device suspended in Redis (the CLI's write: HSET, INCR, PUBLISH in one script)
  until the live session of that device is closed on *each* of the two brokers (paho's
  on_disconnect), per round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import paho.mqtt.client as mqtt
import yaml

from pdp import pki
from pdp.registry import lifecycle
from pdp.registry.device import Device
from pdp.registry.redis_registry import RedisRegistryStore

ROOT = Path(__file__).resolve().parent.parent
TRUST = "bench.example"
POLICY = "p, tel, sensor, *, *, sites/{location}/{device_id}/telemetry, publish, allow\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleet(count: int) -> list[Device]:
    return [Device(f"dev-{i:06d}", "sensor", f"plant-{i % 200:03d}", "telemetry", f"team-{i % 50:02d}", "active")
            for i in range(count)]


class Broker:
    def __init__(self, config: Path, cwd: Path) -> None:
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "pdp.cli", "broker", "-c",
                                      str(config)], cwd=cwd, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: Queue[str] = Queue()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            match = re.search(r"listener default on \('[0-9.]+', (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
        self.start_s = time.perf_counter() - started

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def config(path: Path, pki_dir: Path, policy_dir: Path, url: str, prefix: str) -> Path:
    settings = {"model": str(ROOT / "policies" / "model.conf"), "policy": str(policy_dir / "policy.csv"),
                "registry": url, "redis_prefix": prefix, "trust_domain": TRUST, "reload_interval": 3600,
                "assertions": False, "node_id": path.stem}
    data = {"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0", "ssl": True,
                                      "cafile": str(pki_dir / "ca.pem"), "certfile": str(pki_dir / "server.pem"),
                                      "keyfile": str(pki_dir / "server-key.pem")}},
            "plugins": {"broker_plugin.plugin.DeviceAuthorizationPlugin": settings}}
    path.write_text(yaml.safe_dump(data))
    return path


def session(port: int, device_id: str, pki_dir: Path) -> tuple[mqtt.Client, threading.Event]:
    context = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
    context.load_cert_chain(str(pki_dir / f"{device_id}.pem"), str(pki_dir / f"{device_id}-key.pem"))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(context)
    connected, closed = threading.Event(), threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if rc == 0 else None
    client.on_disconnect = lambda c, u, f, rc, p: closed.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{device_id} not admitted on port {port}")
    return client, closed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry_redis", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default="", help="Redis URL (default: a redis-server of its own)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    redis_proc = None
    url = args.redis
    if not url:
        port = free_port()
        redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        time.sleep(0.3)
    prefix = f"bench-{os.getpid()}"
    brokers: list[Broker] = []
    clients: list[mqtt.Client] = []
    try:
        ca = pki.make_ca("bench CA")
        ca.write(work / "ca.pem", work / "ca-key.pem")
        pki.issue_server(ca).write(work / "server.pem", work / "server-key.pem")
        devices = fleet(args.devices)
        measured = [devices[i * (len(devices) // args.rounds)] for i in range(args.rounds)]
        for device in measured:
            pki.issue_device(ca, device.device_id, TRUST).write(work / f"{device.device_id}.pem",
                                                                work / f"{device.device_id}-key.pem")
        (work / "policy.csv").write_text(POLICY)
        store = RedisRegistryStore(url, prefix, timeout=60)
        started = time.perf_counter()
        store.replace_all(devices)
        import_s = time.perf_counter() - started
        small = RedisRegistryStore(url, prefix + "-small")
        small.replace_all(devices[:10])
        baseline = Broker(config(work / "small.yaml", work, work, url, prefix + "-small"), work)
        time.sleep(1.0)
        baseline_rss = baseline.rss_mb()
        baseline.stop()
        for name in ("a", "b"):
            brokers.append(Broker(config(work / f"{name}.yaml", work, work, url, prefix), work))
        time.sleep(1.0)
        rss = [b.rss_mb() for b in brokers]
        propagation: list[float] = []
        for device in measured:
            closed = []
            for broker in brokers:
                client, event = session(broker.port, device.device_id, work)
                clients.append(client)
                closed.append(event)
            t0 = time.perf_counter()
            store.put([lifecycle.change_status(device, "suspend")])
            for event in closed:
                if not event.wait(30):
                    raise RuntimeError(f"{device.device_id}: session not cut within 30 s")
            propagation.append(time.perf_counter() - t0)
        result = {
            "devices": args.devices, "import_s": round(import_s, 2),
            "start_s": [round(b.start_s, 2) for b in brokers],
            "rss_mb": [round(r, 1) for r in rss], "baseline_rss_mb_10_devices": round(baseline_rss, 1),
            "bytes_per_device": round((statistics.mean(rss) - baseline_rss) * 1024 * 1024 / args.devices),
            "propagation_s_both_brokers": [round(p, 3) for p in propagation],
            "propagation_max_s": round(max(propagation), 3),
        }
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        store.client.delete(*[k for k in store.client.scan_iter(f"{prefix}*")])
        store.close()
        small.close()
    finally:
        for client in clients:
            client.loop_stop()
        for broker in brokers:
            broker.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
