"""``who-can`` gives every device the engine's decision, solved from the rules; the CLI groups the answer."""

from __future__ import annotations

import random

from pdp.core.engine import decide
from pdp.policy.load import parse_rules
from pdp.registry.device import Device
from pdp.toolkit.whocan import PER_DEVICE, FleetIndex, GroupTotals, group_devices, solve, who_can
from tests.test_cli import ROOT, assert_one_line_error, run
from tests.test_engine_vs_casbin import LOCATIONS, OWNERS, PURPOSES, TYPES, _random_policy, _request

POLICY = ROOT / "policies" / "policy.csv"
IDS = ["d0", "d1", "d2", "d3", "ops", "sensor", "plant-a", "x"]  # some ids equal literals of the generated patterns


def _fleet(rng: random.Random, n: int) -> dict[str, Device]:
    devices = {}
    for i in range(n):
        device_id = IDS[i] if i < len(IDS) else f"dev{i}"
        devices[device_id] = Device(device_id, rng.choice(TYPES), rng.choice(LOCATIONS), rng.choice(PURPOSES),
                                    rng.choice(OWNERS), "active")
    return devices


def test_who_can_equals_the_engine_for_every_device() -> None:
    rng = random.Random(4)
    requests = per_device = allowed_total = denied_total = 0
    for _ in range(120):
        rules = parse_rules(_random_policy(rng, rng.randint(1, 30)), "p.csv")
        devices = _fleet(rng, rng.randint(1, 14))
        fleet = FleetIndex(devices)
        for _ in range(25):
            aim = rng.choice(list(devices.values()))
            action, topic = _request(rng, aim, rules)
            answer = who_can(rules, fleet, action, topic)
            requests += 1
            per_device += answer.per_device_rules
            for device_id, device in devices.items():
                truth = decide(rules, device.attrs, action, topic)
                got = answer.allowed.get(device_id) or answer.denied.get(device_id)
                assert (got.rule_id if got else None) == truth.rule_id, (action, topic, device, got, truth)
                assert (device_id in answer.allowed) == truth.allowed
            allowed_total += len(answer.allowed)
            denied_total += len(answer.denied)
    # The generated load reaches allows, denies and the per-device fallback, so the comparison is not vacuous.
    assert allowed_total > requests and denied_total > requests / 4 and per_device > 0, (allowed_total, denied_total)


def test_solver_fixes_attributes_from_the_topic() -> None:
    rule = parse_rules("p, r, *, *, *, sites/{location}/dev-{device_id}/#, publish, allow\n", "p.csv")[0]
    assert solve(rule, "sites/plant-3/dev-42/x") == {"location": "plant-3", "device_id": "42"}
    assert solve(rule, "sites/plant-3/42/x") is None
    sub = parse_rules("p, r, *, *, *, a/{location}/#, subscribe, allow\np, d, *, *, *, a/{location}/#, subscribe, deny\n",
                      "p.csv")
    assert solve(sub[0], "a/+/#") is None  # a bound level never covers '+'
    assert solve(sub[1], "a/+/#") == {}  # a deny overlaps it for every location
    two = parse_rules("p, r, *, *, *, a/{type}.{location}, publish, allow\n", "p.csv")[0]
    assert solve(two, "a/x.y") is PER_DEVICE


def test_groups_read_as_a_few_lines() -> None:
    devices = {f"cam{i}": Device(f"cam{i}", "camera", "plant-3", "video", "o", "active") for i in range(2314)}
    devices.update({f"s{i}": Device(f"s{i}", "sensor", "plant-3" if i < 5 else "plant-4", "telemetry", "o", "active")
                    for i in range(10)})
    chosen = [d for d in devices if d.startswith("cam")] + ["s0", "s1", "s5"]
    labels = [g.label for g in group_devices(chosen, devices, GroupTotals.of(devices.values()))]
    assert labels == ["all 2,314 camera devices", "2 of 5 sensor devices in plant-3 with purpose telemetry: s0, s1",
                      "1 of 5 sensor devices in plant-4 with purpose telemetry: s5"]


def test_cli_who_can_on_the_example_policy() -> None:
    result = run("who-can", "--topic", "sites/plant-a/sensor-001/cmd", "--action", "receive")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "receive sites/plant-a/sensor-001/cmd: 2 of 4 active devices may",
        f"  allow sensor-cmd-recv ({POLICY}:8): 1 device",
        "      the only sensor device in plant-a: sensor-001",
        f"  allow dashboard-watch-recv ({POLICY}:13): 1 device",
        "      the only dashboard device: dashboard-001",
        "  no rule applies to the other 2 active devices (denied)",
        "  2 registered devices are not active: refused at connect, not counted",
    ]
    secret = run("who-can", "--topic", "sites/plant-a/secret/key", "--action", "receive", "--list")
    assert secret.stdout.splitlines()[:2] == ["receive sites/plant-a/secret/key: 0 of 4 active devices may",
                                              f"  deny  secrets-never ({POLICY}:15): 4 devices"]
    assert "      valve-001" in secret.stdout.splitlines()
    assert_one_line_error(run("who-can", "--topic", "a/#", "--action", "receive"), "wildcard")
