"""``mqtt-pdp report``: findings for a security team's weekly review, for cron and CI.

Each report is a ``Report`` in ``REPORTS``: its name, its columns, its own options and a
function from (arguments, context) to rows. Another report (for example ``unused``
grants from the policy toolkit) is one more ``register(Report(...))``; the output
formats, ``--fail-over`` and the exit codes are shared.

Exit status: 0 when the findings are at most ``--fail-over`` (or it is not given),
1 when there are more, 2 on an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any


class ReportCliError(Exception):
    """One line for the user, exit status 2."""


@dataclass
class Context:
    """What reports read, loaded on first use: the registry, the log's facts, the broker settings."""

    args: argparse.Namespace
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @cached_property
    def settings(self) -> dict[str, Any]:
        from pdp.runtime.config import settings_of

        return settings_of(self.args.config)

    @cached_property
    def registry(self) -> Any:
        from pdp.cli.device_commands import _load

        path = self.args.registry or self.settings.get("registry") or "policies/devices.yaml"
        return _load(path, self.args, self.settings)[1]

    def facts(self, since: float | None = None) -> Any:
        from pdp.evidence.store import AssertionStore
        from pdp.governance.facts import read_facts

        path = str(self.args.db or self.settings.get("assertion_db") or "var/assertions.db")
        try:
            store = AssertionStore(path, readonly=True)
        except FileNotFoundError:
            raise ReportCliError(f"no assertion database at {path} (has the broker run? use --db)") from None
        try:
            return read_facts(store, since)
        finally:
            store.close()


@dataclass(frozen=True)
class Report:
    name: str
    help: str
    columns: tuple[str, ...]
    run: Callable[[argparse.Namespace, Context], list[dict[str, Any]]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


REPORTS: dict[str, Report] = {}


def register(report: Report) -> None:
    REPORTS[report.name] = report


def _since(args: argparse.Namespace, ctx: Context) -> float | None:
    from pdp.cli.log_commands import LogCliError, parse_time

    try:
        return parse_time(args.since, ctx.now.timestamp()) if args.since else None
    except LogCliError as exc:
        raise ReportCliError(str(exc)) from None


def _trusted_issuers(args: argparse.Namespace, ctx: Context) -> frozenset[str]:
    """The subjects of the CA certificates given (--ca), else of the broker listeners' cafile."""
    from cryptography import x509

    paths = list(args.ca or [])
    if not paths and args.config:
        from pdp.runtime.config import load_broker_config

        config = load_broker_config(args.config, check_files=False)
        paths = sorted({listener["cafile"] for listener in config["listeners"].values()
                        if isinstance(listener, dict) and listener.get("cafile")})
    if not paths:
        raise ReportCliError("untrusted: give the trusted CA certificates (--ca FILE) or a broker config (-c)")
    subjects: set[str] = set()
    for path in paths:
        try:
            data = Path(path).read_bytes()
            subjects.update(cert.subject.rfc4514_string() for cert in x509.load_pem_x509_certificates(data))
        except (OSError, ValueError) as exc:
            raise ReportCliError(f"{path}: cannot read CA certificates: {exc}") from None
    return frozenset(subjects)


def _builtin() -> None:
    from pdp.governance import reports as r

    def days(default: float) -> Callable[[argparse.ArgumentParser], None]:
        def add(parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--days", type=float, default=default, help=f"window in days (default: {default:g})")
        return add

    def since(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--since", default="7d", help="period of the log to read: 7d, 24h or an ISO time "
                                                          "(default: 7d)")

    register(Report("expiring", "bound certificates whose notAfter falls within --days (expired ones included)",
                    ("device_id", "owner", "status", "fingerprint", "serial", "expires", "days_left", "last_seen"),
                    lambda a, c: r.expiring(c.registry.devices.values(), c.facts(), c.now, a.days), days(30)))
    register(Report("unseen", "active devices never seen, or not seen for --days",
                    ("device_id", "owner", "type", "location", "last_seen", "days_unseen"),
                    lambda a, c: r.unseen(c.registry.devices.values(), c.facts(), c.now, a.days), days(30)))
    register(Report("unbound", "active devices with no bound certificate (any certificate the CA issues for the "
                               "id admits them)", ("device_id", "owner", "type", "last_fingerprint", "last_seen"),
                    lambda a, c: r.unbound(c.registry.devices.values(), c.facts(), c.now)))
    register(Report("shared", "certificates seen on more than one connection, address, client id or device",
                    ("fingerprint", "devices", "client_ids", "addresses", "shared_records", "connects", "last_seen"),
                    lambda a, c: r.shared(c.facts(_since(a, c))), since))

    def ca(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ca", action="append", metavar="FILE",
                            help="PEM file of trusted CA certificates (repeatable; default: the listeners' cafile "
                                 "of -c)")

    register(Report("untrusted", "devices whose last certificate was issued by a CA no longer trusted",
                    ("device_id", "owner", "status", "issuer", "fingerprint", "last_seen"),
                    lambda a, c: r.untrusted(c.registry.devices.values(), c.facts(), _trusted_issuers(a, c)), ca))
    from pdp.cli.policy_commands import unused_report

    register(unused_report(Report, _since))


def add_arguments(sub: Any) -> None:
    if not REPORTS:
        _builtin()
    report = sub.add_parser("report", help="governance findings from the registry and the assertion log",
                            description="Findings for the weekly review: table, JSON or CSV; with --fail-over N the "
                                        "exit status is 1 when there are more than N findings (cron, CI).")
    rsub = report.add_subparsers(dest="report_name", required=True, metavar="REPORT")
    for item in REPORTS.values():
        p = rsub.add_parser(item.name, help=item.help, description=item.help)
        p.add_argument("-c", "--config", help="broker config to take the registry, database and CA paths from")
        p.add_argument("--registry", help="device registry file (default: from config, else policies/devices.yaml)")
        p.add_argument("--db", help="assertion database (default: assertion_db from config, else var/assertions.db)")
        p.add_argument("--format", choices=["table", "json", "csv"], default="table")
        p.add_argument("--fail-over", type=int, metavar="N", help="exit 1 when there are more than N findings")
        item.add_arguments(p)
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdp.cli.output import emit

    report = REPORTS[args.report_name]
    rows = report.run(args, Context(args))
    emit(rows, report.columns, args.format, sys.stdout)
    if args.format == "table":
        sys.stderr.write(f"{args.report_name}: {len(rows)} finding(s)\n")
    return 1 if args.fail_over is not None and len(rows) > args.fail_over else 0
