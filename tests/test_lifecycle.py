"""Device lifecycle without a broker: transitions, registry edits, binding windows and administrative records."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pdp import pki
from pdp.cli.main import main
from pdp.core.admission import AdmissionSettings, ConnectRequest
from pdp.core.enforcement import Admitted, ClockTick, ConnectRequested, Disconnect, Enforcer, Refused, SnapshotSwapped
from pdp.core.identity import IdentitySettings
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.registry import lifecycle
from pdp.registry.device import CertBinding, Device
from pdp.registry.edit import render_registry, with_device
from pdp.registry.file import parse_registry
from pdp.runtime.decision_point import DecisionPoint, PdpSettings
from pdp.runtime.sources import write_together
from tests.conftest import DEVICES, ROOT, TEST_POLICY, registry_yaml

TRUST = "test.example"
NOW = datetime.now(timezone.utc)


def _device(status: str = "active", **kw: object) -> Device:
    return Device("d-1", "sensor", "plant-a", "test", "qa", status, **kw)  # type: ignore[arg-type]


# -- transitions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "command", "expected"), [
    ("provisioned", "activate", "active"), ("suspended", "activate", "active"), ("active", "suspend", "suspended"),
    ("provisioned", "suspend", "suspended"), ("active", "retire", "retired"), ("suspended", "retire", "retired"),
])
def test_allowed_transitions(status: str, command: str, expected: str) -> None:
    assert lifecycle.change_status(_device(status), command).status == expected


@pytest.mark.parametrize("command", ["activate", "suspend", "retire"])
def test_retired_is_final(command: str) -> None:
    with pytest.raises(lifecycle.TransitionRefused, match="retirement is final"):
        lifecycle.change_status(_device("retired"), command)
    with pytest.raises(lifecycle.TransitionRefused, match="retired"):
        lifecycle.transfer(_device("retired"), "someone")


def test_no_op_transition_is_refused_with_the_reason() -> None:
    with pytest.raises(lifecycle.TransitionRefused, match="already active"):
        lifecycle.change_status(_device("active"), "activate")


def test_at_most_two_open_bindings_and_a_closed_one_does_not_count() -> None:
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    device = lifecycle.bind(lifecycle.bind(_device(), CertBinding(a), NOW), CertBinding(b), NOW)
    with pytest.raises(lifecycle.TransitionRefused, match="at most 2"):
        lifecycle.bind(device, CertBinding(c), NOW)
    closing = lifecycle.close_binding(device, a, NOW + timedelta(hours=1))
    with pytest.raises(lifecycle.TransitionRefused, match="at most 2"):
        lifecycle.bind(closing, CertBinding(c), NOW)  # still open for an hour
    assert c in lifecycle.bind(closing, CertBinding(c), NOW + timedelta(hours=2)).fingerprints


def test_the_last_certificate_of_an_active_device_cannot_be_unbound() -> None:
    device = lifecycle.bind(_device(), CertBinding("a" * 64), NOW)
    with pytest.raises(lifecycle.TransitionRefused, match="last certificate"):
        lifecycle.unbind(device, "a" * 64)
    assert lifecycle.unbind(lifecycle.change_status(device, "suspend"), "a" * 64).fingerprints == frozenset()


# -- the registry file --------------------------------------------------------------------------------


COMMENTED = """\
# fleet registry, kept by the plant team
devices:
  # the first sensor
  - id: s-1
    type: sensor
    location: plant-a
    purpose: telemetry
    owner: ops
    status: active

  # the second sensor (do not touch: INC-42)
  - id: s-2
    type: sensor
    location: plant-b
    purpose: telemetry
    owner: ops
    status: active
# end of file
"""


def test_editing_one_device_keeps_every_other_line_and_comment() -> None:
    registry = parse_registry(COMMENTED, "devices.yaml")
    suspended = lifecycle.change_status(registry.devices["s-1"], "suspend")
    text, kept = with_device(COMMENTED, registry, suspended)
    assert kept
    assert text == COMMENTED.replace("owner: ops\n    status: active\n\n", "owner: ops\n    status: suspended\n\n", 1)
    added = lifecycle.register("s-3", {"type": "sensor", "location": "lab", "purpose": "t", "owner": "qa"})
    text, kept = with_device(text, parse_registry(text, "devices.yaml"), added)
    assert kept and text.endswith("    status: provisioned\n# end of file\n")
    assert list(parse_registry(text, "devices.yaml").devices) == ["s-1", "s-2", "s-3"]


def test_certificates_with_windows_read_back_and_flow_layout_falls_back_to_canonical() -> None:
    flow = "devices: [{id: s-1, type: sensor, location: a, purpose: t, owner: o, status: active}]\n"
    registry = parse_registry(flow, "devices.yaml")
    until = datetime(2030, 1, 1, tzinfo=timezone.utc)
    bound = lifecycle.bind(registry.devices["s-1"], CertBinding("ab" * 32, until, "0f", "CN=x, O=y", until), NOW)
    text, kept = with_device(flow, registry, bound)
    assert not kept
    assert parse_registry(text, "devices.yaml").devices["s-1"] == bound
    assert bound.binding_closed("ab" * 32, until) and not bound.binding_closed("ab" * 32, until - timedelta(seconds=1))


def test_a_bad_certificate_field_names_its_line() -> None:
    text = render_registry([_device()]) + '    certificates:\n      - {fingerprint: "zz"}\n'
    with pytest.raises(Exception, match=r"devices.yaml:9: certificate fingerprint"):
        parse_registry(text, "devices.yaml")


# -- rotation in the enforcement core ------------------------------------------------------------------


def test_binding_a_successor_keeps_the_session_and_the_window_closing_cuts_it(tmp_path: Path) -> None:
    ca = pki.make_ca("rotation CA")
    old = pki.issue_device(ca, "sensor-1", TRUST)
    new = pki.issue_device(ca, "sensor-1", TRUST)
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    (tmp_path / "policy.csv").write_text(TEST_POLICY)
    registry_path = tmp_path / "devices.yaml"
    registry_path.write_text(registry_yaml(DEVICES, {"sensor-1": pki.fingerprint(old)}))
    pdp = DecisionPoint(PdpSettings(str(tmp_path / "model.conf"), str(tmp_path / "policy.csv"), str(registry_path),
                                    AdmissionSettings(identity=IdentitySettings(trust_domain=TRUST)), settle=0))
    core = Enforcer(pdp)
    der = old.cert.public_bytes(Encoding.DER)
    [admitted] = core.handle(ConnectRequested(1, ConnectRequest("sensor-1", der, tls=True), NOW))
    assert isinstance(admitted, Admitted)

    window_end = datetime.now(timezone.utc) + timedelta(hours=1)
    registry = parse_registry(registry_path.read_text(), str(registry_path))
    device = lifecycle.close_binding(registry.devices["sensor-1"], pki.fingerprint(old), window_end)
    device = lifecycle.bind(device, CertBinding(pki.fingerprint(new)), NOW)
    write_together({str(registry_path): with_device(registry_path.read_text(), registry, device)[0].encode()})
    pdp.swap(pdp.load_if_changed())  # type: ignore[arg-type]
    assert core.handle(SnapshotSwapped()) == []  # a successor bound: the old certificate's session stays
    assert core.handle(ClockTick(window_end - timedelta(seconds=1))) == []
    assert core.handle(ClockTick(window_end)) == [Disconnect(1, "sensor-1", "certificate binding window closed")]
    later = ConnectRequest("sensor-1", der, tls=True)
    [refused] = core.handle(ConnectRequested(2, later, window_end))
    assert isinstance(refused, Refused) and refused.admission.reason == "certificate binding window closed"
    fresh = ConnectRequest("sensor-1", new.cert.public_bytes(Encoding.DER), tls=True)
    assert isinstance(core.handle(ConnectRequested(3, fresh, window_end))[-1], Admitted)


# -- the CLI and its records ---------------------------------------------------------------------------


def test_cli_changes_are_recorded_chained_and_refusals_leave_no_record(tmp_path: Path, capsys) -> None:
    registry = tmp_path / "devices.yaml"
    registry.write_text(COMMENTED)
    db = str(tmp_path / "a.db")
    args = ["--registry", str(registry), "--db", db]
    assert main(["devices", "suspend", "s-1", *args, "--actor", "alice", "--reason", "INC-7"]) == 0
    assert main(["devices", "retire", "s-1", *args]) == 0
    capsys.readouterr()
    assert main(["devices", "activate", "s-1", *args]) == 2
    assert "retirement is final" in capsys.readouterr().err
    assert main(["devices", "transfer", "s-2", "--owner", "sec-team", *args]) == 0
    store = AssertionStore(db, readonly=True)
    records = [r for _, r in store.query(QueryFilters(action="admin"))]
    assert [(r.device_id, r.rule_id) for r in records] == [
        ("s-1", "devices suspend"), ("s-1", "devices retire"), ("s-2", "devices transfer")]
    first = json.loads(records[0].reason)
    assert (first["actor"], first["before"]["status"], first["after"]["status"], first["note"]) == (
        "alice", "active", "suspended", "INC-7")
    assert [r.problem for r in store.verify()] == [None]
    store.close()
    assert "# the second sensor (do not touch: INC-42)" in registry.read_text()
    assert main(["log", "verify", "--db", db]) == 0
    capsys.readouterr()
    assert main(["devices", "list", *args, "--format", "json", "--owner", "sec-team"]) == 0
    assert [d["device_id"] for d in json.loads(capsys.readouterr().out)] == ["s-2"]
    assert main(["devices", "list", *args, "--format", "csv", "--status", "retired"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("s-1,retired,")


def test_admin_records_are_anchored_when_the_config_has_a_signing_key(tmp_path: Path, test_pki, capsys) -> None:
    from tests.support import write_cli_config

    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "devices.yaml").write_text(COMMENTED)
    key = tmp_path / "anchor.key"
    assert main(["log", "keygen", "--out", str(key)]) == 0
    config = write_cli_config(tmp_path / "cli.yaml", test_pki, policy_dir, anchor_key_file=str(key),
                              anchor_dir=str(tmp_path / "anchors"))
    assert main(["devices", "suspend", "s-1", "-c", str(config)]) == 0
    assert main(["devices", "transfer", "s-2", "--owner", "sec", "-c", str(config)]) == 0
    assert "(head signed)" in capsys.readouterr().out
    verify = ["log", "verify", "-c", str(config), "--anchors", str(tmp_path / "anchors"), "--public-key", f"{key}.pub"]
    assert main(verify) == 0
    store = AssertionStore(str(tmp_path / "assertions.db"))
    store.db.execute("DELETE FROM records WHERE seq = 2")
    store.db.commit()
    store.close()
    assert main(verify) == 1  # the signed head of the transfer no longer matches


def test_gateway_relation_reads_back_and_a_device_is_not_its_own_gateway() -> None:
    child = lifecycle.register("leg-1", {"type": "sensor", "location": "a", "purpose": "t", "owner": "o"},
                               gateway="gw-1")
    text = render_registry([child])
    assert "    gateway: gw-1\n" in text and parse_registry(text, "devices.yaml").devices["leg-1"] == child
    with pytest.raises(Exception, match="devices.yaml:8: a device cannot be its own gateway"):
        parse_registry(text.replace("gateway: gw-1", "gateway: leg-1"), "devices.yaml")
