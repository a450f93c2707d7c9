"""What the admin interface can ask a running hardened broker: status, sessions, kick, log level.

Glue between ``pdp.runtime.admin`` (the socket and its protocol) and the broker's and the service's state;
it only reads that state, except ``kick`` (which ends one connection the way a revocation does, with a
``disconnect`` record naming the operator) and ``log-level``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pdp.evidence.text import field, safe
from pdp.runtime import logs
from pdp.runtime.admin import AdminError, AdminServer, Handler, Operator
from pdp.runtime.metrics import directory_bytes
from pdp.runtime.redis_link import _safe_url

if TYPE_CHECKING:
    from broker_plugin.broker import HardenedBroker

log = logging.getLogger("mqtt_pdp.admin")


class BrokerOperations:
    def __init__(self, broker: HardenedBroker) -> None:
        self.broker = broker
        self.service = broker.authz.service

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "sessions": self.sessions, "kick": self.kick, "log-level": self.log_level}

    async def status(self, request: Mapping[str, Any], operator: Operator) -> dict[str, Any]:
        service, broker = self.service, self.broker
        snapshot = service.pdp.snapshot
        rejected = service.pdp.last_rejected
        redis: dict[str, Any] | None = None
        if service.redis is not None:
            redis = {"url": _safe_url(service.redis.url), "available": service.redis.available,
                     "outages": service.redis.outages}
        recorder = service.recorder
        return {
            "node_id": service.node_id,
            "pid": os.getpid(),
            "started_at": service.started_at,
            "uptime_s": round(time.time() - service.started_at, 3),
            "revisions": {"policy": snapshot.policy.revision, "registry": snapshot.registry.revision,
                          "crl": snapshot.crl.revision or None, "snapshot": snapshot.snapshot_revision},
            "rules": len(snapshot.policy.rules),
            "devices": len(snapshot.registry),
            "reload_errors_in_force": dict(service.pdp.errors),
            "last_rejected_reload": {"at": rejected[0], "error": rejected[1]} if rejected else None,
            "reloads": {"by_loader": service.loads["loader"], "in_broker": service.loads["broker"],
                        "loader_pid": service.loader.pid if service.loader is not None else None,
                        "loader_starts": service.loader.starts if service.loader is not None else 0,
                        "pending_since": service.reload_pending_since},
            "connections": len(broker._connections),
            "sessions": len(broker._sessions),
            "offline_sessions": sum(1 for s, _ in broker._sessions.values() if s.transitions.state != "connected"),
            "tls_refused": broker.tls_refused,
            "refused_full": broker.refused_full,
            "ended_by_guard": broker.ended_by_guard,
            "queued_dropped": broker.queued_dropped,
            "outbound_dropped": broker.outbound_dropped,
            "slow_consumers": broker.slow_consumers,
            "retained": {"topics": len(broker._retained), "bytes": broker._retained.bytes,
                         "refused": broker._retained.refused},
            "redis": redis,
            "assertions": recorder is not None,
            "assertion_backlog": recorder.pending if recorder is not None else 0,
            "spool_bytes": directory_bytes(service.settings.spool_dir) if recorder is not None else 0,
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
            "metrics": "http://%s:%d/metrics" % service.metrics.address
                       if service.metrics is not None and service.metrics.address else None,
        }

    async def sessions(self, request: Mapping[str, Any], operator: Operator) -> list[dict[str, Any]]:
        service, broker = self.service, self.broker
        rows = []
        for conn, live in list(broker._connections.items()):
            admission = service.enforcer.admission_of(conn)
            if admission is None or admission.device is None:
                continue
            device = admission.device
            client_id = live.session.client_id or ""
            rows.append({
                "client_id": client_id, "device_id": device.device_id, "type": device.type,
                "location": device.location, "purpose": device.purpose,
                "peer": service._peers.get(conn, (None, None))[1],
                "connected_since": service.connected_at.get(conn),
                "subscriptions": sorted(broker._session_filters.get(client_id, ())),
            })
        return sorted(rows, key=lambda row: row["client_id"])

    async def kick(self, request: Mapping[str, Any], operator: Operator) -> dict[str, Any]:
        """End one connection now. Not a revocation: the device may connect again (suspend it in the registry
        to keep it out). Its persistent session, if any, is kept; its will is not published."""
        client_id = request.get("client")
        if not isinstance(client_id, str) or not client_id:
            raise AdminError("kick needs a client id")
        actor = request.get("actor")
        conn = self.service.enforcer.connection_of(client_id)
        live = self.broker._connections.get(conn) if conn is not None else None
        if conn is None or live is None:
            raise AdminError(f"no connected client {safe(client_id)!r} (mqtt-pdp sessions lists them)")
        who = f"{operator.user} (uid {operator.uid}, pid {operator.pid})"
        if isinstance(actor, str) and actor:
            who = f"{safe(actor)} as {who}"
        reason = f"kicked by operator {who}"
        log.warning("client %s kicked: %s", field(client_id), reason)
        self.service.ended(conn, client_id, reason)  # the evidence first: a disconnect record naming the operator
        live.session.will_flag = False
        await self.broker._close_connection(conn)
        if self.service.metrics is not None:
            self.service.metrics.revoked("kick")
        admission = self.service.enforcer.admission_of(conn)
        return {"client_id": client_id, "reason": reason,
                "device_id": admission.device.device_id if admission and admission.device else None}

    async def log_level(self, request: Mapping[str, Any], operator: Operator) -> dict[str, str]:
        level = request.get("level")
        try:
            previous = logs.set_level(str(level))
        except ValueError as exc:
            raise AdminError(str(exc)) from None
        log.warning("log level set to %s by %s (uid %d), was %s", level, operator.user, operator.uid, previous)
        return {"level": str(level), "previous": previous}


def broker_readings(broker: HardenedBroker) -> dict[str, tuple[str, str, float]]:
    """The broker's own counters, for the metrics endpoint: each limit breach and the session count."""
    return {
        "mqtt_pdp_sessions": ("gauge", "Sessions held, online and offline persistent", len(broker._sessions)),
        "mqtt_pdp_limit_listener_full": ("counter", "Connections closed at once: listener at max_connections",
                                         broker.refused_full),
        "mqtt_pdp_limit_packet_guard": ("counter", "Connections ended by the packet guard (size, deadline, "
                                        "protocol violation)", broker.ended_by_guard),
        "mqtt_pdp_limit_offline_queue_dropped": ("counter", "Queued messages dropped by offline queue limits",
                                                 broker.queued_dropped),
        "mqtt_pdp_limit_outbound_dropped": ("counter", "QoS 0 messages dropped from live sessions' full queues",
                                            broker.outbound_dropped),
        "mqtt_pdp_limit_slow_consumer": ("counter", "Connections closed: queue full of QoS 1/2 messages",
                                         broker.slow_consumers),
        "mqtt_pdp_retained_messages": ("gauge", "Topics with a retained message", len(broker._retained)),
        "mqtt_pdp_retained_bytes": ("gauge", "Payload bytes of the retained messages", broker._retained.bytes),
        "mqtt_pdp_limit_retained_refused": ("counter", "Retained PUBLISHes not retained: a retained store limit",
                                            broker._retained.refused),
    }


async def start_operations(broker: HardenedBroker) -> AdminServer | None:
    """The admin socket and the metrics endpoint, as configured; BrokerError-worthy problems raise."""
    settings = broker.authz.config
    metrics = broker.authz.service.metrics
    if metrics is not None:
        metrics.sources.append(lambda: broker_readings(broker))
        metrics.serve(settings.metrics)
    if not settings.admin_socket:
        return None
    server = AdminServer(settings.admin_socket, BrokerOperations(broker).handlers())
    await server.start()
    return server
