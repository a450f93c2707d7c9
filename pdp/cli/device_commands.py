"""``mqtt-pdp devices``: the lifecycle of device identities, each change written atomically and recorded.

Every change (register, activate, suspend, retire, transfer, bind-cert, unbind-cert)
is checked against the lifecycle (``pdp.registry.lifecycle``), written to the
registry file by atomic rename (``pdp.runtime.sources.write_together``; a running
broker reloads it and cuts what it no longer admits) and recorded in the
assertion log as an ``admin`` record with the actor, the command and the device
before and after (``pdp.evidence.admin``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pdp.evidence.text import safe
from pdp.registry.device import CertBinding, Device

COMMANDS = ("list", "show", "register", "activate", "suspend", "retire", "transfer", "bind-cert", "unbind-cert",
            "import", "export")


class DeviceCliError(Exception):
    """One line for the user, exit status 2."""


# -- where things are ---------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from pdp.runtime.config import settings_of

    return settings_of(getattr(args, "config", None))


def registry_path(args: argparse.Namespace, settings: dict[str, Any]) -> str:
    return str(args.registry or settings.get("registry") or "policies/devices.yaml")


def db_path(args: argparse.Namespace, settings: dict[str, Any]) -> str:
    return str(args.db or settings.get("assertion_db") or "var/assertions.db")


def redis_store(args: argparse.Namespace, settings: dict[str, Any], url: str) -> Any:
    from pdp.registry.redis_registry import RedisRegistryStore

    return RedisRegistryStore(url, getattr(args, "prefix", None) or settings.get("redis_prefix") or "mqtt-pdp")


def _load(path: str, args: argparse.Namespace | None = None, settings: dict[str, Any] | None = None
          ) -> tuple[str | None, Any]:
    """The registry's text (None for Redis) and the registry."""
    from pdp.registry.file import load_registry
    from pdp.registry.redis_registry import is_redis_url

    if is_redis_url(path):
        store = redis_store(args or argparse.Namespace(), settings or {}, path)
        try:
            return None, _redis_call(store.load, path)
        finally:
            store.close()
    registry = load_registry(path)
    return Path(path).read_text(encoding="utf-8"), registry


def _redis_call(fn: Any, where: str, *args: Any) -> Any:
    import redis

    try:
        return fn(*args)
    except (redis.RedisError, OSError) as exc:
        raise DeviceCliError(f"registry at {where}: {exc}") from None


def _lookup(registry: Any, device_id: str, path: str) -> Device:
    device = registry.lookup(device_id)
    if device is None:
        raise DeviceCliError(f"unknown device {device_id!r} (not in {path})")
    return device


# -- reading: list, show -----------------------------------------------------------------------------


LIST_COLUMNS = ("device_id", "status", "type", "location", "purpose", "owner", "certificates")


def device_row(device: Device) -> dict[str, Any]:
    return {"device_id": device.device_id, "status": device.status, **{k: v for k, v in device.attrs.items()
                                                                        if k != "device_id"},
            "certificates": sorted(device.fingerprints)}


def cmd_list(args: argparse.Namespace) -> int:
    from pdp.cli.output import emit

    settings = _settings(args)
    _, registry = _load(registry_path(args, settings), args, settings)
    rows = [device_row(d) for d in registry.devices.values()
            if (args.status is None or d.status == args.status) and (args.owner is None or d.owner == args.owner)]
    if args.format == "table":
        for row in rows:
            row["certificates"] = len(row["certificates"])
    emit(rows, LIST_COLUMNS, args.format, sys.stdout)
    return 0


def certificate_rows(device: Device, store: Any | None) -> list[dict[str, Any]]:
    """Each bound certificate with its metadata and when and from where the log last saw it admitted,
    plus every other certificate the log saw this device connect with."""
    from pdp.registry.file import format_time

    seen: dict[str, tuple[float, int, str | None]] = {}
    if store is not None:
        for fingerprint, last, count, peer in store.db.execute(
                "SELECT fingerprint, max(ts), count(*), peer FROM records WHERE device_id = ? AND action = 'connect' "
                f"AND decision = 'allow' AND fingerprint IS NOT NULL AND {store.block_clause()} GROUP BY fingerprint",
                (device.device_id,)):
            seen[fingerprint] = (last, count, peer)
    rows = []
    for fingerprint in sorted(device.fingerprints | set(seen)):
        binding = device.binding(fingerprint)
        last = seen.get(fingerprint)
        rows.append({
            "fingerprint": fingerprint,
            "bound": fingerprint in device.fingerprints,
            "serial": binding.serial if binding else None,
            "issuer": binding.issuer if binding else None,
            "expires": format_time(binding.expires) if binding and binding.expires else None,
            "bound_until": format_time(binding.not_after) if binding and binding.not_after else None,
            "last_seen": _iso(last[0]) if last else None,
            "connects": last[1] if last else 0,
        })
    return rows


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _open_store(path: str) -> Any | None:
    from pdp.evidence.store import AssertionStore

    try:
        return AssertionStore(path, readonly=True)
    except FileNotFoundError:
        return None


CERT_COLUMNS = ("fingerprint", "bound", "serial", "expires", "bound_until", "last_seen", "connects")
RECENT_COLUMNS = ("timestamp", "node", "client_id", "action", "topic", "decision", "rule_id", "reason")


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from pdp.cli.output import emit
    from pdp.evidence.store import QueryFilters

    settings = _settings(args)
    path = registry_path(args, settings)
    _, registry = _load(path, args, settings)
    device = _lookup(registry, args.device, path)
    store = _open_store(db_path(args, settings))
    try:
        certificates = certificate_rows(device, store)
        recent = [] if store is None else [
            {**{k: v for k, v in record.to_json_dict().items() if k in RECENT_COLUMNS or k == "peer"}}
            for _, record in store.query(QueryFilters(device=device.device_id), limit=args.recent, newest_first=True)]
    finally:
        if store is not None:
            store.close()
    sessions = [r for r in recent if r["action"] in ("connect", "disconnect")]
    if args.format == "json":
        sys.stdout.write(json.dumps({"device": device_row(device), "certificates": certificates,
                                     "sessions": sessions, "recent": recent}, indent=2, default=str) + "\n")
        return 0
    if args.format == "csv":  # one table per section would not be one CSV: the certificates, the usual need
        emit(certificates, CERT_COLUMNS, "csv", sys.stdout)
        return 0
    row = device_row(device)
    for key in ("device_id", "status", "type", "location", "purpose", "owner"):
        sys.stdout.write(f"{key + ':':<11} {row[key]}\n")
    sys.stdout.write("\ncertificates:\n")
    emit(certificates, CERT_COLUMNS, "table", sys.stdout)
    sys.stdout.write(f"\nsessions (connects and disconnects among the last {args.recent} records):\n")
    emit(sessions, ("timestamp", "node", "client_id", "action", "decision", "reason", "peer"), "table", sys.stdout)
    sys.stdout.write(f"\nrecent decisions (newest first, at most {args.recent}):\n")
    emit(recent, RECENT_COLUMNS, "table", sys.stdout)
    return 0


# -- changing: one device, recorded -------------------------------------------------------------------


def read_pem_certificate(path: str) -> Any:
    """The CertificateInfo of the first certificate in a PEM file; one error line otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from pdp.core.identity import read_certificate

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeviceCliError(f"{path}: cannot read certificate: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise DeviceCliError(f"{path}: not a PEM certificate") from None
    return read_certificate(cert.public_bytes(Encoding.DER))


def _parse_time(text: str | None, what: str) -> datetime | None:
    from pdp.registry.file import parse_time

    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise DeviceCliError(f"{what}: {exc}") from None


def _change(args: argparse.Namespace, now: datetime, device: Device | None, settings: dict[str, Any]
            ) -> tuple[Device, dict[str, Any]]:
    """The new device for the command, and the record's extra fields (certificate details)."""
    from pdp.core.identity import normalize_fingerprint
    from pdp.registry import lifecycle

    command = args.device_command
    if command == "register":
        if device is not None:
            raise lifecycle.TransitionRefused(f"device {args.device!r} is already registered (status "
                                              f"{device.status})")
        attributes = {"type": args.type, "location": args.location, "purpose": args.purpose, "owner": args.owner}
        return lifecycle.register(args.device, attributes, "active" if args.active else "provisioned",
                                  args.gateway or ""), {}
    assert device is not None
    if command in ("activate", "suspend", "retire"):
        return lifecycle.change_status(device, command), {}
    if command == "transfer":
        return lifecycle.transfer(device, args.owner), {}
    if command == "bind-cert":
        info = read_pem_certificate(args.pem)
        _check_names_device(info, args.device, settings, args.pem, now)
        binding = CertBinding(info.fingerprint_sha256, _parse_time(args.not_after, "--not-after"), info.serial,
                              info.issuer, info.not_after)
        changed = device
        old_until = _parse_time(args.old_until, "--old-until")
        if old_until is not None:
            for fingerprint in sorted(device.fingerprints):
                changed = lifecycle.close_binding(changed, fingerprint, old_until)
        changed = lifecycle.bind(changed, binding, now)
        return changed, {"fingerprint": info.fingerprint_sha256, "serial": info.serial, "issuer": info.issuer}
    if command == "unbind-cert":
        try:
            fingerprint = normalize_fingerprint(args.fingerprint)
        except ValueError as exc:
            raise DeviceCliError(str(exc)) from None
        binding = device.binding(fingerprint)
        return lifecycle.unbind(device, fingerprint), {
            "fingerprint": fingerprint, "serial": binding.serial if binding else None,
            "issuer": binding.issuer if binding else None}
    raise DeviceCliError(f"unknown command {command!r}")


def _check_names_device(info: Any, device_id: str, settings: dict[str, Any], path: str, now: datetime) -> None:
    """A certificate bound to a device must name that device: otherwise it could never admit it."""
    from pdp.core.identity import IdentityRefused, IdentitySettings, derive_identity
    from pdp.runtime.settings import ServiceSettings

    defaults = ServiceSettings()
    identity_settings = IdentitySettings(trust_domain=settings.get("trust_domain", defaults.trust_domain),
                                         source=settings.get("identity_source", defaults.identity_source))
    try:
        identity = derive_identity(info, identity_settings, now)
    except IdentityRefused as refused:
        raise DeviceCliError(f"{path}: certificate would be refused at connect: {refused.reason}") from None
    if identity.device_id != device_id:
        raise DeviceCliError(f"{path}: certificate names device {identity.device_id!r}, not {device_id!r}")


def cmd_change(args: argparse.Namespace) -> int:
    from pdp.evidence.admin import AdminChange, admin_node, default_actor, record_change
    from pdp.registry.edit import with_device
    from pdp.registry.file import parse_registry
    from pdp.registry.lifecycle import TransitionRefused, describe
    from pdp.runtime.decision_point import check_registry
    from pdp.runtime.settings import ServiceSettings
    from pdp.runtime.sources import write_together

    settings = _settings(args)
    path = registry_path(args, settings)
    actor = args.actor or default_actor()
    pattern = settings.get("client_id", ServiceSettings().client_id)
    summary: list[str] = []

    from pdp.registry.redis_registry import is_redis_url

    if is_redis_url(path):
        return _change_in_redis(args, settings, path, actor, pattern)

    def make() -> tuple[AdminChange, Any]:
        text, registry = _load(path)  # under the database's write lock: no other administrator writes meanwhile
        assert text is not None
        before = registry.lookup(args.device)
        if before is None and args.device_command != "register":
            raise DeviceCliError(f"unknown device {args.device!r} (not in {path})")
        now = datetime.now(timezone.utc)
        try:
            after, extra = _change(args, now, before, settings)
        except TransitionRefused as exc:
            raise DeviceCliError(str(exc)) from None
        new_text, kept_layout = with_device(text, registry, after)
        new_registry = parse_registry(new_text, path)
        check_registry(pattern, new_registry)
        change = AdminChange(actor, f"devices {args.device_command}", args.device, describe(before),
                             describe(after), args.reason or "", **extra)

        def write() -> str:
            write_together({path: new_text.encode("utf-8")})
            return str(new_registry.revision)

        status = (f"{before.status if before else 'unregistered'} -> {after.status}"
                  if before is None or before.status != after.status else f"status {after.status}")
        what = f" {extra['fingerprint']}" if extra.get("fingerprint") else ""
        summary.append(f"{args.device}: {args.device_command}{what}: {status} (by {actor}; {path} revision "
                       f"{new_registry.revision})")
        if not kept_layout:
            summary.append(f"note: {path} was rewritten in the canonical layout (its layout did not allow a local "
                           "edit); comments were not kept")
        return change, write

    record = record_change(db_path(args, settings), make, node=args.node or admin_node())
    sys.stdout.write("\n".join(summary) + "\n" + _recorded(settings, record))
    return 0


def _change_in_redis(args: argparse.Namespace, settings: dict[str, Any], url: str, actor: str, pattern: str) -> int:
    """The same change against the Redis registry: the device read, changed, written and announced atomically
    (every broker applies it within its next message), recorded like a file change."""
    from pdp.evidence.admin import AdminChange
    from pdp.registry.lifecycle import TransitionRefused, describe
    from pdp.runtime.decision_point import check_client_ids

    store = redis_store(args, settings, url)
    summary: list[str] = []

    def make() -> tuple[AdminChange, Any]:
        before = _redis_call(store.get, url, [args.device])[args.device]
        if before is None and args.device_command != "register":
            raise DeviceCliError(f"unknown device {args.device!r} (not in {store.location})")
        try:
            after, extra = _change(args, datetime.now(timezone.utc), before, settings)
        except TransitionRefused as exc:
            raise DeviceCliError(str(exc)) from None
        if "*" in pattern and before is None:  # a new id could collide with another's client ids
            from pdp.registry.redis_registry import registry_of

            registry = _redis_call(store.load, url)
            check_client_ids(pattern, registry_of({**registry.devices, after.device_id: after}, 0, store.location))
        change = AdminChange(actor, f"devices {args.device_command}", args.device, describe(before),
                             describe(after), args.reason or "", **extra)

        def write() -> str:
            revision = _redis_call(store.put, url, [after])
            summary.append(f"{args.device}: {args.device_command}: {before.status if before else 'unregistered'} -> "
                           f"{after.status} (by {actor}; {store.location} revision r{revision})")
            return f"r{revision}"

        return change, write

    return _record_in_redis(args, settings, store, make, summary)


def _recorded(settings: dict[str, Any], record: Any) -> str:
    """The line saying where the record is; signs its head when the config has an anchor key the user can read."""
    key_file = settings.get("anchor_key_file")
    if not key_file:
        return f"recorded: {record.record_id}\n"
    from pdp.evidence.admin import anchor_record
    from pdp.evidence.anchor import AnchorError

    try:
        anchor_record(record, key_file, settings.get("anchor_dir") or "var/anchors")
    except (OSError, ValueError, AnchorError) as exc:
        return f"recorded: {record.record_id} (not anchored: {exc}; log verify --anchors will say so)\n"
    return f"recorded: {record.record_id} (head signed)\n"


def cmd_import(args: argparse.Namespace) -> int:
    """File -> Redis: every device replaced at once (brokers load it all), recorded as one admin record."""
    from pdp.evidence.admin import AdminChange, default_actor
    from pdp.registry.file import load_registry
    from pdp.registry.redis_registry import is_redis_url
    from pdp.runtime.decision_point import check_registry
    from pdp.runtime.settings import ServiceSettings

    settings = _settings(args)
    url = args.to or settings.get("registry", "")
    if not is_redis_url(url):
        raise DeviceCliError("import needs a Redis registry: --to redis://... or a config whose registry is one")
    registry = load_registry(args.file)
    check_registry(settings.get("client_id", ServiceSettings().client_id), registry)
    store = redis_store(args, settings, url)
    summary: list[str] = []

    def make() -> tuple[AdminChange, Any]:
        change = AdminChange(args.actor or default_actor(), "devices import", "*", None,
                             {"devices": len(registry), "from": args.file, "file_revision": registry.revision},
                             args.reason or "")

        def write() -> str:
            current = _redis_call(store.get, url, list(registry.devices))
            revived = sorted(device_id for device_id, device in current.items()
                             if device is not None and device.status == "retired"
                             and registry.devices[device_id].status != "retired")
            if revived:
                raise DeviceCliError(f"{args.file}: import would bring back retired device(s) "
                                     f"{', '.join(safe(d) for d in revived[:5])}{' ...' if len(revived) > 5 else ''}"
                                     " (retirement is final: register a new device id instead)")
            revision = _redis_call(store.replace_all, url, registry.devices.values())
            summary.append(f"imported {len(registry)} devices from {args.file} into {store.location} "
                           f"(revision r{revision})")
            return f"r{revision}"

        return change, write

    return _record_in_redis(args, settings, store, make, summary)


def _record_in_redis(args: argparse.Namespace, settings: dict[str, Any], store: Any,
                     make: Callable[[], tuple[Any, Callable[[], str]]], summary: list[str]) -> int:
    """Make one change to the Redis registry together with its admin record, then report both."""
    from pdp.evidence.admin import admin_node, record_change

    try:
        record = record_change(db_path(args, settings), make, node=args.node or admin_node())
    finally:
        store.close()
    sys.stdout.write("\n".join(summary) + "\n" + _recorded(settings, record))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Redis -> file (canonical layout), written atomically; reading changes nothing, so nothing is recorded."""
    from pdp.registry.edit import render_registry
    from pdp.registry.redis_registry import is_redis_url
    from pdp.runtime.sources import write_together

    settings = _settings(args)
    url = args.source or settings.get("registry", "")
    if not is_redis_url(url):
        raise DeviceCliError("export needs a Redis registry: --from redis://... or a config whose registry is one")
    _, registry = _load(url, args, settings)
    write_together({args.file: render_registry(registry.devices).encode("utf-8")})
    sys.stdout.write(f"exported {len(registry)} devices from {url} (revision {registry.revision}) to {args.file}\n")
    return 0


# -- the parser -------------------------------------------------------------------------------------


def add_arguments(sub: Any) -> None:
    devices = sub.add_parser("devices", help="list, show and change device identities (lifecycle, certificates)",
                             description="Device identity lifecycle. Changes are written to the registry atomically "
                                         "(a running broker applies them at its next reload and ends sessions the "
                                         "change no longer admits) and recorded in the assertion log as 'admin' "
                                         "records: actor, command, device before and after.")
    dsub = devices.add_subparsers(dest="device_command", required=True, metavar="DEVICES_COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="broker config to take the registry and database paths from")
        p.add_argument("--registry", help="device registry file or redis:// URL (default: from config, else "
                                          "policies/devices.yaml)")
        p.add_argument("--db", help="assertion database (default: assertion_db from config, else var/assertions.db)")

    def changing(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("device", help="device id")
        p.add_argument("--actor", help="who makes the change, for the record (default: the OS user)")
        p.add_argument("--reason", help="why (a ticket number, an incident), kept in the record")
        p.add_argument("--node", help="node id the record is chained under (default: admin@<host name>)")
        p.add_argument("--prefix", help="Redis key prefix for a Redis registry (default: redis_prefix of -c)")
        p.set_defaults(func=cmd_change)

    p = dsub.add_parser("list", help="devices, filtered by status or owner")
    common(p)
    p.add_argument("--status", choices=["provisioned", "active", "suspended", "retired"])
    p.add_argument("--owner")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--prefix", help="Redis key prefix for a Redis registry (default: redis_prefix of -c)")
    p.set_defaults(func=cmd_list)

    p = dsub.add_parser("show", help="one device: attributes, certificates (last seen), sessions, recent decisions")
    common(p)
    p.add_argument("device", help="device id")
    p.add_argument("--recent", type=int, default=20, help="how many recent records to show (default: 20)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="csv gives the certificates table only")
    p.add_argument("--prefix", help="Redis key prefix for a Redis registry (default: redis_prefix of -c)")
    p.set_defaults(func=cmd_show)

    p = dsub.add_parser("register", help="add a device (provisioned, or active with --active)")
    changing(p)
    for name in ("type", "location", "purpose", "owner"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--active", action="store_true", help="register it active (default: provisioned)")
    p.add_argument("--gateway", metavar="ID", help="a gateway device that may publish for this one (a legacy device "
                                                   "without a certificate): on gw/ID/<topic>, see README")

    for name, text in (("activate", "provisioned or suspended -> active"),
                       ("suspend", "active or provisioned -> suspended (live sessions are cut at the next reload)"),
                       ("retire", "-> retired, for good (a retired device is never reactivated)")):
        p = dsub.add_parser(name, help=text)
        changing(p)

    p = dsub.add_parser("transfer", help="give the device a new owner")
    changing(p)
    p.add_argument("--owner", required=True, help="the new owner")

    p = dsub.add_parser("bind-cert", help="bind a certificate (PEM); at most two during a rotation",
                        description="Bind the certificate in a PEM file to the device, recording its fingerprint, "
                                    "serial, issuer and notAfter. Rotation: bind the new certificate with "
                                    "--old-until TIME, and the certificates bound so far stop admitting the device "
                                    "at TIME (live sessions using them are cut then).")
    changing(p)
    p.add_argument("pem", help="PEM file with the device's certificate")
    p.add_argument("--not-after", help="this binding ends at this time (ISO 8601; UTC unless a zone is given)")
    p.add_argument("--old-until", help="the certificates bound so far stop at this time (the rotation window)")

    p = dsub.add_parser("import", help="replace the Redis registry with a registry file (recorded)",
                        description="Replace every device of the Redis registry with those of FILE, atomically; "
                                    "every broker following it loads the new registry.")
    common(p)
    p.add_argument("file", help="registry YAML file")
    p.add_argument("--to", help="Redis URL (default: the registry of -c)")
    p.add_argument("--prefix", help="Redis key prefix (default: redis_prefix of -c, else mqtt-pdp)")
    p.add_argument("--actor", help="who makes the change, for the record (default: the OS user)")
    p.add_argument("--reason", help="why, kept in the record")
    p.add_argument("--node", help="node id the record is chained under (default: admin@<host name>)")
    p.set_defaults(func=cmd_import)

    p = dsub.add_parser("export", help="write the Redis registry to a registry file")
    common(p)
    p.add_argument("file", help="registry YAML file to write (replaced atomically)")
    p.add_argument("--from", dest="source", help="Redis URL (default: the registry of -c)")
    p.add_argument("--prefix", help="Redis key prefix (default: redis_prefix of -c, else mqtt-pdp)")
    p.set_defaults(func=cmd_export)

    p = dsub.add_parser("unbind-cert", help="remove a certificate binding (its live sessions are cut)")
    changing(p)
    p.add_argument("fingerprint", help="SHA-256 fingerprint: hex, with or without colons or a sha256: prefix")


def run(args: argparse.Namespace) -> int:
    return int(args.func(args))
