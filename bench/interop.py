"""Run a peer's interoperability suite (eclipse/paho.mqtt.testing) against our broker, from outside the repository.

    python -m bench.interop /path/to/paho.mqtt.testing [--keep] [--timeout 300]

The suite's ``interoperability/client_test.py`` connects over plain TCP with the client
ids ``myclientid``, ``myclientid2``, ``clean retained`` (and the empty one, which we
refuse by design). This starts ``mqtt-pdp broker`` in its own process on a loopback
port with a throw-away configuration that admits exactly those ids as unverified
plain-TCP devices of one type, allowed everything under ``#``, gives the suite's
subscribe-failure case a filter no rule grants (``$interop/nosubscribe``), runs the suite once against
that one broker, and prints each test's result and the broker log's tracebacks.
Exit status 0 when at least ``--require`` tests pass. Nothing of the suite is copied
here; point this at a checkout of it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("myclientid", "myclientid2", "clean retained")
# Our subscribe denies apply to every overlapping filter (a deny on test/nosubscribe would refuse the '+/+'
# the suite's other tests subscribe to), so the refused filter is one no allow reaches: '#' never selects '$'
# topics [MQTT-4.7.2-1]. The suite has an option for this filter (-n) but its main block ignores it.
NOSUBSCRIBE = "$interop/nosubscribe"
POLICY = """\
p, interop-pub, interop, *, *, #, publish, allow
p, interop-sub, interop, *, *, #, subscribe, allow
p, interop-recv, interop, *, *, #, receive, allow
"""
TESTS = ("testBasic", "test_retained_messages", "test_zero_length_clientid", "test_offline_message_queueing",
         "test_overlapping_subscriptions", "test_keepalive", "test_redelivery_on_reconnect", "test_subscribe_failure",
         "test_dollar_topics", "test_unsubscribe")


def write_config(directory: Path) -> Path:
    """Policy, registry and broker config for the suite's client ids, all under ``directory``."""
    shutil.copy(ROOT / "policies" / "model.conf", directory / "model.conf")
    (directory / "policy.csv").write_text(POLICY)
    devices = [{"id": d, "type": "interop", "location": "lab", "purpose": "interop", "owner": "bench",
                "status": "active"} for d in DEVICES]
    (directory / "devices.yaml").write_text(yaml.safe_dump({"devices": devices}, sort_keys=False))
    config = {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"broker_plugin.plugin.DeviceAuthorizationPlugin": {
            "model": str(directory / "model.conf"), "policy": str(directory / "policy.csv"),
            "registry": str(directory / "devices.yaml"), "allow_plain_tcp": True,
            "require_client_certificate": False, "node_id": "interop",
            "assertion_db": str(directory / "assertions.db"), "spool_dir": str(directory / "spool"),
        }},
    }
    path = directory / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Broker:
    """``mqtt-pdp broker`` in its own process; its stderr is collected."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "pdp.cli", "broker", "-c", str(config)],
                                     stderr=subprocess.PIPE, text=True, cwd=config.parent,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_port(30.0)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                self.lines.put(line)

    def _wait_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"listener default on \('[0-9.]+', (\d+)\)", line)
            if match:
                return int(match.group(1))
        raise SystemExit(f"interop: error: the broker did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interop", description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of github.com/eclipse/paho.mqtt.testing")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the whole suite may take")
    parser.add_argument("--require", type=int, default=8, help="exit 1 unless at least this many tests pass")
    parser.add_argument("--nosubscribe", default=NOSUBSCRIBE,
                        help="the filter the subscribe-failure test expects refused (the suite's -n option)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, broker log)")
    args = parser.parse_args(argv)
    suite = args.checkout / "interoperability" / "client_test.py"
    if not suite.is_file():
        sys.stderr.write(f"mqtt-pdp: error: {suite}: not found (expected a paho.mqtt.testing checkout)\n")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mqtt-pdp-interop-"))
    broker = Broker(write_config(tmp), tmp / "broker.log")
    try:
        run = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(suite), str(broker.port), str(tmp / "outcome.json"), args.nosubscribe], cwd=suite.parent,
            capture_output=True, text=True, timeout=args.timeout)
        output = run.stdout + run.stderr
    finally:
        broker.stop()
    (tmp / "suite.log").write_text(output)
    outcome_file = tmp / "outcome.json"
    outcome: dict[str, bool] = json.loads(outcome_file.read_text()) if outcome_file.exists() else {}
    for name in TESTS:
        state = {True: "pass", False: "FAIL", None: "not run"}[outcome.get(name)]
        sys.stdout.write(f"{name:34} {state}\n")
    passed = sum(outcome.values())
    tracebacks = (tmp / "broker.log").read_text().count("Traceback")
    sys.stdout.write(f"passed {passed}/{len(TESTS)} on one broker run; broker log tracebacks: {tracebacks}\n")
    if args.keep:
        sys.stdout.write(f"config, broker.log and suite.log kept in {tmp}\n")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if passed >= args.require else 1


# Loads the suite's module without running its __main__ block, gives it the globals that block would set
# (its topic lists, host and port), and runs its one TestCase under unittest -v.
_RUNNER = """
import json, runpy, sys, unittest
suite, port, nosubscribe = sys.argv[1], int(sys.argv[2]), sys.argv[4]
namespace = runpy.run_path(suite, run_name="client_test")
shared = namespace["Test"].setUpClass.__func__.__globals__  # the dict the suite's functions read
shared.update(
    topics=("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA"),
    wildtopics=("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#"),
    nosubscribe_topics=(nosubscribe,), host="127.0.0.1", port=port)
tests = unittest.defaultTestLoader.loadTestsFromTestCase(namespace["Test"])
ran = [t._testMethodName for t in tests]
result = unittest.TextTestRunner(verbosity=2).run(tests)
failed = {t._testMethodName for t, _ in result.failures + result.errors}
with open(sys.argv[3], "w") as out:
    json.dump({name: name not in failed for name in ran}, out)
sys.exit(0 if result.wasSuccessful() else 1)
"""


if __name__ == "__main__":
    sys.exit(main())
