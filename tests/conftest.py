from __future__ import annotations

import builtins
import gc
import logging
import threading
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import BrokerThread, Client, RedisServer, TestPki, broker_config

ROOT = Path(__file__).resolve().parent.parent


def _serialised_compile() -> None:
    """One ``compile`` at a time in the test process.

    CPython 3.11 keeps the AST builder's recursion depth per interpreter, not per thread. The tests run
    brokers in threads beside pytest, and Python 3.11 formats a traceback with ``ast.parse`` (to place its
    carets): a broker logging a traceback while pytest imported a module (assertion rewriting), or a
    garbage collection during a parse running a finalizer that logs one ("Task was destroyed but it is
    pending!"), raised ``SystemError: AST constructor recursion depth mismatch``; once at the end of a
    run, which failed the whole run. The broker's own Casbin use no longer compiles per request
    (pdp.policy.oracle._parsing_once); this covers everything else in the test process.
    """
    original = builtins.compile
    lock = threading.RLock()

    def compile(*args: Any, **kwargs: Any) -> Any:  # noqa: A001 - the builtin, serialised
        with lock:
            collecting = gc.isenabled()
            gc.disable()  # a collection inside would run finalizers that log tracebacks: a nested parse
            try:
                return original(*args, **kwargs)
            finally:
                if collecting:
                    gc.enable()

    builtins.compile = compile


_serialised_compile()

TEST_POLICY = """\
# rules for the integration tests
p, sensor-pub, sensor, *, *, sites/{location}/{device_id}/telemetry, publish, allow
p, sensor-will, sensor, *, *, sites/{location}/{device_id}/status, publish, allow
p, sensor-sub-cmd, sensor, *, *, sites/{location}/{device_id}/cmd, subscribe, allow
p, sensor-recv-cmd, sensor, *, *, sites/{location}/{device_id}/cmd, receive, allow
p, dash-sub, dashboard, *, *, sites/{location}/#, subscribe, allow
p, dash-recv, dashboard, *, *, sites/{location}/#, receive, allow
p, dash-cmd, dashboard, *, *, sites/{location}/+/cmd, publish, allow
p, no-secret, *, *, *, sites/+/secret/#, receive, deny
p, lab-sub, lab, *, *, a/+, subscribe, allow
p, lab-recv, lab, *, *, a/#, receive, allow
p, lab-pub, lab, *, *, a/#, publish, allow
p, watcher-sub, watcher, *, *, a/#, subscribe, allow
p, watcher-recv, watcher, *, *, a/#, receive, allow
p, no-a-secret, *, *, *, a/secret, receive, deny
p, root-sub, root, *, *, #, subscribe, allow
p, root-recv, root, *, *, #, receive, allow
p, root-pub, root, *, *, #, publish, allow
p, sys-sub, sysmon, *, *, $SYS/#, subscribe, allow
p, sys-recv, sysmon, *, *, $SYS/#, receive, allow
"""

DEVICES = [
    ("sensor-1", "sensor", "plant-a", "active"),
    ("sensor-2", "sensor", "plant-b", "active"),
    ("dash-1", "dashboard", "plant-a", "active"),
    ("lab-1", "lab", "lab", "active"),
    ("watcher-1", "watcher", "lab", "active"),
    ("root-1", "root", "hq", "active"),
    ("root-2", "root", "hq", "active"),
    ("sysmon-1", "sysmon", "hq", "active"),
    ("suspended-1", "sensor", "plant-a", "suspended"),
    ("retired-1", "sensor", "plant-a", "retired"),
    ("provisioned-1", "sensor", "plant-a", "provisioned"),
]


def registry_yaml(devices: list[tuple[str, str, str, str]], bound: dict[str, str] | None = None) -> str:
    lines = ["devices:"]
    for device_id, dtype, location, status in devices:
        lines += [
            f"  - id: {device_id}",
            f"    type: {dtype}",
            f"    location: {location}",
            "    purpose: test",
            "    owner: qa",
            f"    status: {status}",
        ]
        if bound and device_id in bound:
            lines.append(f"    fingerprints: [\"{bound[device_id]}\"]")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def policy_dir(tmp_path: Path, test_pki: TestPki) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    shutil.copy(ROOT / "policies" / "model.conf", directory / "model.conf")
    (directory / "policy.csv").write_text(TEST_POLICY)
    bound = {"bound-1": test_pki.device("bound-1").fingerprint}
    (directory / "devices.yaml").write_text(
        registry_yaml(DEVICES + [("bound-1", "sensor", "plant-a", "active")], bound)
    )
    return directory


@pytest.fixture
def make_broker(test_pki: TestPki, policy_dir: Path) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def make(broker_class: type | None = None, config: dict[str, Any] | None = None, **plugin: Any) -> BrokerThread:
        cfg = config or broker_config(test_pki, policy_dir, **plugin)
        thread = BrokerThread(cfg, broker_class) if broker_class else BrokerThread(cfg)
        started.append(thread)
        return thread

    yield make
    for thread in started:
        plugin = thread.plugin
        thread.stop()
        # Casbin's enforce gave the same decision and deciding rule as the PDP on every request.
        assert plugin.service.pdp.casbin_mismatches == 0


@pytest.fixture
def broker_settings() -> dict[str, Any]:
    """Plugin settings of the `broker` fixture; a test module may override this fixture."""
    return {}


@pytest.fixture
def broker_class() -> type | None:
    """The broker the `broker` fixture runs (None: HardenedBroker); a test may parametrize it."""
    return None


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread], broker_settings: dict[str, Any], broker_class: type | None) -> BrokerThread:
    return make_broker(broker_class, **broker_settings)


@pytest.fixture
def connect(broker: BrokerThread, test_pki: TestPki) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(device: str, client_id: str | None = None, *, expect: int | None = 0, port: int | None = None,
             creds: Any = "auto", **kwargs: Any) -> Client:
        credentials = test_pki.device(device) if creds == "auto" else creds
        client = Client(port or broker.port, device if client_id is None else client_id, credentials, test_pki.ca_file, **kwargs)
        clients.append(client)
        rc = client.connect()
        if expect is not None or rc is not None:
            assert rc == expect, f"{device}: CONNACK {rc}, expected {expect}"
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def connect_to(test_pki: TestPki) -> Iterator[Callable[..., Client]]:
    """Connect a device to a broker the test made itself (``make_broker``); closed afterwards."""
    clients: list[Client] = []

    def make(broker: BrokerThread, device: str, client_id: str | None = None, *, expect: int | None = 0,
             **kwargs: Any) -> Client:
        client = Client(broker.port, client_id or device, test_pki.device(device), test_pki.ca_file, **kwargs)
        clients.append(client)
        rc = client.connect()
        assert rc == expect, f"{device}: CONNACK {rc}, expected {expect}"
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def refused_reason(caplog: pytest.LogCaptureFixture) -> Callable[[str], str]:
    """The reason the broker logged for refusing a client id's connect."""
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.service")

    def reason(client_id: str) -> str:
        for record in caplog.records:
            message = record.getMessage()
            if message.startswith(f"connect refused: client={client_id} "):
                return message.split(" reason=", 1)[1]
        raise AssertionError(f"no refusal logged for {client_id}")

    return reason


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis if one answers (MQTT_PDP_TEST_REDIS or 127.0.0.1:6379), else one of our own."""
    import redis

    url = os.environ.get("MQTT_PDP_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
        yield url
        return
    except redis.RedisError:
        pass
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(shared_redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"mqtt-pdp-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(shared_redis_url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _quiet_libraries() -> None:
    logging.getLogger("casbin").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)

