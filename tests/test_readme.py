"""The README's quickstart works copy-pasted (issue 11): its shell blocks are checked for exactness and then
run as written in a copy of the repository, shell 1 (`make run`) and shell 2 (the clients) side by side.

Two substitutions, both stated: a free port for 8883 (tests never take a fixed port), and
`make -o .venv/.installed run` so that make does not reinstall into the shared virtualenv the copy links to.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tests.support import WAIT, free_port

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"make", "cd", "kill", "mosquitto_sub", "mosquitto_pub", ".venv/bin/mqtt-pdp"}


def quickstart_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    section = section[:section.index("\n## ", 3)]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def command_lines(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_quickstart_blocks_are_exact() -> None:
    blocks = quickstart_blocks()
    assert [command_lines(b)[0] for b in blocks] == ["make run", "P=deploy/pki", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    registry = yaml.safe_load((ROOT / "policies" / "devices.yaml").read_text())
    devices = {d["id"] for d in registry["devices"]}
    for block in blocks:
        for line in command_lines(block):
            assert "..." not in line and "…" not in line, line
            words = shlex.split(line.rstrip("&"))
            if re.fullmatch(r"\w+=\S+", words[0]):
                continue
            assert words[0] in COMMANDS, line
            if words[0] == "make":
                assert re.search(rf"^{words[1]}:", makefile, re.M), line
            elif words[0] == ".venv/bin/mqtt-pdp":  # the subcommand and its options exist
                result = subprocess.run([sys.executable, "-m", "pdp.cli", *words[1:], "--help"], cwd=ROOT,
                                        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert result.returncode == 0, (line, result.stderr)
            elif words[0].startswith("mosquitto"):
                for path in re.findall(r"\$P/(\S+)", line):  # files mqtt-pdp pki writes for the registry's devices
                    name = Path(path).name.removesuffix(".pem").removesuffix("-key")
                    assert path == "ca.pem" or (path.startswith("devices/") and name in devices), path
                client_id = words[words.index("-i") + 1]
                assert client_id in devices, line


class Shell:
    """A bash that runs one line at a time, as a user types them; its output can be awaited."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["bash"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=lambda: [self.out.put(line) for line in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        threading.Thread(target=lambda: [self.stderr.append(line) for line in self.proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        self.count = 0

    def until(self, pattern: str) -> str:
        deadline = time.monotonic() + WAIT
        for line in self.stdout:
            if re.search(pattern, line):
                return line
        while True:
            line = self.out.get(timeout=max(0.01, deadline - time.monotonic()))
            self.stdout.append(line)
            if re.search(pattern, line):
                return line

    def run(self, line: str) -> tuple[int, str]:
        """Run one line; its exit status and what it printed on stdout."""
        self.count += 1
        marker = f"__done_{self.count}__"
        start = len(self.stdout)
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\necho {marker} $?\n")
        self.proc.stdin.flush()
        done = self.until(marker)
        return int(done.split()[-1]), "".join(self.stdout[start:-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None or shutil.which("mosquitto_pub") is None:
        import pytest

        pytest.skip("make or the mosquitto clients are not installed")
    shell1, shell2, _ = quickstart_blocks()
    port = str(free_port())
    # a fresh clone: the files git would check out, in a directory named as the README's `cd` expects
    clone = tmp_path / "mqtt-pdp"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert not (clone / "deploy" / "pki").exists() and not (clone / "var").exists()
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    config = clone / "deploy" / "broker.yaml"
    config.write_text(config.read_text().replace("8883", port))
    env = {**os.environ, "PYTHONPATH": str(clone)}  # the copy's code, not the checkout the venv was installed from

    broker = subprocess.Popen(["bash", "-c", shell1.replace("make run", "make -o .venv/.installed run")], cwd=clone,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in broker.stdout:  # type: ignore[union-attr]
            log.append(line)
            if "listener default on" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    user = Shell(clone, env)  # shell 2 is in the repository, as shell 1
    try:
        assert ready.wait(60), "".join(log)
        statuses: dict[str, int] = {}
        for line in command_lines(shell2.replace("8883", port)):
            statuses[line], _ = user.run(line)
            if line.startswith("mosquitto_sub"):  # a person waits until the dashboard has subscribed
                wait_sessions(env, clone)
            if "telemetry -m 21.5" in line:
                user.until(r"^sites/plant-a/sensor-001/telemetry 21\.5$")
            if "valve-001/cmd" in line or "sensor-900" in line:
                wait_records(env, clone, 2 if "sensor-900" in line else 1)
        refused = [line for line in statuses if "-i sensor-900" in line]
        assert len(refused) == 1 and statuses[refused[0]] != 0
        assert all(status == 0 for line, status in statuses.items() if line not in refused), statuses
        assert any("not authorised" in line for line in user.stderr), user.stderr
        # the evidence of both denials, and the status, were printed in shell 2
        printed = "".join(user.stdout)
        assert re.search(r"sensor-001\s+sensor-001\s+publish\s+sites/plant-a/valve-001/cmd\s+deny\s+-\s+no matching rule", printed), printed
        assert re.search(r"sensor-900\s+sensor-900\s+connect\s+-\s+deny\s+-\s+device suspended", printed), printed
        assert re.search(r"^dashboard-001\s+dashboard-001\s+dashboard\s+plant-a\s+127\.0\.0\.1:\d+\s+\S+\s+sites/plant-a/#$", printed, re.M)
        assert re.search(r"^connections:\s+1$", printed, re.M), printed
    finally:
        user.close()
        if broker.poll() is None:
            os.killpg(broker.pid, signal.SIGINT)  # Ctrl-C in shell 1
        broker.wait(WAIT)
    text = "".join(log)
    # shell 1: one line for the denial and one for the refused connect, where the README says
    assert text.count("sensor-001 publish sites/plant-a/valve-001/cmd denied: no matching rule") == 1, text
    assert text.count("connect refused: client=sensor-900") == 1 and "Traceback" not in text, text


def _cli(env: dict[str, str], clone: Path, *args: str) -> str:
    return subprocess.run([str(clone / ".venv" / "bin" / "mqtt-pdp"), *args], cwd=clone, capture_output=True,
                          text=True, timeout=60, env=env).stdout


def wait_sessions(env: dict[str, str], clone: Path) -> None:
    deadline = time.monotonic() + WAIT
    while "sites/plant-a/#" not in _cli(env, clone, "sessions"):
        assert time.monotonic() < deadline, "the dashboard never subscribed"
        time.sleep(0.1)


def wait_records(env: dict[str, str], clone: Path, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while len(_cli(env, clone, "log", "query", "--decision", "deny", "--format", "jsonl").splitlines()) < count:
        assert time.monotonic() < deadline, "the denial was never recorded"
        time.sleep(0.1)
