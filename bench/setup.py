"""Shared bench fixtures: a PKI, policy files and broker configurations for the three broker modes."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdp import pki

ROOT = Path(__file__).resolve().parent.parent
TRUST_DOMAIN = "bench.example"
PLUGIN = "broker_plugin.plugin.DeviceAuthorizationPlugin"
# The load generators dial thousands of connections from one address and measure throughput, not the limits.
UNLIMITED = {"connect_rate": 1e6, "connect_burst": 10**6, "session_queue_messages": 10**7, "session_queue_bytes": 2**40}
MODES = ("bare", "acl", "ours", "ours-nolog")

BENCH_POLICY = """\
p, pub-telemetry, sensor, *, *, sites/{location}/{device_id}/telemetry, publish, allow
p, sub-cmd, sensor, *, *, sites/{location}/{device_id}/cmd, subscribe, allow
p, recv-cmd, sensor, *, *, sites/{location}/{device_id}/cmd, receive, allow
p, dash-sub, dashboard, *, *, sites/{location}/#, subscribe, allow
p, dash-recv, dashboard, *, *, sites/{location}/#, receive, allow
p, dash-cmd, dashboard, *, *, sites/{location}/+/cmd, publish, allow
p, no-secret, *, *, *, sites/+/secret/#, receive, deny
"""


@dataclass
class BenchEnv:
    dir: Path
    ca: pki.Issued

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def device(self, device_id: str) -> tuple[Path, Path]:
        cert, key = self.dir / "devices" / f"{device_id}.pem", self.dir / "devices" / f"{device_id}-key.pem"
        if not cert.exists():
            pki.issue_device(self.ca, device_id, TRUST_DOMAIN).write(cert, key)
        return cert, key


def make_env(directory: Path, devices: list[tuple[str, str]]) -> BenchEnv:
    """PKI, policy and a registry of (device_id, type) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("bench CA")
    ca.write(directory / "ca.pem", directory / "ca-key.pem")
    pki.issue_server(ca).write(directory / "server.pem", directory / "server-key.pem")
    shutil.copy(ROOT / "policies" / "model.conf", directory / "model.conf")
    (directory / "policy.csv").write_text(BENCH_POLICY)
    write_registry(directory / "devices.yaml", devices)
    return BenchEnv(directory, ca)


def write_registry(path: Path, devices: list[tuple[str, str]]) -> None:
    with path.open("w") as out:
        out.write("devices:\n")
        for device_id, dtype in devices:
            out.write(f"  - {{id: {device_id}, type: {dtype}, location: bench, purpose: load, owner: bench, status: active}}\n")


def broker_config(env: BenchEnv, mode: str, port: int = 0, **plugin: Any) -> dict[str, Any]:
    listener = {
        "type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True, "cafile": str(env.ca_file),
        "certfile": str(env.dir / "server.pem"), "keyfile": str(env.dir / "server-key.pem"),
    }
    anonymous = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    if mode == "bare":
        plugins: dict[str, Any] = anonymous
    elif mode == "acl":
        acl = {"anonymous": ["sites/#"]}
        plugins = {**anonymous, "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"acl": acl, "publish_acl": acl}}
    elif mode in ("ours", "ours-nolog"):
        node = f"bench-{uuid.uuid4().hex[:8]}"
        plugins = {PLUGIN: {
            "model": str(env.dir / "model.conf"), "policy": str(env.dir / "policy.csv"),
            "registry": str(env.dir / "devices.yaml"), "trust_domain": TRUST_DOMAIN,
            "assertions": mode == "ours", "assertion_db": str(env.dir / f"{node}.db"),
            "spool_dir": str(env.dir / "spool"), "node_id": node, **UNLIMITED, **plugin,
        }}
    else:
        raise ValueError(f"unknown broker mode {mode!r}")
    return {"listeners": {"default": listener}, "plugins": plugins}
