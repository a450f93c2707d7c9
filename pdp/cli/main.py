"""mqtt-pdp: run the hardened broker, make a development PKI, check and explain the policy."""

from __future__ import annotations

import argparse
import logging
import re
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pdp.errors import SourceError
from pdp.evidence.text import safe
from pdp.runtime.config import DEFAULT_CONFIG

log = logging.getLogger("mqtt_pdp.cli")


LOG_LEVELS = ["debug", "info", "warning", "error"]  # as pdp.runtime.logs.LEVELS (not imported: --help stays fast)


class CliError(Exception):
    """One line for the user, exit status 2."""


# -- shared -------------------------------------------------------------------------------


def _pdp_paths(args: argparse.Namespace) -> tuple[str, str, str, dict[str, Any]]:
    """model, policy, registry and the plugin settings, from -c and the explicit overrides."""
    from pdp.runtime.config import settings_of
    from pdp.runtime.settings import ServiceSettings

    settings = settings_of(args.config)
    defaults = ServiceSettings()
    model = args.model or settings.get("model", defaults.model)
    policy = args.policy or settings.get("policy", defaults.policy)
    registry = args.registry or settings.get("registry", defaults.registry)
    return model, policy, registry, settings


def _registry(location: str, settings: dict[str, Any]) -> Any:
    """The registry file, or the Redis registry when the location is a redis:// URL."""
    from pdp.cli.device_commands import _load

    return _load(location, argparse.Namespace(), settings)[1]


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help=f"broker config to take file paths from (default: {DEFAULT_CONFIG} if present)")
    parser.add_argument("--model", help="Casbin model file (default: from config, else policies/model.conf)")
    parser.add_argument("--policy", help="policy rules file (default: from config, else policies/policy.csv)")
    parser.add_argument("--registry", help="device registry file (default: from config, else policies/devices.yaml)")


# -- check / explain ------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from pdp.policy.load import load_policy
    from pdp.core.admission import AdmissionSettings, SettingsError
    from pdp.runtime.decision_point import check_client_ids
    from pdp.runtime.settings import ServiceSettings

    model, policy_path, registry_path, settings = _pdp_paths(args)
    policy = load_policy(model, policy_path)
    registry = _registry(registry_path, settings)
    pattern = settings.get("client_id", ServiceSettings().client_id)
    try:
        AdmissionSettings(client_id_pattern=pattern)  # the broker refuses to start on what this refuses
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    check_client_ids(pattern, registry)
    by_status: dict[str, int] = {}
    for device in registry.devices.values():
        by_status[device.status] = by_status.get(device.status, 0) + 1
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(by_status.items())) or "none"
    print(f"ok: {policy_path}: {len(policy.rules)} rules (revision {policy.revision})")
    print(f"ok: {registry_path}: {len(registry)} devices ({statuses}) (revision {registry.revision})")
    from pdp.cli.policy_commands import report_lint

    return report_lint(policy, registry, policy_path, args.strict)


# -- pki ------------------------------------------------------------------------------------


def cmd_pki(args: argparse.Namespace) -> int:
    try:
        return _write_pki(args)
    except OSError as exc:  # where --out cannot be written: say which path and why, in one line
        raise CliError(f"cannot write to --out {args.out}: {exc.strerror or exc}"
                       + (f": {exc.filename}" if exc.filename else "")) from None


def _write_pki(args: argparse.Namespace) -> int:
    from pdp import pki
    from pdp.core.identity import device_id_problem
    from pdp.registry.file import load_registry

    out = Path(args.out)
    if not 1 <= args.days <= MAX_CERT_DAYS:
        raise CliError(f"--days {args.days}: a certificate must be valid for 1 to {MAX_CERT_DAYS} days")
    domain = args.trust_domain
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", domain):
        raise CliError(f"--trust-domain {safe(domain)!r}: use a lower-case DNS name (letters, digits, '.', '-'), "
                       "as the broker compares it")
    for hostname in args.hostname:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", hostname):
            raise CliError(f"--hostname {safe(hostname)!r}: use an ASCII DNS name")
    device_ids: list[str] = list(args.device or [])
    if not device_ids:
        device_ids = sorted(load_registry(args.registry).devices)
    for device_id in device_ids:
        problem = device_id_problem(device_id)
        if problem is None and not device_id.isascii():
            problem = "is not ASCII (a URI SAN cannot carry it; register an ASCII id)"
        if problem is not None:
            raise CliError(f"device id {safe(device_id)!r} {problem}")
    ca_cert, ca_key = out / "ca.pem", out / "ca-key.pem"
    if ca_cert.exists() and ca_key.exists() and not args.force:
        try:
            ca = pki.load_issued(ca_cert, ca_key)
        except (ValueError, OSError) as exc:
            raise CliError(f"cannot use existing CA in {out}: {exc} (use --force to replace it)") from None
        print(f"using CA {ca_cert}")
    else:
        ca = pki.make_ca()
        ca.write(ca_cert, ca_key)
        pki.issue_server(ca, tuple(args.hostname)).write(out / "server.pem", out / "server-key.pem")
        print(f"created CA {ca_cert} and broker certificate {out / 'server.pem'}")
    if not (out / "server.pem").exists():
        pki.issue_server(ca, tuple(args.hostname)).write(out / "server.pem", out / "server-key.pem")
    for device_id in device_ids:
        issued = pki.issue_device(ca, device_id, args.trust_domain, days=args.days)
        cert_path = out / "devices" / f"{device_id}.pem"
        issued.write(cert_path, out / "devices" / f"{device_id}-key.pem")
        print(f"device {device_id}: {cert_path} ({pki.spiffe_id(args.trust_domain, device_id)}, "
              f"sha256 {pki.fingerprint(issued)})")
    return 0


def cmd_l2_key(args: argparse.Namespace) -> int:
    """Write the secret that authenticates L2 entries; owner-only, since whoever holds it can forge decisions."""
    import os
    import secrets

    path = Path(args.out)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; every broker sharing the Redis needs the same key (use --force to replace it)")
    if not path.parent.is_dir():
        raise CliError(f"{path.parent} is not a directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    os.chmod(path, 0o600)  # a replaced file keeps its old mode otherwise
    print(f"wrote {path} (32 random bytes); copy it to every broker sharing the Redis and set l2_key_file")
    return 0


# -- broker ---------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from broker_plugin.run import BrokerFailed, run_broker
    from pdp.policy.load import load_policy
    from pdp.registry.file import load_registry
    from pdp.runtime.config import load_broker_config, plugin_settings
    from pdp.runtime.settings import ServiceSettings

    config = load_broker_config(args.config)
    settings = plugin_settings(config)
    unknown = set(settings) - set(ServiceSettings.__dataclass_fields__)
    if unknown:
        raise CliError(f"{args.config}: unknown plugin settings: {', '.join(sorted(unknown))}")
    defaults = ServiceSettings()
    load_policy(settings.get("model", defaults.model), settings.get("policy", defaults.policy))
    from pdp.registry.redis_registry import is_redis_url

    if not is_redis_url(settings.get("registry", defaults.registry)):  # a Redis registry is loaded by the broker
        load_registry(settings.get("registry", defaults.registry))
    _check_tls_files(args.config, config)
    from pdp.runtime import logs

    if settings.get("log_format", "text") not in logs.FORMATS:
        raise CliError(f"{args.config}: log_format {settings['log_format']!r} is not one of {', '.join(logs.FORMATS)}")
    logs.use_format(settings.get("log_format", "text"))
    try:
        run_broker(config)
    except BrokerFailed as exc:
        raise CliError(f"broker failed: {exc}") from None
    return 0


def _check_tls_files(config_path: str, config: dict[str, Any]) -> None:
    """Load each TLS listener's CA, certificate and key now, so a bad file is one clear line, not a traceback."""
    import ssl

    default = config["listeners"].get("default", {})
    for name, listener in config["listeners"].items():
        merged = {**default, **listener}
        if not merged.get("ssl"):
            continue
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=merged.get("cafile"))
            context.load_cert_chain(merged["certfile"], merged["keyfile"])
        except KeyError as exc:
            raise CliError(f"{config_path}: listener {name!r} has ssl: true but no {exc.args[0]}") from None
        except (ssl.SSLError, OSError) as exc:
            raise CliError(f"{config_path}: listener {name!r}: cannot load its CA, certificate or key: {exc}") from None


# -- apply ----------------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    """Validate new versions of the policy and/or registry together, then replace them together."""
    from pdp.policy.load import parse_policy, read_text
    from pdp.registry.file import parse_registry
    from pdp.runtime.decision_point import check_registry
    from pdp.runtime.settings import ServiceSettings
    from pdp.runtime.sources import write_together

    if not args.new_policy and not args.new_registry:
        raise CliError("nothing to apply: give --new-policy and/or --new-registry")
    model, policy_path, registry_path, settings = _pdp_paths(args)
    # Each new file is validated on its own (errors name the file given), so a broken file in place
    # never stops a registry change such as a suspension from being applied.
    targets: dict[str, bytes] = {}
    summary: list[str] = []
    if args.new_policy:
        text = read_text(args.new_policy, "policy")
        policy = parse_policy(read_text(model, "model"), text, model, args.new_policy)
        targets[policy_path] = text.encode()
        summary.append(f"applied: {policy_path} ({len(policy.rules)} rules, revision {policy.revision})")
    if args.new_registry:
        from pdp.registry.redis_registry import is_redis_url

        if is_redis_url(registry_path):
            raise CliError(f"the registry is in Redis ({registry_path}); use mqtt-pdp devices import {args.new_registry}")
        text = read_text(args.new_registry, "registry")
        registry = parse_registry(text, args.new_registry)
        check_registry(settings.get("client_id", ServiceSettings().client_id), registry)
        targets[registry_path] = text.encode()
        summary.append(f"applied: {registry_path} ({len(registry)} devices, revision {registry.revision})")
    write_together(targets)
    print("\n".join(summary))
    return 0


# -- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqtt-pdp", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run the hardened amqtt broker with device authorization",
                       description="Run the amqtt broker with the device authorization plugin (TLS listener 8883 by default).")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"broker config (default: {DEFAULT_CONFIG})")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("pki", help="create a development CA, broker and device certificates (not for production)",
                       description="Create a development CA, broker certificate and device certificates. Not for production.")
    p.add_argument("--out", default="deploy/pki", help="output directory (default: deploy/pki)")
    p.add_argument("--device", action="append", metavar="ID", help="device id to issue for (repeatable; default: every device in --registry)")
    p.add_argument("--registry", default="policies/devices.yaml", help="registry whose devices get certificates when no --device is given")
    p.add_argument("--trust-domain", default="example.org", help="SPIFFE trust domain (default: example.org)")
    p.add_argument("--hostname", action="append", default=None, help="broker host name for its certificate (default: localhost)")
    p.add_argument("--days", type=int, default=30, help="device certificate lifetime in days (default: 30)")
    p.add_argument("--force", action="store_true", help="replace an existing CA and broker certificate")
    p.set_defaults(func=cmd_pki)

    p = sub.add_parser("l2-key", help="create the key that authenticates shared (Redis L2) decisions",
                       description="Write 32 random bytes for l2_key_file (mode 0600). Brokers sharing a Redis need the same file.")
    p.add_argument("--out", default="deploy/l2.key", help="key file to write (default: deploy/l2.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key (brokers still using the old one ignore the new entries)")
    p.set_defaults(func=cmd_l2_key)

    p = sub.add_parser("check", help="validate the model, policy and registry, and lint the rules",
                       description="Validate model, policy and registry files, then lint the rules (findings with "
                                   "severity, code and file:line; see README, 'Policy author's workflow'). Exit status: "
                                   "0 valid (warnings allowed unless --strict), 1 warnings with --strict, 2 error.")
    _add_policy_args(p)
    p.add_argument("--strict", action="store_true", help="exit 1 when lint reports a warning")
    p.set_defaults(func=cmd_check)

    from pdp.cli import policy_commands

    policy_commands.add_arguments(sub)

    p = sub.add_parser("apply", help="validate and replace policy and/or registry together, atomically",
                       description="Validate new versions of the policy and/or registry against each other, then "
                                   "replace the configured files so that a running broker applies both or neither.")
    _add_policy_args(p)
    p.add_argument("--new-policy", metavar="FILE", help="new rules to put in place of the configured policy file")
    p.add_argument("--new-registry", metavar="FILE", help="new registry to put in place of the configured registry file")
    p.set_defaults(func=cmd_apply)

    from pdp.cli import log_commands as log_cli

    log_cli.add_arguments(sub)
    from pdp.cli import device_commands

    device_commands.add_arguments(sub)
    from pdp.cli import report_commands

    report_commands.add_arguments(sub)
    from pdp.cli import admin_commands

    admin_commands.add_arguments(sub)
    _global_options_everywhere(parser)
    return parser


def _global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` after the subcommand too (``mqtt-pdp log query --log-level debug``).

    Added to every subparser, however deep, with a suppressed default so it only overrides the
    top-level value when given; done once here so new subcommands get it without a line of their own.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                if "--log-level" not in subparser._option_string_actions:
                    subparser.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                                           help="log level (also accepted before the command)")
                _global_options_everywhere(subparser)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mqtt-pdp")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


MAX_CERT_DAYS = 36_500  # a development PKI; anything longer is a typo


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line like every other error (subcommands inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mqtt-pdp: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "hostname", "unset") is None:
        args.hostname = ["localhost"]
    from pdp.runtime import logs

    logs.configure(args.log_level)
    from pdp.cli.device_commands import DeviceCliError
    from pdp.cli.report_commands import ReportCliError
    from pdp.cli.log_commands import LogCliError
    from pdp.runtime.admin import AdminError

    try:
        if args.command == "log":
            import signal

            import orjson  # noqa: F401 - loaded before the handler below: SystemExit raised while its native module
            # initialised crashed the interpreter (SIGSEGV, seen once in five SIGTERMs during the first indexing)

            from pdp.cli import log_commands as log_cli

            # SIGTERM ends the command as Ctrl-C does, through the interpreter's exit: a private copy of an
            # evidence database on read-only media is removed then (an outside attack found it left behind).
            signal.signal(signal.SIGTERM, _exit_on_signal)
            return log_cli.run(args)
        return int(args.func(args))
    except (CliError, SourceError, LogCliError, AdminError, DeviceCliError, ReportCliError) as exc:
        print(f"mqtt-pdp: error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:  # --db names something that is not an assertion database
        print(f"mqtt-pdp: error: cannot read the assertion database: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be written or read, already reported by the OS
        print(f"mqtt-pdp: error: {exc}", file=sys.stderr)
        return 2
    except (OverflowError, ValueError) as exc:  # a number or name out of range that no earlier check named
        print(f"mqtt-pdp: error: {safe(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
