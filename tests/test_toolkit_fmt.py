"""``mqtt-pdp fmt``: the formatted file loads to the same rules on the same lines, keeps comments, and is stable."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from pdp.policy.load import parse_rules
from pdp.toolkit.fmt import format_policy
from tests.test_cli import ROOT, assert_one_line_error, run
from tests.test_engine_vs_casbin import _random_policy


def _messy(rng: random.Random, text: str) -> str:
    """The same rules with random spacing, comments and blank lines between them."""
    out = []
    for line in text.splitlines():
        if rng.random() < 0.2:
            out.append(rng.choice(["# a comment, with commas", "", "   ", "#", "  # indented comment  "]))
        fields = [field.strip() for field in line.split(",")]
        out.append(",".join(rng.choice(["", " ", "  ", "\t"]) + f + rng.choice(["", " ", "   "]) for f in fields))
    return "\n".join(out) + rng.choice(["", "\n", "\n\n"])


def test_round_trip_keeps_meaning_on_random_policies() -> None:
    rng = random.Random(6)
    for _ in range(200):
        messy = _messy(rng, _random_policy(rng, rng.randint(1, 15)))
        formatted = format_policy(messy)
        before, after = parse_rules(messy, "p.csv"), parse_rules(formatted, "p.csv")
        assert before == after  # ids, selectors, patterns, actions, effects and line numbers
        assert format_policy(formatted) == formatted
        comments = [line.strip() for line in messy.splitlines() if line.strip().startswith("#")]
        assert [line.strip() for line in formatted.splitlines() if line.strip().startswith("#")] == comments


def test_columns_line_up() -> None:
    text = "# rules\np,a,*,*,*,x/#,publish,allow\np, longer-id , sensor, plant-a, *, {location}/y, receive, deny\n"
    assert format_policy(text) == (
        "# rules\n"
        "p, a,         *,      *,       *, x/#,          publish, allow\n"
        "p, longer-id, sensor, plant-a, *, {location}/y, receive, deny\n")


def test_cli_fmt_check_write_and_errors(tmp_path: Path) -> None:
    shutil.copy(ROOT / "policies" / "policy.csv", tmp_path / "policy.csv")
    policy = tmp_path / "policy.csv"
    original = policy.read_text()
    check = run("fmt", "--check", str(policy))
    assert check.returncode == 1 and check.stdout == f"{policy}: would be reformatted\n"
    assert policy.read_text() == original
    wrote = run("fmt", str(policy))
    assert wrote.returncode == 0 and wrote.stdout == f"{policy}: formatted (11 rules, same meaning)\n", wrote.stderr
    assert parse_rules(policy.read_text(), "p") == parse_rules(original, "p")
    assert run("fmt", "--check", str(policy)).returncode == 0
    assert run("test", "--policy", str(policy), str(ROOT / "policies" / "policy.test.yaml")).returncode == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("p, r1, *, *, *, a/#, publish, allow\np, r2, *, *, *, a/#/b, publish, allow\n")
    assert_one_line_error(run("fmt", str(bad)), f"{bad}:2: ")


def test_fmt_writes_through_a_symlink_and_keeps_the_mode(tmp_path: Path) -> None:
    """Found by an outside attack: fmt replaced a symlink by a file (the target stayed unformatted) and turned
    mode 640 into 644."""
    import os
    import stat

    target = tmp_path / "real" / "policy.csv"
    target.parent.mkdir()
    target.write_text("p,r1,*,*,*,a/#,publish,allow\n")
    target.chmod(0o640)
    link = tmp_path / "policy.csv"
    link.symlink_to(target)
    result = run("fmt", str(link), "--model", str(ROOT / "policies" / "model.conf"))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and target.read_text() == "p, r1, *, *, *, a/#, publish, allow\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
