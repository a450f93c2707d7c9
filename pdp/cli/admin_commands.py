"""``mqtt-pdp status | sessions | kick | log-level``: asking the running broker over its admin socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from pdp.evidence.text import cut, safe_text
from pdp.runtime.admin import AdminError, request

SESSION_COLUMNS = ("client_id", "device_id", "type", "location", "peer", "connected_since", "subscriptions")


def add_arguments(sub: Any) -> None:
    def socket_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", help="the broker's admin socket (default: admin_socket of -c)")
        p.add_argument("-c", "--config", help="broker config to take admin_socket from (default: deploy/broker.yaml)")

    p = sub.add_parser("status", help="the running broker: revisions in force, last rejected reload, counts, Redis, backlog",
                       description="Ask the running broker (over its admin socket) what is in force and how it is doing.")
    socket_args(p)
    p.add_argument("--json", action="store_true", help="the whole answer as one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sessions", help="connected devices: client id, device, type, location, peer, since, subscriptions",
                       description="List the connections the running broker has admitted.")
    socket_args(p)
    p.add_argument("--json", action="store_true", help="JSON Lines, one connection a line")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("kick", help="disconnect one client now (recorded with the operator's identity)",
                       description="Close one client's connection now. A disconnect record names the operator (the OS "
                                   "user of this command, and --actor). The device may connect again: to keep it out, "
                                   "suspend it in the registry.")
    socket_args(p)
    p.add_argument("client", metavar="CLIENT", help="MQTT client id (as mqtt-pdp sessions shows it)")
    p.add_argument("--actor", help="who asks, when the OS user is shared (e.g. your name or a ticket); recorded")
    p.set_defaults(func=cmd_kick)

    p = sub.add_parser("log-level", help="change the running broker's log level without a restart",
                       description="Change the running broker's log level (debug also shows amqtt's own messages).")
    socket_args(p)
    p.add_argument("level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_log_level)


def _socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    from pdp.runtime.config import settings_of

    path = settings_of(args.config).get("admin_socket")
    if not path:
        raise AdminError("no admin socket: give --socket, or set admin_socket in the broker config (-c)")
    return str(path)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


def cmd_status(args: argparse.Namespace) -> int:
    status = request(_socket(args), "status")
    if args.json:
        sys.stdout.write(json.dumps(status) + "\n")
        return 0
    rev = status["revisions"]
    rejected = status["last_rejected_reload"]
    redis = status["redis"]
    lines = [
        f"node:              {safe_text(status['node_id'])} (pid {status['pid']})",
        f"up:                {_duration(status['uptime_s'])} since {_when(status['started_at'])}",
        f"policy revision:   {rev['policy']} ({status['rules']} rules)",
        f"registry revision: {rev['registry']} ({status['devices']} devices)",
        f"crl revision:      {rev['crl'] or 'none'}",
        f"records revision:  {rev['snapshot']}",
        "last rejected reload: " + (f"{_when(rejected['at'])} {safe_text(rejected['error'])}" if rejected else "none"),
    ]
    for source, error in sorted(status["reload_errors_in_force"].items()):
        lines.append(f"  still rejected:  {source}: {safe_text(error)} (previous version in force)")
    reloads = status["reloads"]
    loader = f"pid {reloads['loader_pid']}" if reloads["loader_pid"] else "not running"
    lines.append(f"reloads:           {reloads['by_loader']} parsed by the loader process ({loader}), "
                 f"{reloads['in_broker']} in the broker"
                 + (f"; one in progress since {_when(reloads['pending_since'])}" if reloads["pending_since"] else ""))
    lines += [
        f"connections:       {status['connections']}",
        f"sessions:          {status['sessions']} ({status['offline_sessions']} offline)",
        f"refused:           {status['tls_refused']} TLS handshakes, {status['refused_full']} listener full, "
        f"{status['ended_by_guard']} ended by the packet guard",
        f"dropped:           {status.get('queued_dropped', 0)} queued for offline sessions, "
        f"{status.get('outbound_dropped', 0)} QoS 0 from full live queues; "
        f"{status.get('slow_consumers', 0)} slow consumers closed",
        f"retained:          {status['retained']['topics']} topics, {status['retained']['bytes']} bytes, "
        f"{status['retained']['refused']} not retained (a retained store limit)",
        "redis:             " + ("off" if redis is None else
                                  f"{redis['url']} {'up' if redis['available'] else 'DOWN'} ({redis['outages']} outages)"),
        "assertions:        " + (f"{status['assertion_backlog']} records waiting, spool {status['spool_bytes']} bytes"
                                  if status["assertions"] else "off"),
        f"log level:         {status['log_level']}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    sessions = request(_socket(args), "sessions")
    if args.json:
        for row in sessions:
            sys.stdout.write(json.dumps(row) + "\n")
        return 0
    table = [[safe_text(row["client_id"]), safe_text(row["device_id"]), safe_text(row["type"]),
              safe_text(row["location"]), safe_text(row["peer"] or "-"), _when(row["connected_since"]),
              safe_text(",".join(row["subscriptions"])) or "-"] for row in sessions]
    widths = [min(48, max([len(c)] + [len(r[i]) for r in table])) for i, c in enumerate(SESSION_COLUMNS)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(SESSION_COLUMNS, widths)).rstrip()]
    out += ["  ".join(cut(v, w).ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    sys.stdout.write("\n".join(out) + f"\n{len(sessions)} connected\n")
    return 0


def cmd_kick(args: argparse.Namespace) -> int:
    result = request(_socket(args), "kick", client=args.client, actor=args.actor)
    sys.stdout.write(f"disconnected {safe_text(result['client_id'])} (device {safe_text(result['device_id'])}): "
                     f"{safe_text(result['reason'])}\n")
    return 0


def cmd_log_level(args: argparse.Namespace) -> int:
    result = request(_socket(args), "log-level", level=args.level)
    sys.stdout.write(f"log level {result['level']} (was {result['previous']})\n")
    return 0
