"""``mqtt-pdp report``: reports built from the policy, the registry and the assertion log.

Each report is one subcommand registered in ``REPORTS``; ``unused`` is the first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pdp.cli.main import _add_policy_args, _pdp_paths


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _out(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))


def cmd_unused(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from pdp.cli.log_commands import _open, parse_time
    from pdp.evidence.store import QueryFilters
    from pdp.policy.load import load_policy
    from pdp.registry.file import load_registry
    from pdp.toolkit.unused import Use, usage
    from pdp.toolkit.whocan import FleetIndex, GroupTotals, group_devices

    model, policy_path, registry_path, _ = _pdp_paths(args)
    since = parse_time(args.since)
    policy = load_policy(model, policy_path)
    registry = load_registry(registry_path)
    store = _open(args)
    uses: list[Use] = []
    try:
        for action in ("publish", "subscribe", "receive"):
            for _, record in store.query(QueryFilters(action=action, decision="allow", since=since)):
                if record.device_id is None or record.rule_id is None or record.topic is None:
                    continue
                known = registry.lookup(record.device_id)
                attrs = {"device_id": record.device_id, "type": record.type, "location": record.location,
                         "purpose": record.purpose, "owner": record.owner}
                if any(value is None for value in attrs.values()) and known is not None:
                    attrs = dict(known.attrs)
                uses.append(Use(record.device_id, {k: v for k, v in attrs.items() if v is not None}, action,
                                record.topic, record.rule_id))
    finally:
        store.close()
    active = {device_id: d for device_id, d in registry.devices.items() if d.status == "active"}
    fleet = FleetIndex(active)
    granted = {rule.rule_id: list(fleet.selecting({n: getattr(rule, n) for n in ("type", "location", "purpose")
                                                   if getattr(rule, n) != "*"}))
               for rule in policy.rules if rule.effect == "allow"}
    report = usage(policy.rules, granted, uses)
    totals = GroupTotals.of(active.values())
    started = datetime.fromtimestamp(since, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    lines = [f"allowed requests since {started}: {len(uses):,} records"]
    unused = [u for u in report if u.uses == 0]
    lines.append(f"allow rules that decided nothing: {len(unused)} of {len(report)}")
    lines += [f"  {policy_path}:{u.rule.line} {u.rule.rule_id} ({u.rule.action} {u.rule.topic}; granted to "
              f"{_n(len(u.devices_granted), 'active device')})" for u in unused]
    partial = [u for u in report if u.uses and u.unused_by]
    lines.append(f"allow rules some granted devices never used: {len(partial)}")
    for u in partial:
        lines.append(f"  {policy_path}:{u.rule.line} {u.rule.rule_id}: used by {len(u.devices_used & u.devices_granted):,} "
                     f"of {len(u.devices_granted):,} devices; not by")
        lines.extend(f"      {group.label}" for group in group_devices(u.unused_by, active, totals))
    narrower = [u for u in report if u.suggestion]
    lines.append(f"narrower patterns the evidence supports: {len(narrower)}")
    lines += [f"  {policy_path}:{u.rule.line} {u.rule.rule_id}: {u.rule.topic} -> {u.suggestion} "
              f"({_n(u.uses, 'use')} by {_n(len(u.devices_used), 'device')})" for u in narrower]
    _out(lines)
    return 0


REPORTS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _unused_args(p: argparse.ArgumentParser) -> None:
    _add_policy_args(p)
    p.add_argument("--since", default="30d", help="period to look at: 30d, 12h, or an ISO 8601 time (default: 30d)")
    p.add_argument("--db", help="assertion database (default: assertion_db of -c, else deploy/broker.yaml's, else var/assertions.db)")


REPORTS["unused"] = ("allow rules and per-device grants no recorded access used, with narrower patterns",
                     "Least privilege from evidence: the allow rules that decided no request in the period, the "
                     "devices granted a rule that never used it, and a narrower pattern where every use fits one.",
                     _unused_args, cmd_unused)


def add_arguments(sub: Any) -> None:
    report = sub.add_parser("report", help="reports from the policy, the registry and the assertion log",
                            description="Reports built from the policy, the registry and the assertion log.")
    report_sub = report.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    for name, (short, long, add, func) in REPORTS.items():
        p = report_sub.add_parser(name, help=short, description=long)
        add(p)
        p.set_defaults(func=func)
