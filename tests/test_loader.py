"""Changed files are parsed in the loader process; the broker applies what changed. If that process dies,
reloads go on (parsed in the broker, as before) and a new process takes the next change."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from pdp.core.layered import Layered
from pdp.runtime.decision_point import DecisionPoint, PdpSettings
from pdp.runtime.loader import LoaderState
from pdp.core.admission import AdmissionSettings
from pdp.core.identity import IdentitySettings
from tests.conftest import DEVICES, registry_yaml
from tests.support import TRUST_DOMAIN, wait_for


def _edit(broker, path: Path, text: str) -> None:
    attempts = broker.plugin.service.reload_attempts
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    broker.wait_reload(attempts)


def test_edits_are_parsed_in_the_loader_process_and_applied_as_deltas(broker, connect, policy_dir):
    service = broker.plugin.service
    wait_for(lambda: service.loader.pid is not None, "the loader process started")
    assert service.loader.pid != os.getpid()
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    policy = policy_dir / "policy.csv"
    _edit(broker, policy, policy.read_text() + "p, sensor-debug, sensor, *, *, sites/{location}/{device_id}/debug, "
                                                 "publish, allow\n")
    sensor.publish("sites/plant-a/sensor-1/debug", b"allowed by the new rule")
    assert dashboard.next_message().payload == b"allowed by the new rule"
    # A registry change: the device's new attributes are laid over the version in force.
    registry = policy_dir / "devices.yaml"
    _edit(broker, registry, registry_yaml([d if d[0] != "sensor-2" else ("sensor-2", "sensor", "plant-b", "active")
                                           for d in DEVICES]))
    assert service.loads == {"loader": 2, "broker": 0}
    assert isinstance(service.pdp.snapshot.registry.devices, Layered)
    assert service.pdp.registered("sensor-2").location == "plant-b"
    assert service.pdp.registered("sensor-1").location == "plant-a"


def test_a_dead_or_stuck_loader_process_does_not_stop_revocations(broker, connect, policy_dir):
    service = broker.plugin.service
    wait_for(lambda: service.loader.pid is not None, "the loader process started")
    registry = policy_dir / "devices.yaml"
    suspended = [d if d[0] != "sensor-1" else ("sensor-1", "sensor", "plant-a", "suspended") for d in DEVICES]
    # Killed between changes: the next change starts a new one.
    os.kill(service.loader.pid, signal.SIGKILL)
    sensor = connect("sensor-1")
    _edit(broker, registry, registry_yaml(suspended))
    assert sensor.wait_disconnected()
    assert service.loads == {"loader": 1, "broker": 0} and service.loader.starts == 2
    connect("sensor-1", expect=5)
    # Stuck in the middle of a change: given up on, the change is parsed in the broker instead.
    service.loader.timeout_floor = 0.5
    stuck = service.loader.pid
    os.kill(stuck, signal.SIGSTOP)
    try:
        _edit(broker, registry, registry_yaml(DEVICES))
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert service.loads == {"loader": 1, "broker": 1}
    connect("sensor-1", expect=0)
    wait_for(lambda: not os.path.exists(f"/proc/{stuck}") or "Z" in open(f"/proc/{stuck}/stat").read().split()[2],
             "the stuck loader process ended")
    # And the next change goes through a new loader process again.
    _edit(broker, registry, registry_yaml(suspended))
    assert service.loads == {"loader": 2, "broker": 1} and service.loader.starts == 3
    connect("sensor-1", expect=5)


def test_a_loader_out_of_step_sends_whole_versions(tmp_path: Path, policy_dir: Path) -> None:
    """A delta is computed against the loader's own last version only when it is the one in force."""
    settings = PdpSettings(str(policy_dir / "model.conf"), str(policy_dir / "policy.csv"),
                           str(policy_dir / "devices.yaml"),
                           AdmissionSettings(identity=IdentitySettings(trust_domain=TRUST_DOMAIN)), settle=0)
    point = DecisionPoint(settings)
    state = LoaderState(settings)
    (policy_dir / "devices.yaml").write_text(registry_yaml(DEVICES[:-1]))
    meta, _ = state.load(point.file_signature, point.in_force())
    assert meta is not None and [(name, delta.base) for name, delta, _ in meta["parts"]] == \
        [("registry", point.snapshot.registry.revision)]
    (policy_dir / "devices.yaml").write_text(registry_yaml(DEVICES))
    # The broker did not apply the first delta: its version in force is still the original one.
    meta, blobs = state.load(point.file_signature, {"registry": "something else", "policy": "x"})
    assert meta is not None and [(name, delta.base) for name, delta, _ in meta["parts"]] == [("registry", None)]
    assert len(blobs) == 1  # every device, in frames


def test_a_change_back_to_the_start_up_text_is_applied_after_the_loader_fails(broker, connect, policy_dir):
    """Found by an outside attack: the broker's own reader kept the version it parsed at start; once a
    loader's delta had replaced it, that version was emptied, and a fallback parse of the same text got
    the emptied one back: "registry has no devices", rejected, and the suspension in it never applied."""
    service = broker.plugin.service
    registry = policy_dir / "devices.yaml"
    start_up = registry.read_text()
    suspended = start_up.replace("id: sensor-1\n    type: sensor\n    location: plant-a\n    purpose: test\n"
                                 "    owner: qa\n    status: active", "id: sensor-1\n    type: sensor\n"
                                 "    location: plant-a\n    purpose: test\n    owner: qa\n    status: suspended")
    assert suspended != start_up
    _edit(broker, registry, suspended)  # through the loader: the start-up version is released
    assert service.loads == {"loader": 1, "broker": 0}
    wait_for(lambda: service.loader.pid is not None, "the loader process is up")
    service.loader.timeout_floor = 0.5
    os.kill(service.loader.pid, signal.SIGSTOP)
    _edit(broker, registry, start_up)  # parsed in the broker: the start-up text again
    assert service.loads == {"loader": 1, "broker": 1}
    assert service.pdp.last_error is None
    connect("sensor-1", expect=0)


def test_helper_processes_never_import_from_the_working_directory(tmp_path: Path, policy_dir: Path,
                                                                   monkeypatch) -> None:
    """Found by an outside attack: ``python -m`` put the working directory first on the path, so a ``pdp``
    package planted where the broker was started ran as the broker (and could have forged deltas)."""
    import asyncio

    from pdp.evidence.writer import WriterProcess
    from pdp.runtime.loader import LoaderProcess

    planted = tmp_path / "cwd"
    marker = tmp_path / "planted-code-ran"
    for module in ("pdp/__init__.py", "pdp/runtime/__init__.py", "pdp/evidence/__init__.py"):
        (planted / module).parent.mkdir(parents=True, exist_ok=True)
        (planted / module).write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    monkeypatch.chdir(planted)
    settings = PdpSettings(str(policy_dir / "model.conf"), str(policy_dir / "policy.csv"),
                           str(policy_dir / "devices.yaml"),
                           AdmissionSettings(identity=IdentitySettings(trust_domain=TRUST_DOMAIN)), settle=0)
    point = DecisionPoint(settings)

    async def ask_loader() -> object:
        loader = LoaderProcess(settings)
        try:
            (policy_dir / "policy.csv").write_text((policy_dir / "policy.csv").read_text() + "# edited\n")
            return await loader.load(point.file_signature, point.in_force())
        finally:
            await loader.close()

    assert asyncio.run(ask_loader()) is not None  # the real loader answered
    writer = WriterProcess({"node": "cwd-test", "spool_dir": str(tmp_path / "spool"),
                            "assertion_db": str(tmp_path / "a.db")})
    writer.close()
    assert not marker.exists()
