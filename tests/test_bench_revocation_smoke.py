"""The revocation benchmark at a tiny size: its correctness numbers only, never its times."""

from __future__ import annotations

from pathlib import Path

from bench import revocation


def test_revocation_bench_leaves_no_stale_allow_and_closes_every_revoked_device(tmp_path: Path) -> None:
    result = revocation.run(tmp_path, devices=20, control=3, warmup=1.0, close_timeout=20.0)
    assert result["broker_exit_code"] == 0
    assert result["allowed_before"] > 0  # positive control: the devices were allowed before the change
    assert result["stale_allows"] == 0
    assert result["disconnected"] == 20 and result["still_open"] == 0
    assert result["disconnect_records"] == 20
    assert result["other_disconnects"] == 0
    assert result["control_closed"] == 0 and result["control_allowed_after"] > 0  # the new revision was recorded
    assert result["ok"]
