"""Policy, model and registry files: every mistake is one line naming file:line and the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pdp.errors import SourceError
from pdp.policy.load import load_policy
from pdp.registry.file import load_registry, parse_registry

ROOT = Path(__file__).resolve().parent.parent


def _policy(tmp_path: Path, text: str, model: str | None = None) -> SourceError:
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    if model is not None:
        (tmp_path / "model.conf").write_text(model)
    (tmp_path / "policy.csv").write_text(text)
    with pytest.raises(SourceError) as info:
        load_policy(tmp_path / "model.conf", tmp_path / "policy.csv")
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("p, r1, *, *, *, a/#, publish, permit\n", 1, "effect 'permit' is not one of allow, deny"),
        ("# c\n\np, r1, *, *, *, a/#, publish\n", 3, "expected 7 fields after 'p'"),
        ("g, alice, admin\n", 1, "only 'p' rules are supported"),
        ("p, r 1, *, *, *, a, publish, allow\n", 1, "rule id 'r 1'"),
        ("p, r1, sen/sor, *, *, a, publish, allow\n", 1, "type 'sen/sor' contains '/'"),
        ("p, r1, *, *, *, a/b+, publish, allow\n", 1, "'+' must be a whole level"),
        ("p, r1, *, *, *, a, publish, allow\np, r1, *, *, *, b, publish, allow\n", 2, "already used at line 1"),
    ],
)
def test_policy_errors_name_the_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    error = _policy(tmp_path, text)
    assert error.line == line
    assert reason in str(error)
    assert str(error).startswith(f"{tmp_path / 'policy.csv'}:{line}: ")


def test_edited_model_is_refused(tmp_path: Path) -> None:
    model = (ROOT / "policies" / "model.conf").read_text().replace("!some(where (p.eft == deny))", "true")
    error = _policy(tmp_path, "p, r1, *, *, *, a, publish, allow\n", model=model)
    assert "model differs from the supported one" in str(error)


def test_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read policy"):
        load_policy(ROOT / "policies" / "model.conf", tmp_path / "nope.csv")
    with pytest.raises(SourceError, match="cannot read registry"):
        load_registry(tmp_path / "nope.yaml")


DEVICE = "  - id: s1\n    type: sensor\n    location: a\n    purpose: p\n    owner: o\n    status: active\n"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("devices:\n  - id: s1\n    type: [x\n", 4, "invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 3)"),
        ("things: []\n", 1, "unknown top-level key 'things'"),
        ("devices:\n" + DEVICE + DEVICE, 8, "device 's1' already defined at line 2"),
        ("devices:\n" + DEVICE.replace("status: active", "status: on"), 7, "status 'on' is not one of"),
        ("devices:\n" + DEVICE.replace("    owner: o\n", ""), 2, "missing field 'owner'"),
        ("devices:\n" + DEVICE.replace("location: a", "location: a/b"), 4, "location 'a/b' contains '/'"),
        ("devices:\n" + DEVICE.replace("id: s1", "id: $s1"), 2, "starts with '$'"),
        ("devices:\n" + DEVICE + "    colour: red\n", 8, "unknown field 'colour'"),
        ("devices:\n" + DEVICE + "    fingerprints: [abc]\n", 8, "not a SHA-256 fingerprint"),
    ],
)
def test_registry_errors_name_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_registry(text, "devices.yaml")
    assert info.value.line == line, str(info.value)
    assert reason in str(info.value)


def test_registry_fingerprints_normalized() -> None:
    fp = "AB:" * 31 + "AB"
    registry = parse_registry("devices:\n" + DEVICE + f"    fingerprints: [\"sha256:{fp}\"]\n", "d.yaml")
    device = registry.lookup("s1")
    assert device is not None and device.fingerprints == frozenset({"ab" * 32})
    assert registry.lookup("s2") is None


def test_example_registry_loads() -> None:
    registry = load_registry(ROOT / "policies" / "devices.yaml")
    assert len(registry) == 6
    statuses = {d: registry.lookup(d).status for d in ("sensor-001", "sensor-900", "dashboard-001")}  # type: ignore[union-attr]
    assert statuses == {"sensor-001": "active", "sensor-900": "suspended", "dashboard-001": "active"}
    assert registry.lookup("nobody") is None
