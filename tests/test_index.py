"""The compiled index returns the same decision and deciding rule as the linear engine and as Casbin."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from pdp.core.engine import decide
from pdp.core.index import PolicyIndex
from pdp.policy.load import load_policy
from pdp.registry.file import Device
from tests.test_engine_vs_casbin import LOCATIONS, PURPOSES, TYPES, _random_policy, _request

ROOT = Path(__file__).resolve().parent.parent


def _device(rng: random.Random) -> Device:
    return Device(f"d{rng.randint(0, 3)}", rng.choice(TYPES), rng.choice(LOCATIONS), rng.choice(PURPOSES), "owner-1", "active")


def test_index_equals_engine_on_many_random_policies(tmp_path: Path) -> None:
    """Pure and fast: 200 random policies x 500 requests."""
    rng = random.Random(1)
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    from pdp.policy.load import parse_rules

    mismatches = []
    for _ in range(200):
        rules = parse_rules(_random_policy(rng, rng.randint(1, 60)), "p.csv")
        index = PolicyIndex(rules)
        for _ in range(500):
            device = _device(rng)
            action, topic = _request(rng, device)
            attrs = device.attributes()
            if index.decide(attrs, action, topic) != decide(rules, attrs, action, topic):
                mismatches.append((action, topic, device))
    assert mismatches == []


def test_index_equals_casbin_on_twenty_thousand_requests(tmp_path: Path) -> None:
    rng = random.Random(2)
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    compared = 0
    for _ in range(20):
        (tmp_path / "policy.csv").write_text(_random_policy(rng, rng.randint(1, 25)))
        policy = load_policy(tmp_path / "model.conf", tmp_path / "policy.csv")
        index = PolicyIndex(policy.rules)
        for _ in range(1000):
            device = _device(rng)
            action, topic = _request(rng, device)
            ours = index.decide(device.attributes(), action, topic)
            reference = policy.reference.decide(device, action, topic)
            assert (ours.allowed, ours.rule_id) == (reference.allowed, reference.rule_id), (action, topic, device)
            compared += 1
    assert compared == 20_000
