"""Test support: a real broker in a thread, real TLS certificates, real paho-mqtt clients.

Every wait is bounded; nothing here fakes the broker, TLS or the network.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from broker_plugin.broker import HardenedBroker
from broker_plugin.plugin import DeviceAuthorizationPlugin
from pdp import pki

T = TypeVar("T")
WAIT = 10.0
TRUST_DOMAIN = "test.example"
PLUGIN = "broker_plugin.plugin.DeviceAuthorizationPlugin"
V5_TO_V311_CONNACK = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass
class Credentials:
    cert: Path
    key: Path
    fingerprint: str


class TestPki:
    """A CA, a broker certificate and device certificates issued on demand into a directory."""

    __test__ = False

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = pki.make_ca("test CA")
        self.ca.write(directory / "ca.pem", directory / "ca-key.pem")
        pki.issue_server(self.ca).write(directory / "server.pem", directory / "server-key.pem")
        self._issued: dict[str, Credentials] = {}

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def save(self, name: str, issued: pki.Issued) -> Credentials:
        creds = Credentials(self.dir / f"{name}.pem", self.dir / f"{name}-key.pem", pki.fingerprint(issued))
        issued.write(creds.cert, creds.key)
        self._issued[name] = creds
        return creds

    def device(self, device_id: str) -> Credentials:
        if device_id not in self._issued:
            self.save(device_id, pki.issue_device(self.ca, device_id, TRUST_DOMAIN))
        return self._issued[device_id]


def broker_config(pki_: TestPki, policy_dir: Path, **plugin: Any) -> dict[str, Any]:
    settings = {
        "model": str(policy_dir / "model.conf"),
        "policy": str(policy_dir / "policy.csv"),
        "registry": str(policy_dir / "devices.yaml"),
        "trust_domain": TRUST_DOMAIN,
        "reload_interval": 0.1,
        "verify_with_casbin": True,
        "node_id": f"test-{uuid.uuid4().hex[:8]}",
        "assertion_db": str(policy_dir.parent / "assertions.db"),
        "spool_dir": str(policy_dir.parent / "spool"),
        "connect_rate": 10_000, "connect_burst": 10_000,  # every test client dials from 127.0.0.1
    }
    settings.update(plugin)
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": "127.0.0.1:0",
                "ssl": True,
                "cafile": str(pki_.ca_file),
                "certfile": str(pki_.dir / "server.pem"),
                "keyfile": str(pki_.dir / "server-key.pem"),
            },
        },
        "plugins": {PLUGIN: settings},
    }


class BrokerThread:
    """A real amqtt broker (ours or stock) on its own event loop thread and an ephemeral port."""

    def __init__(self, config: dict[str, Any], broker_class: type = HardenedBroker) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="broker", daemon=True)
        self.thread.start()
        self.broker = self.call(self._start(config, broker_class))
        self.ports = {
            name: server.instance.sockets[0].getsockname()[1] for name, server in self.broker._servers.items()
        }
        self.port = self.ports["default"]

    @staticmethod
    async def _start(config: dict[str, Any], broker_class: type) -> Any:
        broker = broker_class(config)
        await broker.start()
        return broker

    @staticmethod
    async def _dump_tasks() -> None:
        import sys as _sys

        for task in asyncio.all_tasks():
            task.print_stack(limit=6, file=_sys.stderr)

    @property
    def plugin(self) -> DeviceAuthorizationPlugin:
        return next(p for p in self.broker.plugins_manager.plugins if isinstance(p, DeviceAuthorizationPlugin))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = WAIT) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    def wait_reload(self, after: int, timeout: float = WAIT) -> None:
        """Wait until the plugin has made a reload attempt beyond ``after``."""
        plugin = self.plugin
        with plugin.service.reload_condition:
            if not plugin.service.reload_condition.wait_for(lambda: plugin.service.reload_attempts > after, timeout):
                raise AssertionError("no reload attempt within the bound")

    def stop(self) -> None:
        """Graceful shutdown (assertion records flushed); safe to call twice."""
        if not self.thread.is_alive():
            return
        try:
            self.call(self.broker.shutdown(), 30)
        except TimeoutError:
            self.call(self._dump_tasks())
            raise
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()  # its selector and self-pipe: three descriptors per broker otherwise


class Client:
    """A paho-mqtt client with waitable CONNACK, SUBACK, PUBACK and messages."""

    def __init__(
        self,
        port: int,
        client_id: str,
        creds: Credentials | None,
        ca_file: Path | None,
        *,
        clean: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
        tls: bool = True,
        keepalive: int = 30,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311
        )
        if tls:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if creds is not None:
                context.load_cert_chain(str(creds.cert), str(creds.key))
            self.client.tls_set_context(context)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: dict[int, list[int]] = {}
        self.unsubacks: set[int] = set()
        self.session_present: bool | None = None
        self._suback_cond = threading.Condition()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        # paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
        self.session_present = bool(flags.session_present)
        self.connack.put(V5_TO_V311_CONNACK.get(reason.value, reason.value))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        with self._suback_cond:
            self.subacks[mid] = [c.value for c in codes]
            self._suback_cond.notify_all()

    def connect(self, timeout: float = WAIT) -> int | None:
        """The CONNACK return code, or None when the connection ended without one (e.g. TLS refused)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        except (ssl.SSLError, OSError):
            return None
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.connack.get(timeout=0.05)
            except queue.Empty:
                if self.disconnected.is_set() and self.connack.empty():
                    return None
        raise AssertionError("neither CONNACK nor disconnect within the bound")

    def subscribe(self, topic_filter: str, qos: int = 0) -> int:
        """The SUBACK return code for one filter (0x80 = refused)."""
        result, mid = self.client.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._suback_cond:
            assert self._suback_cond.wait_for(lambda: mid in self.subacks, WAIT), "no SUBACK"
            return self.subacks[mid][0]

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._suback_cond:
            self.unsubacks.add(mid)
            self._suback_cond.notify_all()

    def unsubscribe(self, topic_filter: str) -> None:
        """UNSUBSCRIBE one filter and wait for its UNSUBACK."""
        result, mid = self.client.unsubscribe(topic_filter)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._suback_cond:
            assert self._suback_cond.wait_for(lambda: mid in self.unsubacks, WAIT), "no UNSUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def next_message(self, timeout: float = WAIT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no message within the bound") from None

    def messages_until(self, topic: str, timeout: float = WAIT) -> list[mqtt.MQTTMessage]:
        """Every message received up to and including the first one on ``topic``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic!r} within the bound; got {[m.topic for m in seen]}")
            message = self.next_message(remaining)
            seen.append(message)
            if message.topic == topic:
                return seen

    def drop(self) -> None:
        """End the TCP connection without DISCONNECT, as a crashed device would."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def wait_disconnected(self, timeout: float = WAIT) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Bounded wait for a condition the code under test exposes no event for."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.02)


class RedisServer:
    """A real redis-server of the test's own, on a free port, that a test may stop and start again."""

    def __init__(self, directory: Path, persistent: bool = False) -> None:
        import shutil

        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: Any = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.ping() or self.proc.poll() is not None, "redis-server answering")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class BrokerProcess:
    """``mqtt-pdp broker`` in its own process, as an operator runs it; its log lines can be awaited."""

    def __init__(self, config_path: Path, cwd: Path) -> None:
        import os
        import subprocess
        import sys

        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdp.cli", "broker", "-c", str(config_path)], cwd=cwd,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_line(r"listener default on \('[0-9.]+', (\d+)\)")
        import re

        match = re.search(r", (\d+)\)", line)
        assert match
        self.port = int(match.group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_line(self, pattern: str, timeout: float = WAIT) -> str:
        import re

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"broker never logged {pattern!r}; log so far:\n{''.join(self.log[-30:])}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.log.append(line)
            if re.search(pattern, line):
                return line

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(WAIT)
            except Exception:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def write_cli_config(path: Path, pki_: TestPki, policy_dir: Path, **plugin: Any) -> Path:
    """deploy/broker.yaml, pointed at the test's PKI and policy files and an ephemeral port."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "deploy" / "broker.yaml").read_text())
    config["listeners"]["default"].update(bind="127.0.0.1:0", cafile=str(pki_.ca_file),
                                          certfile=str(pki_.dir / "server.pem"), keyfile=str(pki_.dir / "server-key.pem"))
    settings = dict(model=str(policy_dir / "model.conf"), policy=str(policy_dir / "policy.csv"),
                    registry=str(policy_dir / "devices.yaml"), trust_domain=TRUST_DOMAIN, node_id=path.stem,
                    assertion_db=str(path.parent / "assertions.db"), spool_dir=str(path.parent / "spool"),
                    connect_rate=10_000, connect_burst=10_000,
                    admin_socket=str(path.parent / f"{path.stem}.sock"))  # one per config: two brokers may share a directory
    config["plugins"][PLUGIN].update({**settings, **plugin})
    path.write_text(yaml.safe_dump(config))
    return path
