"""The README's "Policy author's workflow" shows real output: the example is run again and every output
line the README shows must come out of these commands (in a git repository holding a copy of policies/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.test_cli import ROOT, run

MISTAKES = ("p, sensor-broadcast, sensr, *, *, sites/{location}/broadcast, receive, allow\n"
            "p, dashboard-any-plant, dashboard, *, monitoring, sites/+/+/cmd, publish, allow\n")
NEW_CASE = ("  - name: sensors hear their plant's broadcast\n    device: sensor-002\n    action: receive\n"
            "    topic: sites/plant-b/broadcast\n    expect: allow\n    rule: sensor-broadcast\n")


def _readme_outputs() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Policy author's workflow"):text.index("**explain** traces")]
    blocks = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    # Output lines: everything in the indented blocks but the rules and the test case the text shows as input.
    return [line for line in blocks if not line.startswith(("p, ", "cases:", "- name", "device:", "action:", "topic:",
                                                              "expect:", "rule: sensor"))]


def test_workflow_output_in_the_readme_is_real(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "policies", repo / "policies")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "policy"], check=True)
    policy, tests = repo / "policies" / "policy.csv", repo / "policies" / "policy.test.yaml"
    policy.write_text(policy.read_text() + MISTAKES)
    produced: list[str] = []

    def shell(*args: str) -> None:
        result = run(*args, cwd=repo)
        assert result.returncode in (0, 1), result.stderr
        produced.extend(["$ mqtt-pdp " + " ".join(args), *result.stdout.splitlines()])

    shell("check")
    shell("test")
    policy.write_text(policy.read_text().replace(", sensr,", ", sensor,").replace(MISTAKES.splitlines()[1] + "\n", ""))
    tests.write_text(tests.read_text() + NEW_CASE)
    shell("check", "--strict")
    shell("test", "--require-coverage")
    shell("explain", "--device", "sensor-001", "--topic", "sites/plant-b/broadcast", "--action", "receive")
    shell("who-can", "--topic", "sites/plant-a/broadcast", "--action", "receive")
    shell("diff", "--rev", "HEAD")
    shell("fmt")
    shown = _readme_outputs()
    assert len(shown) > 40
    missing = [line for line in shown if line not in produced]
    assert missing == [], missing
