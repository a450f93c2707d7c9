"""Changes land safely: per-source last good versions, only complete files, policy and registry together,
CRLs and certificate expiry. Real broker, real TLS, real paho clients."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pdp import pki
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.policy.load import parse_policy
from pdp.registry.file import parse_registry
from pdp.runtime.sources import write_together
from tests.conftest import DEVICES, ROOT, TEST_POLICY, registry_yaml
from tests.support import TRUST_DOMAIN, Client, TestPki, wait_for, write_cli_config

RELOADED = re.compile(r"policy reloaded: revision (\S+) \((\d+) rules, (\d+) devices\)")


def _reloads(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, int]]:
    return [(m.group(1), int(m.group(2)), int(m.group(3)))
            for r in caplog.records if (m := RELOADED.search(r.getMessage()))]


def _with_status(device_id: str, status: str) -> list:
    return [(d, t, loc, status if d == device_id else s) for d, t, loc, s in DEVICES]


def test_broken_policy_does_not_block_a_suspension(broker, connect, policy_dir: Path) -> None:
    sensor = connect("sensor-1")
    attempts = broker.plugin.service.reload_attempts
    (policy_dir / "policy.csv").write_text(TEST_POLICY + "p, broken, sensor, *, *, a/#, publish\n")
    (policy_dir / "devices.yaml").write_text(registry_yaml(_with_status("sensor-1", "suspended")))
    broker.wait_reload(attempts)
    wait_for(lambda: "registry" not in broker.plugin.service.pdp.errors and sensor.disconnected.is_set(),
             "the suspension applied although the policy is broken")
    assert broker.plugin.service.pdp.errors["policy"].startswith(f"{policy_dir / 'policy.csv'}:21: expected 7 fields")
    connect("sensor-1", expect=5)  # still suspended at connect
    connect("sensor-2", expect=0)  # the old policy stays in force for everyone else


def test_empty_policy_is_rejected_not_applied(broker, connect, policy_dir: Path) -> None:
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    attempts = broker.plugin.service.reload_attempts
    (policy_dir / "policy.csv").write_text("")
    broker.wait_reload(attempts)
    assert broker.plugin.service.pdp.errors["policy"] == (
        f"{policy_dir / 'policy.csv'}: policy file is empty (an empty policy would deny everything; "
        "a file being written is read again at the next poll)")
    connect("sensor-1").publish("sites/plant-a/sensor-1/telemetry", b"still allowed")
    assert dashboard.next_message().payload == b"still allowed"


def test_policy_written_slowly_while_traffic_runs_is_applied_only_whole(
        make_broker, connect_to, policy_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdp.runtime.decision_point")
    broker = make_broker(settle_interval=0.25)
    sensor, dashboard = connect_to(broker, "sensor-1"), connect_to(broker, "dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    extra = [f"p, extra-{i}, lab, *, *, lab/{i}/#, publish, allow" for i in range(30)]
    final = TEST_POLICY + "\n".join(extra) + "\n"
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            sensor.publish("sites/plant-a/sensor-1/telemetry", b"t")
            stop.wait(0.01)

    runner = threading.Thread(target=traffic, daemon=True)
    runner.start()
    try:
        with open(policy_dir / "policy.csv", "w") as handle:  # an editor saving line by line, pausing < settle
            for line in final.splitlines(keepends=True):
                handle.write(line)
                handle.flush()
                stop.wait(0.02)
        wait_for(lambda: any(rules == 49 for _, rules, _ in _reloads(caplog)), "the final policy applied")
    finally:
        stop.set()
        runner.join(10)
    assert [rules for _, rules, _ in _reloads(caplog)] == [49]
    assert broker.plugin.service.pdp.errors == {}


def _pair(n: int) -> tuple[str, str]:
    """Policy and registry versions that only make sense together: each policy names its own devices' type."""
    policy = TEST_POLICY + f"p, pair-{n}, pairtype{n}, *, *, pair/{n}/#, publish, allow\n"
    registry = registry_yaml(DEVICES + [(f"pair-device-{n}", f"pairtype{n}", "lab", "active")])
    return policy, registry


def test_policy_and_registry_written_together_are_never_applied_mixed(
        make_broker, policy_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdp.runtime.decision_point")
    broker = make_broker(reload_interval=0.01, settle_interval=0.01)
    model = (policy_dir / "model.conf").read_text()
    intended = set()
    for n in range(12):
        policy, registry = _pair(n % 2)
        pair = (parse_policy(model, policy, "m", "p").revision, parse_registry(registry, "r").revision)
        intended.add(".".join(pair))
        write_together({str(policy_dir / "policy.csv"): policy.encode(),
                        str(policy_dir / "devices.yaml"): registry.encode()}, pause_between_renames=0.1)
        wait_for(lambda: broker.plugin.service.pdp.snapshot_revision == ".".join(pair), f"pair {n} applied")
    applied = {revision for revision, _, _ in _reloads(caplog)}
    assert applied <= intended and len(applied) == 2


def test_apply_command_validates_then_replaces_both(make_broker, test_pki: TestPki, policy_dir: Path,
                                                    tmp_path: Path) -> None:
    broker = make_broker()
    config = write_cli_config(tmp_path / "apply.yaml", test_pki, policy_dir)
    policy, registry = _pair(7)
    (tmp_path / "new.csv").write_text(policy)
    (tmp_path / "new.yaml").write_text(registry)
    (tmp_path / "bad.yaml").write_text(registry + "  - id: pair-device-7\n")

    def apply(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pdp.cli", "apply", "-c", str(config), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    refused = apply("--new-policy", str(tmp_path / "new.csv"), "--new-registry", str(tmp_path / "bad.yaml"))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"mqtt-pdp: error: {tmp_path / 'bad.yaml'}:")  # the file given, not the live one
    assert (policy_dir / "policy.csv").read_text() == TEST_POLICY  # nothing replaced
    done = apply("--new-policy", str(tmp_path / "new.csv"), "--new-registry", str(tmp_path / "new.yaml"))
    assert done.returncode == 0, done.stderr
    revision = parse_policy((policy_dir / "model.conf").read_text(), policy, "m", "p").revision
    assert done.stdout.splitlines() == [
        f"applied: {policy_dir / 'policy.csv'} (20 rules, revision {revision})",
        f"applied: {policy_dir / 'devices.yaml'} (12 devices, revision {parse_registry(registry, 'r').revision})"]
    # A broken policy in place does not stop a registry change (a suspension) from being applied.
    (policy_dir / "policy.csv").write_text(policy + "p, broken\n")
    suspended = registry.replace("status: active", "status: suspended", 1)
    (tmp_path / "suspend.yaml").write_text(suspended)
    assert apply("--new-registry", str(tmp_path / "suspend.yaml")).returncode == 0
    assert (policy_dir / "devices.yaml").read_text() == suspended
    (policy_dir / "policy.csv").write_text(policy)
    wait_for(lambda: broker.plugin.service.pdp.snapshot_revision.startswith(revision), "the applied pair in force")


# -- certificate revocation lists and expiry --------------------------------------------------------------


def test_crl_refuses_a_revoked_certificate_and_cuts_its_live_session(make_broker, connect_to, test_pki: TestPki,
                                                                    policy_dir: Path) -> None:
    crl_path = policy_dir / "ca.crl"
    crl_path.write_bytes(pki.make_crl(test_pki.ca, []).public_bytes(Encoding.PEM))
    broker = make_broker(crl=[str(crl_path)])
    sensor, other = connect_to(broker, "sensor-1"), connect_to(broker, "sensor-2")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"retained by the soon revoked key", qos=1, retain=True)
    first = connect_to(broker, "dash-1")
    assert first.subscribe("sites/plant-a/#") == 0
    assert first.next_message().payload == b"retained by the soon revoked key"  # served while the key is good
    first.close()
    serial = int(pki.load_issued(test_pki.device("sensor-1").cert, test_pki.device("sensor-1").key).cert.serial_number)
    attempts = broker.plugin.service.reload_attempts
    crl_path.write_bytes(pki.make_crl(test_pki.ca, [serial]).public_bytes(Encoding.DER))  # DER works as well
    broker.wait_reload(attempts)
    assert sensor.wait_disconnected(), "the revoked certificate's session stayed connected"
    assert not other.disconnected.is_set()
    connect_to(broker, "sensor-1", expect=5)
    later = connect_to(broker, "dash-1")
    assert later.subscribe("sites/plant-a/#") == 0
    later.publish("sites/plant-a/x/cmd", b"sentinel")
    assert [m.payload for m in later.messages_until("sites/plant-a/x/cmd")] == [b"sentinel"]
    broker.stop()
    store = AssertionStore(policy_dir.parent / "assertions.db", readonly=True)
    ends = [(r.action, r.decision, r.reason) for _, r in store.query(QueryFilters(device="sensor-1"))
            if r.action != "publish"]
    store.close()
    assert ends == [("connect", "allow", "identity verified"), ("disconnect", "deny", "certificate revoked (CRL)"),
                    ("connect", "deny", "certificate revoked (CRL)")]


def test_broken_crl_is_rejected_and_the_previous_one_stays(make_broker, connect_to, test_pki: TestPki,
                                                          policy_dir: Path) -> None:
    crl_path = policy_dir / "ca.crl"
    serial = int(pki.load_issued(test_pki.device("sensor-2").cert, test_pki.device("sensor-2").key).cert.serial_number)
    crl_path.write_bytes(pki.make_crl(test_pki.ca, [serial]).public_bytes(Encoding.PEM))
    broker = make_broker(crl=[str(crl_path)])
    connect_to(broker, "sensor-2", expect=5)
    attempts = broker.plugin.service.reload_attempts
    crl_path.write_bytes(b"not a crl")
    broker.wait_reload(attempts)
    assert broker.plugin.service.pdp.errors[f"crl:{crl_path}"].startswith(f"{crl_path}: not a PEM or DER CRL")
    connect_to(broker, "sensor-2", expect=5)
    connect_to(broker, "sensor-1", expect=0)


def test_a_broken_crl_file_does_not_block_a_revocation_in_another(make_broker, connect_to, test_pki: TestPki,
                                                                  policy_dir: Path) -> None:
    """Found by an outside attack: with two CRL files, a broken second one blocked a new revocation in the
    first (the revoked device stayed connected and could reconnect). Each file is now its own source."""
    first, second = policy_dir / "a.crl", policy_dir / "b.crl"
    for path in (first, second):
        path.write_bytes(pki.make_crl(test_pki.ca, []).public_bytes(Encoding.PEM))
    broker = make_broker(crl=[str(first), str(second)])
    sensor = connect_to(broker, "sensor-1")
    attempts = broker.plugin.service.reload_attempts
    second.write_bytes(b"not a crl")
    broker.wait_reload(attempts)
    serial = int(pki.load_issued(test_pki.device("sensor-1").cert, test_pki.device("sensor-1").key).cert.serial_number)
    attempts = broker.plugin.service.reload_attempts
    first.write_bytes(pki.make_crl(test_pki.ca, [serial]).public_bytes(Encoding.PEM))
    broker.wait_reload(attempts)
    assert sensor.wait_disconnected(), "the revocation in a.crl was blocked by the broken b.crl"
    connect_to(broker, "sensor-1", expect=5)
    assert f"crl:{second}" in broker.plugin.service.pdp.errors


def test_session_is_cut_when_its_certificate_expires(make_broker, connect_to, test_pki: TestPki,
                                                     policy_dir: Path) -> None:
    broker = make_broker()
    expires = datetime.now(timezone.utc) + timedelta(seconds=3)
    creds = test_pki.save("sensor-1-short", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN, not_after=expires))
    short = Client(broker.port, "sensor-1", creds, test_pki.ca_file)
    assert short.connect() == 0
    lasting = connect_to(broker, "sensor-2")
    assert short.wait_disconnected(15), "the session outlived its certificate"
    assert datetime.now(timezone.utc) >= expires.replace(microsecond=0)  # notAfter has whole seconds
    assert not lasting.disconnected.is_set()
    short.close()


def test_registry_without_devices_is_rejected_not_applied(broker, connect, policy_dir: Path) -> None:
    sensor = connect("sensor-1")
    attempts = broker.plugin.service.reload_attempts
    (policy_dir / "devices.yaml").write_text("devices: []\n")
    broker.wait_reload(attempts)
    assert broker.plugin.service.pdp.errors["registry"] == (
        f"{policy_dir / 'devices.yaml'}: registry has no devices (it would disconnect every device; "
        "to refuse a device, set its status to suspended or retired)")
    assert not sensor.disconnected.is_set()
    connect("sensor-2")


def _decision_point(tmp_path: Path):
    """A decision point over the test policy and registry, written to ``tmp_path``."""
    from pdp.core.admission import AdmissionSettings
    from pdp.core.identity import IdentitySettings
    from pdp.runtime.decision_point import DecisionPoint, PdpSettings

    (tmp_path / "model.conf").write_text((ROOT / "policies" / "model.conf").read_text())
    (tmp_path / "policy.csv").write_text(TEST_POLICY)
    (tmp_path / "devices.yaml").write_text(registry_yaml(DEVICES))
    point = DecisionPoint(PdpSettings(str(tmp_path / "model.conf"), str(tmp_path / "policy.csv"),
                                      str(tmp_path / "devices.yaml"),
                                      AdmissionSettings(identity=IdentitySettings(trust_domain=TRUST_DOMAIN))))
    return point


def _loaded(point):
    """The next snapshot ``load_if_changed`` builds (it returns None while a file still settles)."""
    box: list = []
    wait_for(lambda: bool(box.append(point.load_if_changed()) or box[-1]), "the changed file loaded", timeout=5)
    return box[-1]


def test_a_replaced_snapshot_is_released_without_touching_what_the_new_one_shares(tmp_path: Path) -> None:
    """Old snapshots are emptied piece by piece in a thread (so the event loop is not stalled by one big
    deallocation); a part the new snapshot still uses must survive that, or decisions would silently change."""
    from pdp.runtime.decision_point import release

    point = _decision_point(tmp_path)
    sensor = point.registered("sensor-1")
    topic = "sites/plant-a/sensor-1/telemetry"
    assert sensor is not None and point.decide(sensor, "publish", topic).allowed

    # Registry-only change: the index is shared and must keep deciding after the old snapshot is released.
    write_together({str(tmp_path / "devices.yaml"):
                    registry_yaml(DEVICES + [("sensor-9", "sensor", "plant-a", "active")]).encode()})
    first = point.snapshot
    loaded = _loaded(point)
    assert loaded.index is first.index and loaded.registry is not first.registry
    release(point.swap(loaded), loaded)
    assert point.decide(sensor, "publish", topic).allowed
    assert point.registered("sensor-9") is not None and len(first.registry) == 0

    # Policy-only change: the registry is shared; the old index is emptied (it would now match nothing).
    write_together({str(tmp_path / "policy.csv"): (TEST_POLICY + "\n# edited\n").encode()})
    second = point.snapshot
    loaded = _loaded(point)
    assert loaded.registry is second.registry and loaded.index is not second.index
    release(point.swap(loaded), loaded)
    assert point.decide(sensor, "publish", topic).allowed and point.registered("sensor-9") is not None
    assert not second.index.decide(sensor.attrs, "publish", topic).allowed


def test_a_marker_dated_in_the_future_does_not_hold_reloads_back(tmp_path: Path) -> None:
    """Found by an outside attack: a leftover marker with a future time (clock skew, a restored backup,
    touch -d) held every reload back for as long as its date lay ahead, suspensions included."""
    import os
    import time

    from pdp.runtime.sources import APPLY_MARKER, STALE_MARKER_SECONDS, change_in_progress, read_stable

    target = tmp_path / "devices.yaml"
    target.write_text("devices: []\n")
    marker = tmp_path / APPLY_MARKER
    marker.write_text("1\n")
    now = time.time()
    assert change_in_progress([str(target)], now)  # a fresh marker: a change is in progress
    os.utime(marker, (now + 3600, now + 3600))
    assert not change_in_progress([str(target)], now)
    assert read_stable([str(target)], 0.01) is not None
    os.utime(marker, (now - STALE_MARKER_SECONDS - 1,) * 2)
    assert not change_in_progress([str(target)], now)


def test_concurrent_applies_never_leave_a_pair_nobody_wrote(tmp_path: Path) -> None:
    import time

    """Found by an outside attack: two 'apply' runs at once left the policy of one and the registry of the
    other on disk (3 of 60 rounds). write_together now takes a per-directory lock; each round here runs
    two writers in separate processes and checks the pair on disk is one of the two written."""
    policy, registry = tmp_path / "policy.csv", tmp_path / "devices.yaml"
    script = (
        "import sys, time\nfrom pdp.runtime.sources import write_together\n"
        "tag, start, pause = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])\n"
        "while time.time() < start:\n    pass\n"  # both writers begin at the same moment
        f"write_together({{{str(policy)!r}: tag.encode(), {str(registry)!r}: tag.encode()}}, "
        "pause_between_renames=pause)\n"
    )
    for round_number in range(3):
        start = time.time() + 1.0
        writers = [subprocess.Popen([sys.executable, "-c", script, f"{tag}{round_number}", str(start), pause],
                                    cwd=ROOT) for tag, pause in (("A", "0.3"), ("B", "0.05"))]
        for writer in writers:
            assert writer.wait(timeout=60) == 0
        assert policy.read_text() == registry.read_text(), f"round {round_number}: a mixed pair"


def test_decisions_on_very_long_topics_are_not_cached(tmp_path: Path) -> None:
    """The caches are bounded in entries, not bytes: long distinct topics must not fill them."""
    from pdp.runtime.decision_point import CACHED_TOPIC_LENGTH

    point = _decision_point(tmp_path)
    computed: list[str] = []
    point.on_computed = lambda revision, device, action, topic, decision: computed.append(topic)
    sensor = point.registered("sensor-1")
    long_filter = "sites/plant-a/" + "x" * CACHED_TOPIC_LENGTH + "/#"
    for _ in range(2):
        decision, tier, _ = point.lookup(sensor, "subscribe", long_filter)
        assert tier == "index" and not decision.allowed
    assert len(point.snapshot.l1) == 0 and computed == []
    short = "sites/plant-a/sensor-1/telemetry"
    assert point.lookup(sensor, "publish", short)[1] == "index" and point.lookup(sensor, "publish", short)[1] == "l1"
    assert computed == [short]
