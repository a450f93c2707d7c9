"""``mqtt-pdp explain``, ``test``, ``who-can``, ``diff``, ``fmt`` and ``report unused``: the policy author's commands.

Thin: each reads the files, calls the pure logic in ``pdp.toolkit`` and prints.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Any

from pdp.cli.main import CliError, _add_policy_args, _pdp_paths, _registry

EXIT_ALLOW, EXIT_DENY = 0, 1


def _out(lines: list[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))


# -- explain --------------------------------------------------------------------------------


def _check_topic(action: str, topic: str) -> None:
    """A filter for subscribe, a topic name otherwise; a bad one is a one-line error, never a silent deny."""
    from pdp.core.topics import TopicError, validate_filter, validate_topic

    try:
        (validate_filter if action == "subscribe" else validate_topic)(topic)
    except TopicError as exc:
        raise CliError(str(exc)) from None


def cmd_explain(args: argparse.Namespace) -> int:
    from pdp.policy.load import load_policy
    from pdp.toolkit.explain import explain, render

    model, policy_path, registry_path, settings = _pdp_paths(args)
    _check_topic(args.action, args.topic)
    adhoc = {name: getattr(args, name) for name in ("type", "location", "purpose", "owner")
             if getattr(args, name) is not None}
    if args.device is None and not adhoc:
        raise CliError("give --device ID, or --type, --location and --purpose for a device not yet registered")
    from pdp.core.identity import device_id_problem
    from pdp.core.topics import level_value_problem

    # The same values a registry or a policy test would refuse are refused here (not explained as a deny).
    for name, value in ([("device", args.device)] if args.device is not None else []) + list(adhoc.items()):
        problem = device_id_problem(value) if name == "device" else level_value_problem(value)
        if problem is not None:
            raise CliError(f"--{name} {value!r} {problem}")
    policy = load_policy(model, policy_path)
    registry = _registry(registry_path, settings)
    device = registry.lookup(args.device) if args.device is not None else None
    notes: list[str] = []
    if device is not None:
        attributes = {**device.attrs, **adhoc}
        admission = None if device.status == "active" else f"device {device.status}"
        state = f"status={device.status}" + (f" fingerprints={len(device.fingerprints)}" if device.fingerprints else "")
        if adhoc:
            notes.append("attributes given on the command line replace the registered ones: "
                         + " ".join(f"{k}={v}" for k, v in adhoc.items()))
    else:
        missing = [name for name in ("type", "location", "purpose") if name not in adhoc]
        if missing and not adhoc:
            _out([
                "decision: deny",
                "rule:     none",
                f"reason:   refused at connect (unknown device: {args.device!r} is not in {registry_path})",
                "note:     give --type, --location and --purpose to see what the rules would decide once it is registered",
            ])
            return EXIT_DENY
        if missing:
            raise CliError(f"a device not in {registry_path} needs --{', --'.join(missing)}")
        attributes = dict(adhoc)
        if args.device is not None:
            attributes["device_id"] = args.device
        admission = None
        state = "status=unregistered"
        notes.append("not in the registry: decided as if registered with these attributes and active"
                     + ("" if args.device is not None else "; without --device, {device_id} binds to nothing"))
    explanation = explain(policy.rules, attributes, args.action, args.topic, admission)
    subject = SimpleNamespace(type=attributes["type"], location=attributes["location"], purpose=attributes["purpose"],
                              attrs=attributes)
    reference = policy.reference.decide(subject, args.action, args.topic)  # type: ignore[arg-type]
    device_line = " ".join(f"{k}={v}" for k, v in attributes.items()) + f" {state}"
    lines = render(explanation, policy_path, device_line=device_line, casbin=reference, verbose=not args.brief)
    _out(lines[:4] + [f"note:     {note}" for note in notes] + lines[4:])
    if (reference.allowed, reference.rule_id) != (explanation.decision.allowed, explanation.decision.rule_id):
        raise CliError("the compiled decision and Casbin's differ (see 'casbin:' above); please report this")
    return EXIT_ALLOW if explanation.allowed else EXIT_DENY


def add_explain(sub: Any) -> None:
    p = sub.add_parser("explain", help="show every rule considered for one request, and which one decides",
                       description="Explain one request: every rule of the action in file order with why it does or "
                                   "does not apply, the placeholders as bound, the deciding rule with file:line, the "
                                   "device's admission state and Casbin's answer beside it. Exit status: 0 allow, "
                                   "1 deny (also a device refused at connect), 2 error.")
    _add_policy_args(p)
    p.add_argument("--device", help="device id from the registry (or the id an unregistered device will have)")
    p.add_argument("--topic", required=True, help="topic name (publish, receive) or filter (subscribe)")
    p.add_argument("--action", required=True, choices=["publish", "subscribe", "receive"])
    p.add_argument("--type", help="device type, for a device not (yet) registered, or to try another value")
    p.add_argument("--location", help="device location (as --type)")
    p.add_argument("--purpose", help="device purpose (as --type)")
    p.add_argument("--owner", help="device owner (as --type; binds {owner})")
    p.add_argument("--brief", action="store_true", help="only the decision, not every rule considered")
    p.set_defaults(func=cmd_explain)


# -- check (lint) ---------------------------------------------------------------------------


def report_lint(policy: Any, registry: Any, policy_path: str, strict: bool) -> int:
    """Print lint findings after ``check``'s summary; silent when there are none."""
    from pdp.toolkit.lint import WARNING, lint

    findings = lint(policy.rules, (device.attrs for device in registry.devices.values()))
    if not findings:
        return 0
    _out([finding.render(policy_path) for finding in findings])
    warnings = sum(finding.severity == WARNING for finding in findings)
    _out([f"lint: {len(findings)} finding{'s' if len(findings) != 1 else ''} ({warnings} warnings)"
          + (" (--strict: failing)" if strict and warnings else "")])
    return 1 if strict and warnings else 0


# -- test -----------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pdp.policy.load import load_policy, read_text
    from pdp.toolkit.explain import render
    from pdp.toolkit.policy_tests import TEST_SUFFIX, parse_cases, run_case, uncovered

    model, policy_path, registry_path, settings = _pdp_paths(args)
    policy = load_policy(model, policy_path)
    registry = _registry(registry_path, settings)
    files = list(args.files) or sorted(str(p) for p in Path(policy_path).parent.glob("*" + TEST_SUFFIX))
    if not files:
        raise CliError(f"no test files: give FILE arguments or put *{TEST_SUFFIX} beside {policy_path}")
    cases = [case for path in files for case in parse_cases(read_text(path, "policy tests"), path, registry.devices)]
    results = [run_case(policy.rules, case) for case in cases]
    lines: list[str] = []
    for result in results:
        case = result.case
        if result.passed and not args.verbose:
            continue
        lines.append(f"{'ok  ' if result.passed else 'FAIL'} {case.path}:{case.line}: {case.name}"
                     + ("" if result.passed else f": {result.problem}"))
        if not result.passed:
            device = " ".join(f"{k}={v}" for k, v in case.attributes.items()) + f" status={case.status}"
            lines.extend("       " + line for line in render(result.explanation, policy_path, device_line=device))
    failed = sum(not result.passed for result in results)
    lines.append(f"{len(results)} cases in {len(files)} file{'s' if len(files) != 1 else ''}: "
                 f"{len(results) - failed} passed, {failed} failed")
    missing = uncovered(policy.rules, results)
    counts = {action: sum(rule.action == action for rule in policy.rules) for action in missing}
    lines.append("coverage: " + ", ".join(f"{action} {counts[action] - len(rules)}/{counts[action]}"
                                          for action, rules in missing.items()) + " rules decided a case")
    for action, rules in missing.items():
        for rule in rules:
            lines.append(f"  not covered: {action} {rule.effect} {rule.rule_id} ({policy_path}:{rule.line})")
    _out(lines)
    if failed or (args.require_coverage and any(missing.values())):
        return 1
    return 0


def add_test(sub: Any) -> None:
    p = sub.add_parser("test", help="run the policy's test cases and report rule coverage",
                       description="Run policy test cases (YAML: device, action, topic, expect, optional rule) against "
                                   "the policy and registry; print each failure with its explanation and the rules no "
                                   "case made decide, per action. Exit status: 0 all passed, 1 a case failed (or a rule "
                                   "is uncovered with --require-coverage), 2 error.")
    _add_policy_args(p)
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="test files (default: every *.test.yaml in the policy file's directory)")
    p.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    p.add_argument("--require-coverage", action="store_true", help="fail when a rule decided no case")
    p.set_defaults(func=cmd_test)


# -- who-can --------------------------------------------------------------------------------


def cmd_who_can(args: argparse.Namespace) -> int:
    import time

    from pdp.policy.load import load_policy
    from pdp.toolkit.whocan import FleetIndex, GroupTotals, group_devices, who_can

    model, policy_path, registry_path, settings = _pdp_paths(args)
    _check_topic(args.action, args.topic)
    policy = load_policy(model, policy_path)
    registry = _registry(registry_path, settings)
    started = time.perf_counter()
    active = {device_id: d for device_id, d in registry.devices.items() if d.status == "active"}
    answer = who_can(policy.rules, FleetIndex(active), args.action, args.topic)
    totals = GroupTotals.of(active.values())
    lines = [f"{args.action} {args.topic}: {len(answer.allowed):,} of {len(active):,} active devices may"]
    for title, decided in (("allow", answer.allowed), ("deny", answer.denied)):
        by_rule: dict[str, list[str]] = {}
        for device_id, rule in decided.items():
            by_rule.setdefault(rule.rule_id, []).append(device_id)
        for rule in policy.rules:
            ids = by_rule.get(rule.rule_id)
            if not ids:
                continue
            lines.append(f"  {title:<5} {rule.rule_id} ({policy_path}:{rule.line}): {len(ids):,} device"
                         f"{'s' if len(ids) != 1 else ''}")
            if args.list:
                lines.extend(f"      {device_id}" for device_id in sorted(ids))
            else:
                lines.extend(f"      {group.label}" for group in group_devices(ids, active, totals))
    untouched = len(active) - len(answer.allowed) - len(answer.denied)
    lines.append(f"  no rule applies to the other {untouched:,} active devices (denied)")
    inactive = len(registry.devices) - len(active)
    if inactive:
        lines.append(f"  {inactive:,} registered devices are not active: refused at connect, not counted")
    if args.timing:
        lines.append(f"  answered in {time.perf_counter() - started:.3f} s after loading"
                     f"{f' ({answer.per_device_rules} rules checked device by device)' if answer.per_device_rules else ''}")
    _out(lines)
    return 0


def add_who_can(sub: Any) -> None:
    p = sub.add_parser("who-can", help="which registered devices may publish, subscribe to or receive on a topic",
                       description="List the active registered devices the policy lets publish, subscribe to or receive "
                                   "on a topic or filter, by deciding rule, grouped by type, location and purpose with "
                                   "counts; devices a deny decides are listed too. Solved from the rules and the "
                                   "registry's attribute index, not by trying every device.")
    _add_policy_args(p)
    p.add_argument("--topic", required=True, help="topic name (publish, receive) or filter (subscribe)")
    p.add_argument("--action", required=True, choices=["publish", "subscribe", "receive"])
    p.add_argument("--list", action="store_true", help="every device id instead of groups")
    p.add_argument("--timing", action="store_true", help="also print the time the answer took after loading the files")
    p.set_defaults(func=cmd_who_can)


# -- diff -----------------------------------------------------------------------------------


def _git_text(rev: str, path: str) -> tuple[str, str]:
    """The file at ``rev`` (e.g. HEAD, main~1) and a name for it in messages."""
    import subprocess
    from pathlib import Path

    where = Path(path).resolve()
    try:
        top = subprocess.run(["git", "-C", str(where.parent), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        rel = where.relative_to(Path(top).resolve()).as_posix()
        text = subprocess.run(["git", "-C", top, "show", f"{rev}:{rel}"], capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, ValueError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise CliError(f"{path}: cannot read it at git revision {rev!r}: {detail.strip().splitlines()[-1] if detail.strip() else exc}") from None
    return text, f"{rev}:{rel}"


def _side(spec: str | None, policy_path: str, registry_path: str) -> tuple[str, str]:
    """A policy/registry pair from a directory (policy.csv, devices.yaml inside) or a policy file."""
    from pathlib import Path

    if spec is None:
        return policy_path, registry_path
    path = Path(spec)
    if path.is_dir():
        return str(path / "policy.csv"), str(path / "devices.yaml")
    return spec, registry_path


def cmd_diff(args: argparse.Namespace) -> int:
    from pdp.policy.load import parse_policy, read_text
    from pdp.registry.file import parse_registry
    from dataclasses import replace

    from pdp.toolkit.diff import device_changes, grouped, phrase, rule_changes
    from pdp.toolkit.whocan import GroupTotals, group_devices

    model, policy_path, registry_path, _ = _pdp_paths(args)
    model_text = read_text(model, "model")
    if args.rev:
        if args.old or args.new_policy or args.new_registry:
            raise CliError("--rev compares a git revision with the working tree; give no other versions with it")
        old_policy, old_policy_name = _git_text(args.rev, policy_path)
        old_registry, old_registry_name = _git_text(args.rev, registry_path)
        new_policy_name, new_registry_name = policy_path, registry_path
    else:
        if args.old and not args.new:
            raise CliError("give both OLD and NEW (or --rev REV, or --new-policy/--new-registry)")
        if args.old:
            old_policy_name, old_registry_name = _side(args.old, policy_path, registry_path)
            new_policy_name, new_registry_name = _side(args.new, policy_path, registry_path)
        else:
            if not args.new_policy and not args.new_registry:
                raise CliError("nothing to compare: give OLD NEW, --rev REV, or --new-policy/--new-registry")
            old_policy_name, old_registry_name = policy_path, registry_path
            new_policy_name, new_registry_name = args.new_policy or policy_path, args.new_registry or registry_path
        old_policy, old_registry = read_text(old_policy_name, "policy"), read_text(old_registry_name, "registry")
    new_policy, new_registry = read_text(new_policy_name, "policy"), read_text(new_registry_name, "registry")
    old_p = parse_policy(model_text, old_policy, model, old_policy_name)
    new_p = parse_policy(model_text, new_policy, model, new_policy_name)
    old_r = parse_registry(old_registry, old_registry_name)
    new_r = parse_registry(new_registry, new_registry_name)

    delta = rule_changes(old_p.rules, new_p.rules)
    lines = [f"rules: {len(delta.added)} added, {len(delta.removed)} removed "
             f"({old_policy_name} -> {new_policy_name}; an edited rule is one of each)"]
    lines += [f"  - p, {', '.join(rule.as_casbin())}  ({old_policy_name}:{rule.line})" for rule in delta.removed]
    lines += [f"  + p, {', '.join(rule.as_casbin())}  ({new_policy_name}:{rule.line})" for rule in delta.added]
    changes = device_changes(old_p.rules, new_p.rules, old_r.devices, new_r.devices)
    devices = {**old_r.devices, **new_r.devices}
    active = [d for d in devices.values() if d.status == "active" or
              (old_r.devices.get(d.device_id) is not None and old_r.devices[d.device_id].status == "active")]
    totals = GroupTotals.of(active)
    lines.append(f"devices: {len(changes):,} of {len(active):,} (active before or after) affected")
    admissions: dict[str, list[str]] = {}
    for dc in changes:
        if dc.admission:
            admissions.setdefault(dc.admission, []).append(dc.device_id)
    for admission, ids in sorted(admissions.items()):
        for group in group_devices(ids, devices, totals):
            lines.append(f"  {group.label}: {admission}")
    for change, ids in grouped(changes, devices):
        for group in group_devices(ids, devices, totals):
            # A value every device of the group shares reads better than its placeholder.
            shown = change
            for name in ("location", "device_id"):
                values = {devices[d].attrs[name] for d in group.members}
                if len(values) == 1:
                    value = values.pop()
                    shown = replace(shown, pattern=shown.pattern.replace("{" + name + "}", value),
                                    example=shown.example and shown.example.replace("{" + name + "}", value))
            lines.append(f"  {group.label} {phrase(shown)}")
    lines.append("not checked: which connected devices a running broker would disconnect (not implemented)")
    _out(lines)
    return 1 if changes else 0


def add_diff(sub: Any) -> None:
    p = sub.add_parser("diff", help="what each device gains and loses between two policy/registry versions",
                       description="Compare two versions of the policy and registry and list, grouped by type, location "
                                   "and purpose, the topics each device gains and loses per action, decided symbolically "
                                   "from the patterns. Versions: OLD NEW (directories holding policy.csv and devices.yaml, "
                                   "or policy files), --rev REV (a git revision against the working tree), or the "
                                   "configured files against --new-policy/--new-registry. Exit status: 0 no device "
                                   "changes, 1 some device gains or loses, 2 error.")
    _add_policy_args(p)
    p.add_argument("old", nargs="?", metavar="OLD", help="old version: a directory or a policy file")
    p.add_argument("new", nargs="?", metavar="NEW", help="new version: a directory or a policy file")
    p.add_argument("--rev", help="compare the configured files at this git revision with the working tree")
    p.add_argument("--new-policy", metavar="FILE", help="new version of the configured policy file")
    p.add_argument("--new-registry", metavar="FILE", help="new version of the configured registry file")
    p.set_defaults(func=cmd_diff)


# -- fmt ------------------------------------------------------------------------------------


def cmd_fmt(args: argparse.Namespace) -> int:
    import difflib
    import os
    from pathlib import Path

    from pdp.policy.load import parse_policy, read_text
    from pdp.toolkit.fmt import format_policy

    model, policy_path, _, _ = _pdp_paths(args)
    path = args.file or policy_path
    model_text, text = read_text(model, "model"), read_text(path, "policy")
    before = parse_policy(model_text, text, model, path)
    formatted = format_policy(text)
    after = parse_policy(model_text, formatted, model, path)
    if [(r.as_casbin(), r.line) for r in before.rules] != [(r.as_casbin(), r.line) for r in after.rules]:
        raise CliError(f"{path}: formatting would change the rules; left as is (please report this)")
    if formatted == text:
        _out([f"{path}: already formatted"])
        return 0
    if args.check or args.diff:
        if args.diff:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True), path,
                                                       f"{path} (formatted)"))
        else:
            _out([f"{path}: would be reformatted"])
        return 1
    from pdp.runtime.sources import write_together

    # Through a symlink to its target, with the file's mode kept, under the apply lock: a running broker sees
    # the old or the new file, never half of one (an outside attack saw a symlink replaced and 640 become 644).
    write_together({os.path.realpath(path): formatted.encode("utf-8")})
    _out([f"{path}: formatted ({len(after.rules)} rules, same meaning)"])
    return 0


def add_fmt(sub: Any) -> None:
    p = sub.add_parser("fmt", help="normalise the policy file's spacing and column alignment",
                       description="Rewrite the policy file with one space after each comma and fields aligned in "
                                   "columns, keeping comments and blank lines; the result must load to the same rules. "
                                   "Exit status: 0 formatted or already formatted, 1 would change (--check, --diff), 2 error.")
    _add_policy_args(p)
    p.add_argument("file", nargs="?", help="policy file (default: the configured one)")
    p.add_argument("--check", action="store_true", help="only report whether the file would change")
    p.add_argument("--diff", action="store_true", help="print the change as a unified diff instead of writing it")
    p.set_defaults(func=cmd_fmt)


# -- report unused (registered with the other reports in pdp.cli.report_commands) ----------------


UNUSED_COLUMNS = ("finding", "rule", "where", "action", "pattern", "devices", "detail")


def unused_rows(args: argparse.Namespace, since: float | None) -> list[dict[str, Any]]:
    """The ``report unused`` findings: rules that decided nothing, grants some devices never used, narrower patterns."""
    from pdp.cli.log_commands import _open
    from pdp.evidence.store import QueryFilters
    from pdp.policy.load import load_policy
    from pdp.toolkit.unused import Use, usage
    from pdp.toolkit.whocan import FleetIndex, GroupTotals, group_devices

    model, policy_path, registry_path, settings = _pdp_paths(args)
    policy = load_policy(model, policy_path)
    registry = _registry(registry_path, settings)
    store = _open(args)
    uses: list[Use] = []
    try:
        for action in ("publish", "subscribe", "receive"):
            for _, record in store.query(QueryFilters(action=action, decision="allow", since=since)):
                if record.device_id is None or record.rule_id is None or record.topic is None:
                    continue
                attrs = {"device_id": record.device_id, "type": record.type, "location": record.location,
                         "purpose": record.purpose, "owner": record.owner}
                known = registry.lookup(record.device_id)
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
    totals = GroupTotals.of(active.values())
    rows: list[dict[str, Any]] = []
    for u in usage(policy.rules, granted, uses):
        base = {"rule": u.rule.rule_id, "where": f"{policy_path}:{u.rule.line}", "action": u.rule.action,
                "pattern": u.rule.topic}
        if u.uses == 0:
            rows.append({**base, "finding": "unused rule", "devices": len(u.devices_granted),
                         "detail": "decided no request in the period"})
            continue
        if u.unused_by:
            groups = [g.label for g in group_devices(u.unused_by, active, totals)]
            rows.append({**base, "finding": "unused grant", "devices": len(u.unused_by),
                         "detail": f"used by {len(u.devices_used & u.devices_granted)} of {len(u.devices_granted)}; "
                                   f"not by: {'; '.join(groups)}", "not_used_by": sorted(u.unused_by)})
        if u.suggestion:
            rows.append({**base, "finding": "narrower", "devices": len(u.devices_used),
                         "detail": f"-> {u.suggestion} (grants every one of the {u.uses} recorded uses)", "suggestion": u.suggestion})
    return rows


def unused_report(report_type: Any, since_of: Any) -> Any:
    """The ``unused`` report for ``pdp.cli.report_commands`` (its Report type and --since parser are passed in)."""

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help="Casbin model file (default: from config, else policies/model.conf)")
        parser.add_argument("--policy", help="policy rules file (default: from config, else policies/policy.csv)")
        parser.add_argument("--since", default="30d", help="period of the log to read: 30d, 12h or an ISO time "
                                                           "(default: 30d)")

    return report_type("unused", "allow rules and per-device grants no recorded access used in the period, and "
                                 "narrower patterns the evidence supports (least privilege)", UNUSED_COLUMNS,
                       lambda a, c: unused_rows(a, since_of(a, c)), add)


def add_arguments(sub: Any) -> None:
    """Register the policy author's commands on the top-level subparsers."""
    add_explain(sub)
    add_test(sub)
    add_who_can(sub)
    add_diff(sub)
    add_fmt(sub)
