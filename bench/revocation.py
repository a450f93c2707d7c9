"""Revocation at scale: one registry write suspends N connected, publishing devices.

Claim measured: "a registry change that revokes 1,000 connected devices leaves 0 decisions
made with stale attributes and all 1,000 disconnected within 1 s".

Set-up: ``mqtt-pdp broker`` in its own process (assertions on, the shipped reload interval),
N sensors connected over mTLS from raw asyncio TLS clients (one process, epoll: no fd limit
of select()), each subscribed to its own command topic and publishing telemetry at a steady,
bounded rate; a dashboard sends commands to them (so receives are judged too); a small control
group of sensors that stay active proves that decisions under the new revision are recorded and
allowed where they should be. Then one ``write_together`` of the registry (the path of
``mqtt-pdp apply``) sets the N devices to ``suspended``.

Measured: the time from the write to the broker's "policy reloaded" line (its own log timestamp),
the time until each revoked client sees its connection closed, and, from the assertion store after
a graceful stop, every publish/receive decision for a revoked device under the new revision
(allowed ones must be 0) and the 'disconnect' records with reason 'device suspended'.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import random
import re
import resource
import shutil
import signal
import sqlite3
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.setup import ROOT, TRUST_DOMAIN, UNLIMITED, BenchEnv, make_env
from pdp.evidence.store import uri_of
from pdp.runtime.sources import write_together

log = logging.getLogger("bench.revocation")

LOCATION = "bench"
TARGET_CLOSE_S = 1.0
CONNECT_TIMEOUT = 20.0
REVOCATION_REASON = "device suspended"


# -- a minimal MQTT 3.1.1 client on asyncio TLS streams ---------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _remaining_length(len(body)) + body


def connect_packet(client_id: str, keepalive: int) -> bytes:
    return _packet(0x10, _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _string(client_id))


def subscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + _string(topic_filter) + b"\x00")


def publish_packet(topic: str, payload: bytes) -> bytes:
    return _packet(0x30, _string(topic) + payload)


DISCONNECT = b"\xe0\x00"


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return first, await reader.readexactly(length)


@dataclass
class Device:
    """One device's connection: publishes on a schedule, counts what it receives, notes when it is closed."""

    device_id: str
    context: ssl.SSLContext
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    received: int = 0
    published: int = 0
    closed_at: float | None = None  # time.monotonic() when the client saw the connection end
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def connect(self, port: int, keepalive: int = 600) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.context, server_hostname="localhost")
        self.writer.write(connect_packet(self.device_id, keepalive))
        first, body = await _read_packet(self.reader)
        if first != 0x20 or body[1] != 0:
            raise RuntimeError(f"{self.device_id}: CONNACK {first:#x} {body!r}")
        self.writer.write(subscribe_packet(1, f"sites/{LOCATION}/{self.device_id}/cmd"))
        first, body = await _read_packet(self.reader)
        if first != 0x90 or body[2:] != b"\x00":
            raise RuntimeError(f"{self.device_id}: SUBACK {first:#x} {body!r}")

    def start(self, interval: float | None, rng: random.Random) -> None:
        self.tasks.append(asyncio.ensure_future(self._read_loop()))
        if interval is not None:
            self.tasks.append(asyncio.ensure_future(self._publish_loop(interval, rng.uniform(0, interval))))

    async def _read_loop(self) -> None:
        assert self.reader is not None
        try:
            while True:
                first, _ = await _read_packet(self.reader)
                if first >> 4 == 3:
                    self.received += 1
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            if self.closed_at is None:
                self.closed_at = time.monotonic()

    async def _publish_loop(self, interval: float, phase: float) -> None:
        await asyncio.sleep(phase)
        topic = f"sites/{LOCATION}/{self.device_id}/telemetry"
        next_at = time.monotonic()
        while self.closed_at is None:
            if not self.send(publish_packet(topic, b"t" * 32)):
                return
            self.published += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def send(self, data: bytes) -> bool:
        writer = self.writer
        if writer is None or self.closed_at is not None or writer.transport.is_closing():
            return False
        writer.write(data)
        return True

    async def close(self) -> None:
        for task in self.tasks[1:]:
            task.cancel()
        if self.send(DISCONNECT):
            await asyncio.sleep(0)
        if self.writer is not None:
            self.writer.transport.abort()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- the broker under test: mqtt-pdp broker in its own process, its log lines timestamped --------------


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float | None:
    """The wall-clock time (epoch seconds) of a log line of ``mqtt-pdp broker``, to the millisecond."""
    match = _LOG_TIME.match(line)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


class CliBroker:
    """``python -m pdp.cli broker -c CONFIG``, as an operator runs it; stopped with SIGTERM (graceful)."""

    def __init__(self, config: Path, cwd: Path, timeout: float = 30.0) -> None:
        # The log goes to a file, not a pipe: 1,000 'session revoked' lines would fill a pipe and the broker
        # would then wait on this (busy) process to read them, which is not what an operator's broker does.
        self.log_path = cwd / "broker.log"
        self._log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdp.cli", "broker", "-c", str(config)], cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log_file,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name="broker-log")
        self._reader.start()
        line = self.wait_line(r"listener default on \('[0-9.]+', (\d+)\)", timeout)
        self.port = int(re.search(r", (\d+)\)", line).group(1))  # type: ignore[union-attr]

    def _read(self) -> None:
        """Follow the log file until the broker has exited and everything it wrote was read."""
        with self.log_path.open() as handle:
            partial = ""
            while True:
                chunk = handle.readline()
                if chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        self._new.put(partial)
                        partial = ""
                    continue
                if self._stopped.is_set():
                    return
                time.sleep(0.01)

    def wait_line(self, pattern: str, timeout: float) -> str:
        """The next line matching ``pattern`` (lines before it are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._new.empty()):
                tail = "".join(self.lines[-20:])
                raise RuntimeError(f"broker never logged {pattern!r} within {timeout} s; last lines:\n{tail}")
            try:
                line = self._new.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def cpu(self) -> float:
        """The broker's user + system CPU seconds so far."""
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def drain(self) -> None:
        while True:
            try:
                self.lines.append(self._new.get_nowait())
            except queue.Empty:
                return

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("broker did not stop within %.0f s of SIGTERM; killed", timeout)
                self.proc.kill()
                self.proc.wait(10)
        self._stopped.set()
        self._reader.join(10)
        self._log_file.close()
        self.drain()
        return self.proc.returncode


def write_config(path: Path, env: BenchEnv, reload_interval: float) -> Path:
    """deploy/broker.yaml, pointed at the bench PKI, policy and registry, an ephemeral port and its own store."""
    config = yaml.safe_load((ROOT / "deploy" / "broker.yaml").read_text())
    config["listeners"]["default"].update(bind="127.0.0.1:0", cafile=str(env.ca_file),
                                          certfile=str(env.dir / "server.pem"), keyfile=str(env.dir / "server-key.pem"))
    config["plugins"]["broker_plugin.plugin.DeviceAuthorizationPlugin"].update(
        model=str(env.dir / "model.conf"), policy=str(env.dir / "policy.csv"), registry=str(env.dir / "devices.yaml"),
        trust_domain=TRUST_DOMAIN, node_id="revocation-bench", reload_interval=reload_interval,
        assertion_db=str(path.parent / "assertions.db"), spool_dir=str(path.parent / "spool"), **UNLIMITED)
    path.write_text(yaml.safe_dump(config))
    return path


def registry_text(devices: list[tuple[str, str, str]]) -> str:
    """(device_id, type, status) as the registry file."""
    lines = ["devices:"]
    for device_id, dtype, status in devices:
        lines.append(f"  - {{id: {device_id}, type: {dtype}, location: {LOCATION}, purpose: load, owner: bench, "
                     f"status: {status}}}")
    return "\n".join(lines) + "\n"


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``needed`` (the broker process inherits it); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE to %d: %s", target, exc)
    return soft


# -- the run ------------------------------------------------------------------------------------------


def _tls_context(env: BenchEnv, device_id: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(env.ca_file))
    cert, key = env.device(device_id)
    context.load_cert_chain(str(cert), str(key))
    return context


async def _connect_all(devices: list[Device], port: int, parallel: int = 32) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(device: Device) -> None:
        async with gate:
            await asyncio.wait_for(device.connect(port), CONNECT_TIMEOUT)

    await asyncio.gather(*(one(d) for d in devices))


async def _command_loop(dashboard: Device, targets: list[str], rate: float, stop: asyncio.Event) -> int:
    """The dashboard sends commands round-robin to ``targets`` at ``rate`` messages/s; the number sent."""
    sent, index = 0, 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        target = targets[index % len(targets)]
        index += 1
        if not dashboard.send(publish_packet(f"sites/{LOCATION}/{target}/cmd", b"c" * 16)):
            break
        sent += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def _loop_lag(samples: list[tuple[float, float]], stop: asyncio.Event, period: float = 0.005) -> None:
    """How late this (client) event loop wakes up: a close it sees late may have happened earlier."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(period)
        after = time.monotonic()
        samples.append((after, after - before - period))


async def _scenario(env: BenchEnv, broker: CliBroker, revoked_ids: list[str], control_ids: list[str],
                    share: float, rate: float, command_rate: float, warmup: float, close_timeout: float,
                    seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    revoked = [Device(d, _tls_context(env, d)) for d in revoked_ids]
    control = [Device(d, _tls_context(env, d)) for d in control_ids]
    dashboard = Device("dash-0", _tls_context(env, "dash-0"))
    everyone = [dashboard, *control, *revoked]
    stop_commands = asyncio.Event()
    try:
        t_connect = time.monotonic()
        await _connect_all(everyone, broker.port)
        connect_s = time.monotonic() - t_connect
        publishing = set(rng.sample(revoked_ids, round(len(revoked_ids) * share)))
        dashboard.start(None, rng)
        for device in control:
            device.start(1.0 / rate, rng)
        for device in revoked:
            device.start(1.0 / rate if device.device_id in publishing else None, rng)
        commands = asyncio.ensure_future(_command_loop(dashboard, control_ids + revoked_ids, command_rate, stop_commands))
        lag: list[tuple[float, float]] = []
        lag_task = asyncio.ensure_future(_loop_lag(lag, stop_commands))
        cpu0, t0 = broker.cpu(), time.monotonic()
        await asyncio.sleep(warmup)
        broker_cpu = (broker.cpu() - cpu0) / (time.monotonic() - t0)
        received_before = sum(d.received for d in revoked)
        published_before = sum(d.published for d in revoked)
        early = [d.device_id for d in revoked if d.closed_at is not None]
        if early:
            raise RuntimeError(f"{len(early)} devices lost their connection before the change, e.g. {early[:3]}")

        registry = env.dir / "devices.yaml"
        new = registry_text([("dash-0", "dashboard", "active")] + [(d, "sensor", "active") for d in control_ids]
                            + [(d, "sensor", "suspended") for d in revoked_ids])
        loop = asyncio.get_running_loop()
        write_wall, write_mono = time.time(), time.monotonic()
        await loop.run_in_executor(None, write_together, {str(registry): new.encode()})
        write_done_s = time.monotonic() - write_mono

        deadline = write_mono + close_timeout
        while any(d.closed_at is None for d in revoked) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        still_open = [d.device_id for d in revoked if d.closed_at is None]
        await asyncio.sleep(1.0)  # the control group goes on under the new revision
        stop_commands.set()
        commands_sent = await asyncio.wait_for(commands, 5)
        await asyncio.wait_for(lag_task, 5)
        last_close = max((d.closed_at for d in revoked if d.closed_at is not None), default=write_mono)
        window = [late for at, late in lag if write_mono <= at <= last_close + 0.01]
        control_closed = [d.device_id for d in control if d.closed_at is not None]
        closes = sorted(d.closed_at - write_mono for d in revoked if d.closed_at is not None)
        return {
            "client_loop_lag_max_s": round(max(window, default=0.0), 3),
            "connect_s": round(connect_s, 2), "broker_cpu_share_before": round(broker_cpu, 2),
            "write_wall": write_wall, "write_call_s": round(write_done_s, 4),
            "closes": closes, "still_open": still_open, "control_closed": control_closed,
            "publishing_devices": len(publishing), "published_before_change": published_before,
            "commands_received_before_change": received_before, "commands_sent": commands_sent,
            "control_received": sum(d.received for d in control),
        }
    finally:
        stop_commands.set()
        await asyncio.gather(*(d.close() for d in everyone), return_exceptions=True)


def _store_counts(db: Path, revoked: set[str], control: set[str], new_revision: str) -> dict[str, Any]:
    """What the assertion store says about the revoked devices and the control group."""
    connection = sqlite3.connect(uri_of(db, "mode=ro"), uri=True)
    try:
        rows = connection.execute(
            "SELECT device_id, action, decision, policy_revision = ?, reason, count(*) FROM records "
            "WHERE action IN ('publish', 'receive', 'disconnect') GROUP BY 1, 2, 3, 4, 5", (new_revision,)).fetchall()
    finally:
        connection.close()
    out = {"stale_allows": 0, "denied_after": 0, "allowed_before": 0, "disconnect_records": 0,
           "other_disconnects": 0, "control_allowed_after": 0, "control_denied_after": 0}
    by_action: dict[str, int] = {}
    for device_id, action, decision, is_new, reason, count in rows:
        if device_id in revoked:
            if action == "disconnect":
                key = "disconnect_records" if reason == REVOCATION_REASON and is_new else "other_disconnects"
                out[key] += count
            elif is_new and decision == "allow":
                out["stale_allows"] += count
                by_action[f"{action}_allow_after"] = by_action.get(f"{action}_allow_after", 0) + count
            elif is_new:
                out["denied_after"] += count
                by_action[f"{action}_deny_after"] = by_action.get(f"{action}_deny_after", 0) + count
            elif decision == "allow":
                out["allowed_before"] += count
        elif device_id in control and is_new and action != "disconnect":
            out["control_allowed_after" if decision == "allow" else "control_denied_after"] += count
    out["by_action"] = by_action
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(workdir: Path, devices: int = 1000, share: float = 1.0, rate: float = 1.0, control: int = 20,
        command_rate: float = 100.0, warmup: float = 3.0, reload_interval: float = 0.5,
        close_timeout: float = 30.0, seed: int = 7) -> dict[str, Any]:
    """One revocation of ``devices`` connected devices; ``share`` of them publish ``rate`` messages/s each."""
    work = workdir / "revocation"
    if work.exists():
        shutil.rmtree(work)
    revoked_ids = [f"dev-{i:05d}" for i in range(devices)]
    control_ids = [f"ctl-{i:03d}" for i in range(control)]
    fd_limit = raise_fd_limit(2 * (devices + control) + 256)
    env = make_env(work / "env", [])
    (env.dir / "devices.yaml").write_text(registry_text(
        [("dash-0", "dashboard", "active")] + [(d, "sensor", "active") for d in control_ids + revoked_ids]))
    config = write_config(work / "broker.yaml", env, reload_interval)
    broker = CliBroker(config, work)
    try:
        outcome = asyncio.run(asyncio.wait_for(
            _scenario(env, broker, revoked_ids, control_ids, share, rate, command_rate, warmup, close_timeout, seed),
            timeout=close_timeout + warmup + 120 + devices * 0.1))
        reload_line = broker.wait_line(r"policy reloaded: revision", timeout=5)
    finally:
        code = broker.stop()
    new_revision = re.search(r"revision (\S+) ", reload_line).group(1)  # type: ignore[union-attr]
    reload_at = log_time(reload_line)
    rebuild = re.search(r"in ([0-9.]+) s", reload_line)
    revoked_lines = [t for t in (log_time(line) for line in broker.lines if "session revoked:" in line) if t is not None]
    counts = _store_counts(work / "assertions.db", set(revoked_ids), set(control_ids), new_revision)
    closes = outcome.pop("closes")
    write_wall = outcome.pop("write_wall")
    result: dict[str, Any] = {
        "devices": devices, "control_devices": control, "publish_rate_per_device": rate, "command_rate": command_rate,
        "reload_interval_s": reload_interval, "broker_exit_code": code, "fd_limit": fd_limit,
        "new_revision": new_revision,
        "reload_logged_s": round(reload_at - write_wall, 3) if reload_at is not None else None,
        "rebuild_s": float(rebuild.group(1)) if rebuild else None,
        "revoked_logged_first_s": round(min(revoked_lines) - write_wall, 3) if revoked_lines else None,
        "revoked_logged_last_s": round(max(revoked_lines) - write_wall, 3) if revoked_lines else None,
        "disconnected": len(closes),
        "last_close_s": round(closes[-1], 3) if closes else None,
        "first_close_s": round(closes[0], 3) if closes else None,
        "close_p50_s": round(statistics.median(closes), 3) if closes else None,
        "close_p99_s": round(_pct(closes, 0.99), 3) if closes else None,  # type: ignore[arg-type]
        **outcome, **counts,
    }
    result["still_open"] = len(result["still_open"])
    result["control_closed"] = len(result["control_closed"])
    result["ok"] = (result["stale_allows"] == 0 and result["disconnected"] == devices
                    and result["disconnect_records"] == devices and result["control_closed"] == 0)
    shutil.rmtree(work, ignore_errors=True)
    return result


def table(result: dict[str, Any]) -> str:
    n = result["devices"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    rows = [
        ("write -> 'policy reloaded' logged", f"(poll {result['reload_interval_s']} s)", seconds(result["reload_logged_s"])),
        ("  of which snapshot rebuild", "", seconds(result["rebuild_s"])),
        ("write -> 'session revoked' logged, first/last", "",
         f"{seconds(result['revoked_logged_first_s'])} / {seconds(result['revoked_logged_last_s'])}"),
        (f"write -> last of {n} closed (client)", f"<= {TARGET_CLOSE_S:.3f} s", seconds(result["last_close_s"])),
        ("  per-client close p50 / p99", "", f"{seconds(result['close_p50_s'])} / {seconds(result['close_p99_s'])}"),
        ("  first close", "", seconds(result["first_close_s"])),
        ("  client loop lag, worst (bench side)", "", seconds(result["client_loop_lag_max_s"])),
        ("revoked devices disconnected", f"{n}", f"{result['disconnected']}"),
        ("allowed pub/recv, new revision, revoked", "0", f"{result['stale_allows']}"),
        ("denied pub/recv, new revision, revoked", "", f"{result['denied_after']}"),
        ("'disconnect' records 'device suspended'", f"{n}", f"{result['disconnect_records']}"),
        ("control devices closed / allowed after", "0 / > 0",
         f"{result['control_closed']} / {result['control_allowed_after']}"),
        ("allowed pub/recv before (positive control)", "> 0", f"{result['allowed_before']}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'target':>12}  {'measured':>17}"]
    lines += [f"{name:{width}}  {target:>12}  {measured:>17}" for name, target, measured in rows]
    lines.append(f"{n} devices ({result['publishing_devices']} publishing {result['publish_rate_per_device']:g} msg/s "
                 f"each, commands {result['command_rate']:g} msg/s), {result['control_devices']} control devices; "
                 f"connected in {result['connect_s']:.1f} s; broker CPU before the change "
                 f"{result['broker_cpu_share_before']:.0%} of a core; {'OK' if result['ok'] else 'CLAIM NOT MET'}")
    return "\n".join(lines)
