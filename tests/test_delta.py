"""The loader process's deltas: applied to the version in force they give exactly the new version.

Pure: versions are parsed from texts, deltas computed, pickled in frames as the process sends them,
and applied as the broker does; the result must equal a direct parse of the new text, for random edits.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest

from pdp.core.index import run_to_end
from pdp.policy.load import parse_policy
from pdp.registry.file import FileRegistry, parse_registry
from pdp.core.layered import Layered
from pdp.runtime.delta import (DeltaMismatch, applying_policy, applying_registry, frames, policy_delta,
                               registry_delta)

MODEL = (Path(__file__).resolve().parent.parent / "policies" / "model.conf").read_text()


def _policy_text(rules: list[str]) -> str:
    return "# policy\n" + "".join(f"{rule}\n" for rule in rules)


def _rule(rng: random.Random, n: int) -> str:
    return (f"p, r{n}, {rng.choice(['*', 'sensor', 'valve'])}, *, *, "
            f"{rng.choice(['a/#', 'b/+/c', 'x/{device_id}/y'])}, {rng.choice(['publish', 'subscribe'])}, "
            f"{rng.choice(['allow', 'deny'])}")


def _edit(rng: random.Random, items: list[str], make) -> list[str]:
    out = list(items)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if out and choice < 0.3:
            del out[rng.randrange(len(out))]
        elif out and choice < 0.6:
            out[rng.randrange(len(out))] = make()
        else:
            out.insert(rng.randrange(len(out) + 1), make())
    return out


def _shipped(items: list) -> list:
    """Frames as they cross the pipe: pickled and unpickled one at a time."""
    return [pickle.loads(pickle.dumps(frame)) for frame in frames(items, size=3)]


def test_policy_delta_applied_equals_the_new_version_for_random_edits() -> None:
    rng = random.Random(5)
    counter = iter(range(10**6))
    for _ in range(300):
        old_rules = [_rule(rng, next(counter)) for _ in range(rng.randint(1, 12))]
        new_rules = _edit(rng, old_rules, lambda: _rule(rng, next(counter))) or old_rules[:1]
        old = parse_policy(MODEL, _policy_text(old_rules), "model.conf", "policy.csv")
        new = parse_policy(MODEL, _policy_text(new_rules), "model.conf", "policy.csv")
        delta, hunk = policy_delta(old, new)
        applied = run_to_end(applying_policy(old, delta, _shipped(hunk)))
        assert applied == new and applied.policy_text == new.policy_text
        assert len(hunk) <= len(new.rules)


def test_a_one_line_policy_edit_ships_one_rule() -> None:
    rules = [f"p, r{i}, *, *, *, a/{i}/#, publish, allow" for i in range(1000)]
    old = parse_policy(MODEL, _policy_text(rules), "model.conf", "policy.csv")
    rules[500] = rules[500].replace("allow", "deny")
    new = parse_policy(MODEL, _policy_text(rules), "model.conf", "policy.csv")
    delta, hunk = policy_delta(old, new)
    assert (delta.start, delta.end, len(hunk)) == (500, 501, 1)


def _registry_text(devices: dict[str, tuple[str, str]]) -> str:
    out = ["devices:"]
    for device_id, (dtype, status) in devices.items():
        out += [f"  - id: {device_id}", f"    type: {dtype}", "    location: plant-a", "    purpose: telemetry",
                "    owner: ops", f"    status: {status}"]
    return "\n".join(out) + "\n"


def test_registry_deltas_applied_in_a_row_equal_each_new_version() -> None:
    """Deltas stack (a layer over the first version, folded when it grows): each result must look up
    exactly like a direct parse, devices removed and re-added included."""
    rng = random.Random(6)
    devices = {f"dev-{i}": ("sensor", "active") for i in range(200)}
    in_force = parse_registry(_registry_text(devices), "devices.yaml")
    loader_side = in_force
    folded = layered = 0
    for step in range(120):
        for _ in range(rng.randint(1, 8 if step % 10 else 60)):
            device_id = f"dev-{rng.randrange(260)}"
            if device_id in devices and rng.random() < 0.4:
                del devices[device_id]
            else:
                devices[device_id] = (rng.choice(["sensor", "valve"]), rng.choice(["active", "suspended"]))
        if not devices:
            devices["dev-0"] = ("sensor", "active")
        new = parse_registry(_registry_text(devices), "devices.yaml", loader_side)
        delta, changed = registry_delta(loader_side, new)
        in_force = run_to_end(applying_registry(in_force, delta, _shipped(changed)))
        loader_side = new
        assert in_force.revision == new.revision and len(in_force) == len(new)
        assert dict(in_force.devices.items()) == dict(new.devices)
        for i in range(260):
            assert in_force.lookup(f"dev-{i}") == new.lookup(f"dev-{i}")
        layered += isinstance(in_force.devices, Layered)
        folded += not isinstance(in_force.devices, Layered)
    assert layered > 10 and folded > 0  # both shapes were exercised


def test_a_delta_against_another_version_is_refused() -> None:
    first = parse_registry(_registry_text({"a": ("sensor", "active")}), "devices.yaml")
    second = parse_registry(_registry_text({"a": ("valve", "active")}), "devices.yaml")
    third = parse_registry(_registry_text({"a": ("sensor", "suspended")}), "devices.yaml")
    delta, changed = registry_delta(second, third)
    with pytest.raises(DeltaMismatch):
        run_to_end(applying_registry(first, delta, _shipped(changed)))
    # Against nothing (the loader restarted): the whole version, whatever is in force.
    delta, changed = registry_delta(None, third)
    assert run_to_end(applying_registry(first, delta, _shipped(changed))).lookup("a") == third.lookup("a")
    old = parse_policy(MODEL, _policy_text(["p, r1, *, *, *, a/#, publish, allow"]), "m", "p")
    other = parse_policy(MODEL, _policy_text(["p, r2, *, *, *, a/#, publish, allow"]), "m", "p")
    newer = parse_policy(MODEL, _policy_text(["p, r3, *, *, *, a/#, publish, allow"]), "m", "p")
    delta_p, hunk = policy_delta(other, newer)
    with pytest.raises(DeltaMismatch):
        run_to_end(applying_policy(old, delta_p, _shipped(hunk)))


def test_layered_devices_behave_as_a_mapping() -> None:
    base = {"a": 1, "b": 2, "c": 3}
    layered = Layered(base, {"b": 20, "d": 4}, frozenset({"c"}))  # type: ignore[arg-type]
    assert dict(layered) == {"a": 1, "b": 20, "d": 4} and len(layered) == 3
    assert "c" not in layered and layered.get("c") is None and "d" in layered
    with pytest.raises(KeyError):
        layered["c"]
    assert isinstance(FileRegistry(devices=layered, revision="x").lookup("b"), int)
