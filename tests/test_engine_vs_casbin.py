"""The PDP's decision and deciding rule equal Casbin's, loaded from the same model and policy files."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from pdp.core.engine import decide
from pdp.policy.load import load_policy
from pdp.registry.file import Device

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["sensor", "gateway", "cam"]
LOCATIONS = ["plant-a", "plant-b"]
PURPOSES = ["telemetry", "control"]
LEVELS = ["sites", "plant-a", "plant-b", "x", "cmd", "", "$SYS"]
PATTERN_LEVELS = LEVELS[:-1] + ["+", "{device_id}", "{location}", "{type}", "{owner}", "x-{type}"]


def _pattern(rng: random.Random) -> str:
    levels = [rng.choice(PATTERN_LEVELS) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.5 or not levels:
        levels.append("#")
    if rng.random() < 0.05:
        levels[0] = "$SYS"
    return "/".join(levels) or "#"


def _random_policy(rng: random.Random, n: int) -> str:
    lines = []
    for i in range(n):
        lines.append(", ".join([
            "p", f"r{i}",
            rng.choice(TYPES + ["*"]), rng.choice(LOCATIONS + ["*"]), rng.choice(PURPOSES + ["*"]),
            _pattern(rng), rng.choice(["publish", "subscribe", "receive"]), rng.choice(["allow", "allow", "deny"]),
        ]))
    return "\n".join(lines) + "\n"


def _request(rng: random.Random, device: Device) -> tuple[str, str]:
    action = rng.choice(["publish", "subscribe", "receive"])
    values = LEVELS + [device.device_id, device.location, f"x-{device.type}"]
    levels = [rng.choice(values) for _ in range(rng.randint(1, 4))]
    if action == "subscribe":
        levels = [lvl if rng.random() < 0.7 else "+" for lvl in levels]
        if rng.random() < 0.4:
            levels.append("#")
    levels = [lvl for i, lvl in enumerate(levels) if not (lvl == "$SYS" and i > 0)] or ["x"]
    return action, "/".join(levels) or "x"


def test_differential_against_casbin(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    checked = 0
    for round_ in range(8):
        (tmp_path / "policy.csv").write_text(_random_policy(rng, rng.randint(1, 40)))
        policy = load_policy(tmp_path / "model.conf", tmp_path / "policy.csv")
        for _ in range(400):
            device = Device(f"d{rng.randint(0, 3)}", rng.choice(TYPES), rng.choice(LOCATIONS), rng.choice(PURPOSES),
                            "owner-1", "active")
            action, topic = _request(rng, device)
            ours = decide(policy.rules, device.attributes(), action, topic)
            casbin = policy.reference.decide(device, action, topic)
            assert (ours.allowed, ours.rule_id) == (casbin.allowed, casbin.rule_id), (round_, device, action, topic)
            checked += 1
    assert checked == 3200


def test_example_policy_loads_and_agrees() -> None:
    policy = load_policy(ROOT / "policies" / "model.conf", ROOT / "policies" / "policy.csv")
    device = Device("sensor-001", "sensor", "plant-a", "telemetry", "ops-team", "active")
    for action, topic, allowed in [
        ("publish", "sites/plant-a/sensor-001/telemetry", True),
        ("publish", "sites/plant-a/sensor-002/telemetry", False),
        ("subscribe", "sites/plant-a/sensor-001/cmd", True),
        ("subscribe", "sites/plant-a/#", False),
    ]:
        ours = decide(policy.rules, device.attributes(), action, topic)
        assert ours.allowed is allowed
        assert ours == policy.reference.decide(device, action, topic)
