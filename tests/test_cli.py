"""The mqtt-pdp command as a user runs it: one clear line and a non-zero exit for every bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import BrokerProcess, Client, TestPki, write_cli_config

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdp.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mqtt-pdp: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["broker"], ["pki"], ["check"], ["explain"], ["log"], ["log", "query"],
                                     ["log", "stats"], ["log", "verify"], ["log", "prune"], ["log", "drain"]])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    usage = " ".join(["usage: mqtt-pdp", *command]) + " "
    assert result.stdout.startswith(usage + "[-h]"), result.stdout.splitlines()[0]


def test_check_example_policy() -> None:
    result = run("check", "--model", "policies/model.conf", "--policy", "policies/policy.csv",
                 "--registry", "policies/devices.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert re.fullmatch(r"ok: policies/policy\.csv: 11 rules \(revision [0-9a-f]{12}\)", lines[0])
    assert re.fullmatch(r"ok: policies/devices\.yaml: 6 devices \(4 active, 1 retired, 1 suspended\) "
                        r"\(revision [0-9a-f]{12}\)", lines[1])


def test_check_reports_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "policy.csv"
    bad.write_text("p, r1, *, *, *, a/#, publish, allow\np, r2, *, *, *, a/#/b, publish, allow\n")
    assert_one_line_error(run("check", "--policy", str(bad)), f"{bad}:2: filter 'a/#/b'")
    assert_one_line_error(run("check", "--registry", str(tmp_path / "none.yaml")), "cannot read registry")
    broken = tmp_path / "broker.yaml"
    broken.write_text("listeners: [\n")
    assert_one_line_error(run("check", "-c", str(broken)), "invalid YAML")


# explain: tests/test_toolkit_explain.py


def _sha256(out: Path, device: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate((out / "devices" / f"{device}.pem").read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def test_pki_creates_and_reuses_ca(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = run("pki", "--out", str(out), "--device", "dev-1", "--trust-domain", "t.example")
    assert result.returncode == 0, result.stderr
    ca = (out / "ca.pem").read_bytes()
    assert (out / "devices" / "dev-1.pem").exists() and (out / "server-key.pem").stat().st_mode & 0o077 == 0
    assert result.stdout.splitlines() == [
        f"created CA {out / 'ca.pem'} and broker certificate {out / 'server.pem'}",
        f"device dev-1: {out / 'devices' / 'dev-1.pem'} (spiffe://t.example/device/dev-1, sha256 {_sha256(out, 'dev-1')})",
    ]
    result = run("pki", "--out", str(out), "--device", "dev-2")
    assert result.returncode == 0 and (out / "ca.pem").read_bytes() == ca
    assert result.stdout.splitlines() == [
        f"using CA {out / 'ca.pem'}",
        f"device dev-2: {out / 'devices' / 'dev-2.pem'} (spiffe://example.org/device/dev-2, sha256 {_sha256(out, 'dev-2')})",
    ]
    assert_one_line_error(run("pki", "--out", str(out), "--device", "a/b"), "device id 'a/b' contains '/'")
    (out / "ca.pem").write_text("garbage")
    assert_one_line_error(run("pki", "--out", str(out), "--device", "dev-3"), "cannot use existing CA")


def test_broker_bad_inputs(tmp_path: Path) -> None:
    assert_one_line_error(run("broker", "-c", str(tmp_path / "missing.yaml")), "cannot read broker config")
    config = yaml.safe_load((ROOT / "deploy" / "broker.yaml").read_text())
    config["listeners"]["default"]["cafile"] = str(tmp_path / "nope.pem")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run("broker", "-c", str(tmp_path / "b.yaml")), "does not exist")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config["listeners"]["default"].update(cafile=str(garbage), certfile=str(garbage), keyfile=str(garbage))
    config["plugins"]["broker_plugin.plugin.DeviceAuthorizationPlugin"].update(
        model=str(ROOT / "policies" / "model.conf"), policy=str(ROOT / "policies" / "policy.csv"),
        registry=str(ROOT / "policies" / "devices.yaml"))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run("broker", "-c", str(tmp_path / "b.yaml")), "cannot load its CA, certificate or key")


def test_broker_command_serves_devices_and_stops_on_sigterm(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    creds = pki.device("sensor-001")
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    broker = BrokerProcess(write_cli_config(tmp_path / "broker.yaml", pki, tmp_path / "policies"), tmp_path)
    try:
        client = Client(broker.port, "sensor-001", creds, pki.ca_file)
        assert client.connect() == 0
        assert client.subscribe("sites/plant-a/sensor-001/cmd") == 0
        assert client.subscribe("sites/#") == 0x80
        client.close()
    finally:
        assert broker.stop() == 0


def test_hostile_inputs_give_one_error_line(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        (["check", "-c", str(binary)], f"mqtt-pdp: error: {binary}: broker config is not UTF-8 text"),
        (["log", "query", "--db", str(binary)], f"mqtt-pdp: error: {binary} is not an assertion database: file is not a database"),
        (["log", "verify", "--db", str(binary)], f"mqtt-pdp: error: {binary} is not an assertion database: file is not a database"),
        (["pki", "--out", str(binary), "--device", "x"], f"mqtt-pdp: error: cannot write to --out {binary}: File exists: {binary}"),
        (["l2-key", "--out", str(tmp_path / "missing" / "k")], f"mqtt-pdp: error: {tmp_path / 'missing'} is not a directory"),
    ]
    for args, line in cases:
        result = run(*args)
        assert (result.returncode, result.stderr.splitlines()) == (2, [line]), args
    assert not (tmp_path / "missing").exists()


def test_check_refuses_a_client_id_pattern_the_broker_would_refuse(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "broker.yaml").read_text())
    plugin = config["plugins"]["broker_plugin.plugin.DeviceAuthorizationPlugin"]
    plugin.update(client_id="{device_id}-*-*", model=str(ROOT / "policies" / "model.conf"),
                  policy=str(ROOT / "policies" / "policy.csv"), registry=str(ROOT / "policies" / "devices.yaml"))
    (tmp_path / "broker.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run("check", "-c", str(tmp_path / "broker.yaml")), "'*' is only allowed at the end")


def test_cli_commands_read_a_config_with_only_the_plugin_section(tmp_path: Path) -> None:
    """Found by an outside attack: 'apply -c' and 'check -c' refused a config without 'listeners',
    which only 'mqtt-pdp broker' needs."""
    for name in ("model.conf", "policy.csv", "devices.yaml"):
        shutil.copy(ROOT / "policies" / name, tmp_path / name)
    config = tmp_path / "plugin-only.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"broker_plugin.plugin.DeviceAuthorizationPlugin": {
        "model": "model.conf", "policy": "policy.csv", "registry": "devices.yaml"}}}))
    shutil.copy(tmp_path / "policy.csv", tmp_path / "new.csv")
    assert run("check", "-c", str(config)).returncode == 0
    applied = run("apply", "-c", str(config), "--new-policy", str(tmp_path / "new.csv"))
    assert applied.returncode == 0 and applied.stdout.startswith("applied: "), applied
    assert_one_line_error(run("broker", "-c", str(config)), "'listeners' must be a mapping")
