"""deploy/ for production (issue 11): the hardened config starts and serves as written (paths moved under a
temporary root), the systemd units pass systemd-analyze, the container files are consistent, and
(where the machine has a Docker daemon) the compose file validates and the image builds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from pdp import pki
from pdp.runtime.config import PLUGIN_PATH, load_broker_config
from pdp.runtime.settings import ServiceSettings
from tests.support import TRUST_DOMAIN, BrokerProcess, Client, TestPki

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALLED = ("/etc/mqtt-pdp", "/var/lib/mqtt-pdp", "/run/mqtt-pdp")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def plugin_of(path: Path) -> dict[str, Any]:
    return load_broker_config(path, check_files=False)["plugins"][PLUGIN_PATH]


@pytest.mark.parametrize("config", ["production/broker.yaml", "container/broker.yaml", "broker.yaml"])
def test_every_shipped_config_uses_only_known_settings(config: str) -> None:
    plugin = plugin_of(DEPLOY / config)
    assert set(plugin) <= set(ServiceSettings.__dataclass_fields__), set(plugin) - set(ServiceSettings.__dataclass_fields__)
    settings = ServiceSettings(**plugin)
    settings.broker_limits()
    settings.pdp_settings()


def test_production_config_is_hardened() -> None:
    config = load_broker_config(DEPLOY / "production" / "broker.yaml", check_files=False)
    listener = config["listeners"]["default"]
    plugin = config["plugins"][PLUGIN_PATH]
    assert not listener["bind"].startswith(("0.0.0.0", "[::]", ":")) and listener["ssl"] is True
    assert plugin["require_client_certificate"] is True and plugin["allow_plain_tcp"] is False
    assert plugin["metrics"].startswith("127.0.0.1:") and plugin["admin_socket"].startswith("/run/")
    assert plugin["assertion_db"] and plugin["anchor_key_file"] and plugin["retention_days"] > 0 and plugin["crl"]
    assert plugin["redis_url"] and plugin["l2_key_file"] and plugin["node_id"] and plugin["log_format"] == "json"
    # every path is an installed one: nothing resolves into the checkout
    for value in [*listener.values(), *plugin.values()]:
        for path in value if isinstance(value, list) else [value]:
            if isinstance(path, str) and path.startswith("/"):
                assert path.startswith(INSTALLED), path


def test_production_config_runs_as_written(tmp_path: Path, shared_redis_url: str, redis_prefix: str) -> None:
    """The file with only its install root moved (and the bind, Redis and ports a test needs): it starts,
    admits a device, shows its status and stops cleanly."""
    root = tmp_path / "r"
    text = (DEPLOY / "production" / "broker.yaml").read_text()
    for prefix in INSTALLED:
        text = text.replace(prefix, str(root / prefix.strip("/").replace("/", "-")))
    config = yaml.safe_load(text)
    etc = root / "etc-mqtt-pdp"
    test_pki = TestPki(etc / "pki")
    shutil.copytree(ROOT / "policies", etc / "policies")
    (etc / "pki" / "ca.crl").write_bytes(pki.make_crl(test_pki.ca, []).public_bytes(Encoding.PEM))
    assert cli("l2-key", "--out", str(etc / "l2.key")).returncode == 0
    assert cli("log", "keygen", "--out", str(etc / "anchor.key")).returncode == 0
    (root / "run-mqtt-pdp").mkdir(mode=0o700)
    config["listeners"]["default"]["bind"] = "127.0.0.1:0"
    plugin = config["plugins"][PLUGIN_PATH]
    plugin.update(redis_url=shared_redis_url, redis_prefix=redis_prefix, metrics="127.0.0.1:0",
                  trust_domain=TRUST_DOMAIN, log_format="text", node_id=f"prod-{redis_prefix[-10:]}")
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli("check", "-c", str(path)).returncode == 0
    broker = BrokerProcess(path, tmp_path)
    try:
        sensor = Client(broker.port, "sensor-001", test_pki.device("sensor-001"), test_pki.ca_file)
        try:
            assert sensor.connect() == 0
            status = cli("status", "-c", str(path), "--json")
            assert status.returncode == 0, status
            data = json.loads(status.stdout)
            assert data["connections"] == 1 and data["redis"]["available"] is True
        finally:
            sensor.close()
    finally:
        assert broker.stop() == 0
    assert (root / "var-lib-mqtt-pdp" / "assertions.db").exists()


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    mqtt_pdp = Path(sys.executable).parent / "mqtt-pdp"
    if not mqtt_pdp.exists():
        pytest.skip(f"{mqtt_pdp} not installed (the units' ExecStart is pointed at it for the check)")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["mqtt-pdp-broker.service", "mqtt-pdp-log-drain.service"]
    for unit in units:  # the only change: the install path of the command, so that verify can check it exists
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/mqtt-pdp/venv/bin/mqtt-pdp", str(mqtt_pdp)))
    result = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / u.name) for u in units]],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result  # unknown keys are warnings: none allowed
    for unit in units:  # and the commands they run exist with those options
        for line in unit.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                args = line.split("=", 1)[1].split()[1:]
                assert cli(*args, "--help").returncode == 0, line


def test_container_files_are_consistent() -> None:
    container = DEPLOY / "container"
    dockerfile = (container / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source
    ignore = (container / "Dockerfile.dockerignore").read_text().split()
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M):
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source  # the context lets it in
    compose = yaml.safe_load((container / "compose.yaml").read_text())
    assert set(compose["services"]) == {"redis", "broker", "log-drain"}
    broker = compose["services"]["broker"]
    assert (container / broker["build"]["context"] / broker["build"]["dockerfile"]).resolve() == container / "Dockerfile"
    for volume in broker["volumes"]:
        host = volume.split(":")[0]
        if host.startswith("."):
            assert host in ("../pki", "../../policies"), host
    assert (container / "../../policies").resolve() == ROOT / "policies"
    assert all(port.startswith("127.0.0.1:") for port in broker["ports"])
    plugin = plugin_of(container / "broker.yaml")
    assert plugin["redis_url"] == "redis://redis:6379/0" and plugin["assertion_stream"] is True
    drain = compose["services"]["log-drain"]["command"]
    assert cli(*drain, "--help").returncode == 0


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def test_compose_config_validates() -> None:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("the docker compose plugin is not installed on this machine")
    result = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "container" / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_container_builds_and_starts() -> None:
    if not _docker_works():
        pytest.skip("no Docker daemon on this machine (docker info fails)")
    result = subprocess.run(["docker", "build", "-q", "-f", str(DEPLOY / "container" / "Dockerfile"), "-t",
                             "mqtt-pdp:test", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    version = subprocess.run(["docker", "run", "--rm", "mqtt-pdp:test", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("mqtt-pdp "), version
