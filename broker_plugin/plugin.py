"""amqtt plugin: binds each MQTT session to a certificate-proven device and asks the PDP about it.

Loaded through amqtt's ``plugins:`` configuration. Under stock amqtt it works
as an auth plus topic plugin (with amqtt's holes); ``broker_plugin.broker.HardenedBroker``
calls it directly and closes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from pdp.core.admission import Admission, AdmissionSettings, ConnectRequest
from pdp.evidence.store import AssertionStore
from pdp.evidence.writer import WriterProcess
from pdp.evidence.records import AssertionRecorder
from pdp.runtime.cache import RedisDecisionCache
from pdp.runtime.decision_point import DecisionPoint, PdpSettings
from pdp.core.identity import IdentitySettings
from pdp.runtime.bus import InvalidationBus
from pdp.runtime.redis_link import RedisLink
from pdp.registry.file import Device

log = logging.getLogger("mqtt_pdp.plugin")
SESSION_KEY = "mqtt_pdp.admission"
PEER_KEY = "mqtt_pdp.peer"

Revoker = Callable[[str, str], Awaitable[None]]


def peer_certificate(session: Session) -> bytes | None:
    ssl_object = session.ssl_object
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True) or None


def session_admission(session: Session) -> Admission | None:
    admission = session.attributes.get(SESSION_KEY)
    return admission if isinstance(admission, Admission) else None


class DeviceAuthorizationPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        model: str = "policies/model.conf"
        policy: str = "policies/policy.csv"
        registry: str = "policies/devices.yaml"
        trust_domain: str = "example.org"
        identity_source: str = "uri-san"
        client_id: str = "{device_id}"
        require_client_certificate: bool = True
        allow_plain_tcp: bool = False
        reload_interval: float = 0.5
        verify_with_casbin: bool = False
        l1_size: int = 100_000
        redis_url: str = ""
        redis_prefix: str = "mqtt-pdp"
        l2_ttl: int = 3600
        node_id: str = ""  # names this broker in assertion records and their hash chain; default: host name
        assertions: bool = True
        assertion_db: str = "var/assertions.db"  # "" for none
        assertion_stream: bool = False  # also append to a Redis Stream (needs redis_url)
        spool_dir: str = "var/spool"
        retention_days: float = 0  # prune the SQLite store of records older than this; 0 keeps everything

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        cfg: DeviceAuthorizationPlugin.Config = self.config
        if cfg.reload_interval <= 0:
            raise ValueError(f"reload_interval must be positive, got {cfg.reload_interval}")
        self.pdp = DecisionPoint(
            PdpSettings(
                model_path=cfg.model,
                policy_path=cfg.policy,
                registry_path=cfg.registry,
                admission=AdmissionSettings(
                    identity=IdentitySettings(trust_domain=cfg.trust_domain, source=cfg.identity_source),  # type: ignore[arg-type]
                    client_id_pattern=cfg.client_id,
                    allow_plain_tcp=cfg.allow_plain_tcp,
                ),
                verify_with_casbin=cfg.verify_with_casbin,
                l1_size=cfg.l1_size,
            )
        )
        self._revoker: Revoker | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self.node_id = cfg.node_id or socket.gethostname()
        self.instance_id = f"{self.node_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.redis: RedisLink | None = None
        self.l2: RedisDecisionCache | None = None
        self.bus: InvalidationBus | None = None
        if cfg.redis_url:  # built now, so a bad URL or TTL stops the broker at start with one line
            self.redis = RedisLink(cfg.redis_url)
            self.l2 = RedisDecisionCache(self.redis, cfg.redis_prefix, cfg.l2_ttl)
            self.bus = InvalidationBus(self.redis, cfg.redis_prefix, self.instance_id, self._on_event)
        self.recorder: AssertionRecorder | None = None
        if cfg.assertions:  # last: it starts the writer process, so every other setting is checked first
            self.recorder = self._make_recorder(cfg)
        # Lets tests and tools wait for a reload attempt instead of sleeping.
        self.reload_attempts = 0
        self.remote_reloads = 0
        self.reload_condition = threading.Condition()

    def _make_recorder(self, cfg: DeviceAuthorizationPlugin.Config) -> AssertionRecorder:
        if cfg.assertion_stream and not cfg.redis_url:
            raise ValueError("assertion_stream needs redis_url")
        writer = WriterProcess({
            "node": self.node_id, "spool_dir": cfg.spool_dir, "assertion_db": cfg.assertion_db,
            "stream_url": cfg.redis_url if cfg.assertion_stream else "", "stream_prefix": cfg.redis_prefix,
        })
        return AssertionRecorder(writer)

    # -- connect ------------------------------------------------------------------------

    def admit_session(self, session: Session) -> Admission:
        """Decide the connect from the session's verified certificate and remember it on the session."""
        request = ConnectRequest(
            client_id=session.client_id or "",
            certificate_der=peer_certificate(session),
            tls=session.ssl_object is not None,
            will_topic=session.will_topic if session.will_flag else None,
        )
        admission = self.pdp.admit(request)
        session.attributes[SESSION_KEY] = admission
        peer = session.attributes[PEER_KEY] = f"{session.remote_address}:{session.remote_port}"
        if self.recorder is not None:
            self.recorder.connect(admission, request.client_id, peer, self.pdp.snapshot.revision)
        if admission.allowed and admission.device is not None and self.l2 is not None:
            self._spawn(self._warm(admission.device))
        cert = admission.identity.certificate if admission.identity else admission.certificate
        device_id = admission.identity.device_id if admission.identity else (admission.device.device_id if admission.device else None)
        fingerprint = cert.fingerprint_sha256 if cert else None
        if admission.allowed:
            log.info("connect accepted: client=%s device=%s fingerprint=%s peer=%s",
                     request.client_id, device_id, fingerprint, peer)
        else:
            log.warning("connect refused: client=%s device=%s fingerprint=%s peer=%s reason=%s",
                        request.client_id, device_id, fingerprint, peer, admission.reason)
        return admission

    async def authenticate(self, *, session: Session) -> bool:
        return self.admit_session(session).allowed

    # -- publish / subscribe / receive ------------------------------------------------

    def allows(self, session: Session, action: str, topic: str) -> bool:
        """Synchronous decision for one request of an admitted session; anything else is refused."""
        admission = session_admission(session)
        if admission is None or not admission.allowed or admission.device is None:
            return False
        start = perf_counter_ns()
        decision, tier, revision = self.pdp.lookup(admission.device, action, topic)
        if self.recorder is not None:
            self.recorder.decision(admission, session.client_id, session.attributes.get(PEER_KEY), action, topic,
                                   decision, tier, perf_counter_ns() - start, revision)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s: %s", session.client_id, action, topic,
                      "allowed" if decision.allowed else "denied", decision.reason)
        return decision.allowed

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        return self.allows(session, str(action), topic)

    # -- hot reload ---------------------------------------------------------------------

    def set_revoker(self, revoker: Revoker) -> None:
        """The broker's way to end a session that the current policy no longer admits."""
        self._revoker = revoker

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def on_broker_post_start(self) -> None:
        cfg: DeviceAuthorizationPlugin.Config = self.config
        self._spawn(self._watch())
        if self.recorder is not None:
            self.recorder.start()
        if self.recorder is not None and cfg.retention_days > 0 and cfg.assertion_db:
            self._spawn(self._prune(cfg.assertion_db, cfg.retention_days))
        if self.l2 is not None and self.bus is not None:
            l2 = self.l2
            self.pdp.recorder = lambda rev, device, action, topic, decision: l2.record(
                rev, device.revision, action, topic, decision)
            self._spawn(self.l2.run())
            self._spawn(self.bus.run())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            await self.reload(announce=True)

    async def reload(self, announce: bool) -> bool | None:
        """Reload changed files, end sessions no longer admitted, and tell the other brokers."""
        async with self._reload_lock:
            try:
                result = await asyncio.to_thread(self.pdp.reload_if_changed)
                if result:
                    await self.revoke_disallowed()
                    if announce and self.bus is not None:
                        await self.bus.publish({"type": "reload", "revision": self.pdp.snapshot.revision})
            except Exception:  # the watcher must outlive any single bad reload
                log.exception("policy reload failed")
                result = False
        if result is not None:
            with self.reload_condition:
                self.reload_attempts += 1
                self.reload_condition.notify_all()
        return result

    async def _on_event(self, event: dict[str, Any]) -> None:
        result = await self.reload(announce=False)
        if result:
            self.remote_reloads += 1
        revision = event.get("revision")
        if result is None and revision and revision != self.pdp.snapshot.revision:
            log.warning("node %s announced revision %s but this node's files give %s; do the brokers share "
                        "the policy files?", event.get("node"), revision, self.pdp.snapshot.revision)

    async def _warm(self, device: Device) -> None:
        """Fill L1 with what any broker already decided for this device under the current policy."""
        assert self.l2 is not None
        snapshot = self.pdp.snapshot
        self.pdp.warm(snapshot, device, await self.l2.fetch(snapshot.policy.revision, device.revision))

    async def revoke_disallowed(self) -> list[str]:
        """End every session whose device the current registry no longer admits."""
        revoked: list[str] = []
        for session in list(self.context.sessions):  # type: ignore[attr-defined]
            admission = session_admission(session)
            if admission is None or not admission.allowed or session.client_id is None:
                continue
            reason = self.pdp.revocation_reason(admission)
            if reason is None:
                continue
            revoked.append(session.client_id)
            log.warning("session revoked: client=%s device=%s reason=%s", session.client_id,
                        admission.device.device_id if admission.device else None, reason)
            if self._revoker is not None:
                await self._revoker(session.client_id, reason)
            else:
                session.attributes[SESSION_KEY] = Admission(False, reason, admission.identity, admission.device)
        return revoked

    async def _prune(self, path: str, days: float) -> None:
        """Retention: once an hour, delete records older than ``days`` (the chain keeps a checkpoint)."""
        while True:
            try:
                removed = await asyncio.to_thread(_prune_store, path, time.time() - days * 86400)
                if removed:
                    log.info("retention: pruned %d assertion records older than %g days", removed, days)
            except Exception:
                log.exception("pruning the assertion store failed")
            await asyncio.sleep(3600)

    async def close(self) -> None:
        if self.recorder is not None:
            await self.recorder.close()
        # Bounded: redis-py's asyncio clients can swallow a cancellation while closing a socket
        # (seen at shutdown, Python 3.11), and a broker must still stop.
        await _finish(list(self._tasks), "background task")
        if self.redis is not None:
            closing = asyncio.ensure_future(self.redis.close())
            if not (await asyncio.wait({closing}, timeout=2.0))[0]:
                await _finish([closing], "Redis connection close")


async def _finish(tasks: list[asyncio.Future[Any]], what: str, timeout: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again if a cancellation was lost; give up after a bound."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(3):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout)
    log.warning("%d %s(s) did not stop at shutdown; abandoned", len(pending), what)


def _prune_store(path: str, before: float) -> int:
    store = AssertionStore(path)
    try:
        return store.prune(before)
    finally:
        store.close()
