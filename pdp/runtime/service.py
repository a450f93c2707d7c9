"""The authorization service a broker runs: the enforcement core wired to snapshots, caches, Redis and evidence.

The broker glue (``broker_plugin``) turns amqtt's calls into the calls below and
carries out what comes back (close a connection, drop an offline session).
Everything here is independent of amqtt, so the same service could sit in
another broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import logging
import os
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timezone
from time import perf_counter_ns
from typing import Any

from pdp.core.admission import Admission, ConnectRequest
from pdp.core.enforcement import (
    ClockTick,
    ConnectionClosed,
    ConnectRequested,
    ConnId,
    DeliveryDue,
    Disconnect,
    DropSession,
    DropSubscription,
    Enforcer,
    Event,
    Origin,
    PublishReceived,
    SnapshotSwapped,
    SubscribeRequested,
    Unsubscribed,
    Verdict,
    WillDue,
)
from pdp.core.engine import Decision
from pdp.core.sharing import MODES as SHARING_MODES, SharedCertificate, SharingTracker
from pdp.evidence.anchor import prune_signer
from pdp.evidence.node import default_node_id
from pdp.core.identity import read_certificate
from pdp.evidence.ledger import CaptureLedger
from pdp.evidence.ratelimit import RefusalLimiter
from pdp.evidence.recorder import AssertionRecorder
from pdp.errors import SourceError
from pdp.evidence.text import field, safe  # device-supplied text in log lines: escaped and bounded
from pdp.evidence.writer import WriterProcess
from pdp.registry.device import Device
from pdp.runtime.bus import InvalidationBus
from pdp.runtime.cache import RedisDecisionCache, load_l2_key
from pdp.runtime.decision_point import DecisionPoint, Snapshot, releasing
from pdp.runtime.delta import DeltaMismatch
from pdp.runtime.loader import IN_BROKER, LoaderError, LoaderProcess, Reply, applying, run_in_steps
from pdp.runtime.logs import PerKeyRateLimit
from pdp.runtime.metrics import Metrics, directory_bytes, metrics_address
from pdp.runtime.redis_link import RedisLink
from pdp.runtime.registry_follower import RegistryFollower
from pdp.runtime.retention import prune_forever
from pdp.runtime.settings import ServiceSettings

log = logging.getLogger("mqtt_pdp.service")
MISMATCH_LOG_INTERVAL = 60.0  # seconds between warnings about announcements this node's files do not match
DENIAL_LOG_INTERVAL = 10.0  # seconds: at most one "denied" line per client this often, with a count of the rest
RELOAD_SWITCH_INTERVAL = 0.0005  # seconds; see AuthorizationService._load_yielding
# Seconds between two steps of freeing a replaced snapshot: nothing waits on it, so it is spread out
# (100,000 devices' reader state, the first time, is a few hundred steps) instead of slowing every message.
RELEASE_PAUSE = 0.001

# Carries out a Disconnect or DropSession in the broker; without one, revoked connections stay open but
# are denied everything (the plugin under stock amqtt).
Closer = Callable[[Disconnect | DropSession | DropSubscription], Awaitable[None]]
# Drops a connection's transport at once, without awaiting: called in the same step as the swap that revoked it.
Aborter = Callable[[ConnId], None]


def _event(conn: ConnId, action: str, topic: str, origin: Origin, publisher: Admission | None) -> Event:
    if action == "publish":
        return PublishReceived(conn, topic)
    if action == "subscribe":
        return SubscribeRequested(conn, topic)
    if action == "receive":
        return DeliveryDue(conn, topic, origin, publisher)
    if action == "will":
        return WillDue(conn, topic)
    raise ValueError(f"unknown action {action!r}")


NO_PEER: tuple[None, None] = (None, None)
NO_IDENTITY: tuple[None, None, None] = (None, None, None)
ENDED_KEPT = 2_000  # a delivery to a closing connection is decided within moments of its close
LOG_REFUSAL = "refused: assertion records cannot be made durable (on_log_failure: refuse)"


class AuthorizationService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        started = time.perf_counter()
        self.pdp = DecisionPoint(settings.pdp_settings())
        first_load = time.perf_counter() - started
        self.enforcer = Enforcer(self.pdp)
        self.closer: Closer | None = None
        self.aborter: Aborter | None = None
        self._conn_ids = itertools.count(1)
        self._peers: dict[ConnId, tuple[str | None, str | None]] = {}  # client id and peer, for the records
        # Who the last ENDED_KEPT closed connections were: a delivery routed to one as it closed is still decided
        # (denied: not admitted) and recorded, and its record names the device (an outside attack counted
        # 2,788 such records naming none after slow consumers were closed).
        self._ended: OrderedDict[ConnId, tuple[Admission | None, str | None, str | None]] = OrderedDict()
        self.connected_at: dict[ConnId, float] = {}  # admitted connections: when (for mqtt-pdp sessions)
        self._denials_logged = PerKeyRateLimit(DENIAL_LOG_INTERVAL)
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        # Parses changed files in another process (see pdp.runtime.loader); None: in a thread of this one.
        self.loader: LoaderProcess | None = LoaderProcess(self.pdp.settings, first_load) \
            if settings.reload_process else None
        self.loads = {"loader": 0, "broker": 0}  # changes loaded by each way (tests, mqtt-pdp status)
        self.reload_pending_since: float | None = None  # a change is being loaded since (mqtt-pdp status)
        self.node_id = settings.node_id or default_node_id(settings.spool_dir)
        self.instance_id = f"{self.node_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.redis: RedisLink | None = None
        self.l2: RedisDecisionCache | None = None
        self.bus: InvalidationBus | None = None
        # Built now, so a bad URL, TTL or key file stops the broker at start with one line.
        l2_key = load_l2_key(settings.l2_key_file) if settings.l2_key_file else None
        if settings.redis_url:
            self.redis = RedisLink(settings.redis_url)
            if l2_key is not None:
                self.l2 = RedisDecisionCache(self.redis, settings.redis_prefix, settings.l2_ttl, l2_key)
            else:
                log.warning("redis_url is set but l2_key_file is not: the shared L2 decision cache is off (Redis "
                            "is not trusted with decisions without a key to authenticate them); decisions and "
                            "reload announcements are unaffected. To share decisions, create a key (mqtt-pdp l2-key) "
                            "and give every broker the same file as l2_key_file")
            self.bus = InvalidationBus(self.redis, settings.redis_prefix, self.instance_id, self._on_event)
        if settings.refusal_window <= 0:
            raise ValueError(f"refusal_window must be positive, got {settings.refusal_window}")
        self._refusals = RefusalLimiter(settings.refusal_window)  # repeated identical refusals: one record with a count
        if settings.shared_certificate not in SHARING_MODES:
            raise ValueError(f"shared_certificate must be one of {', '.join(SHARING_MODES)}, got "
                             f"{settings.shared_certificate!r}")
        if settings.shared_certificate_window <= 0:
            raise ValueError(f"shared_certificate_window must be positive, got {settings.shared_certificate_window}")
        self.sharing = (SharingTracker(settings.shared_certificate_window)
                        if settings.shared_certificate != "off" else None)
        self.shared_certificates = 0  # connections seen sharing a certificate (refused ones included)
        self.registry_follower: RegistryFollower | None = None
        if self.pdp.settings.registry_in_redis:
            registry = self.pdp.snapshot.registry
            self.registry_follower = RegistryFollower(settings.registry, settings.redis_prefix,
                                                      int(registry.revision.lstrip("r") or 0),
                                                      lambda: self.pdp.snapshot.registry, self.apply_registry)
        self.metrics: Metrics | None = None
        if settings.metrics:
            metrics_address(settings.metrics)  # a bad address stops the start with one line, before any socket
            self.metrics = Metrics()
            self.metrics.sources.append(self._readings)
        self.recorder: AssertionRecorder | None = None
        if settings.assertions:  # last: it starts the writer process, so every other setting is checked first
            self.recorder = self._make_recorder(settings)
        # Lets tests and tools wait for a reload attempt instead of sleeping.
        self.reload_attempts = 0
        self.remote_reloads = 0
        self.reload_condition = threading.Condition()
        self._mismatch_logged_at = -MISMATCH_LOG_INTERVAL
        self._mismatches_unlogged = 0

    def _make_recorder(self, cfg: ServiceSettings) -> AssertionRecorder:
        if cfg.assertion_stream and not cfg.redis_url:
            raise ValueError("assertion_stream needs redis_url")
        if cfg.on_log_failure not in ("alarm", "refuse"):
            raise ValueError(f"on_log_failure must be 'alarm' or 'refuse', got {cfg.on_log_failure!r}")
        if isinstance(cfg.assertion_index_backlog, bool) or not isinstance(cfg.assertion_index_backlog, int) \
                or cfg.assertion_index_backlog < 0:
            raise ValueError(f"assertion_index_backlog must be a whole number of records, 0 or more, got "
                             f"{cfg.assertion_index_backlog!r}")
        writer = WriterProcess({
            "node": self.node_id, "spool_dir": cfg.spool_dir, "assertion_db": cfg.assertion_db,
            "stream_url": cfg.redis_url if cfg.assertion_stream else "", "stream_prefix": cfg.redis_prefix,
            "anchor_key_file": cfg.anchor_key_file, "anchor_dir": cfg.anchor_dir, "anchor_every": cfg.anchor_every,
            "anchor_interval": cfg.anchor_interval, "index_backlog": cfg.assertion_index_backlog,
            "claim_url": cfg.redis_url, "claim_prefix": cfg.redis_prefix,  # one node id, one writer
            "log_format": cfg.log_format,  # its own log lines in the broker's format (JSON lines for a shipper)
        })
        return AssertionRecorder(writer, ledger=CaptureLedger(cfg.spool_dir, self.node_id, uuid.uuid4().hex[:16]))

    # -- connections ------------------------------------------------------------------------

    def new_connection(self) -> ConnId:
        return next(self._conn_ids)

    def connect(self, conn: ConnId, request: ConnectRequest, peer: str | None,
                persistent: bool = False) -> tuple[Admission, list[Disconnect]]:
        """Admit or refuse; the Disconnects returned (a previous connection of this client id) go first."""
        if self.log_refusing:
            return self._refuse_unrecordable(conn, request, peer), []
        now = datetime.now(timezone.utc)
        fingerprint = hashlib.sha256(request.certificate_der).hexdigest() if request.certificate_der else None
        shared = (self.sharing.check(fingerprint, request.client_id, peer, now.timestamp())
                  if self.sharing is not None and fingerprint is not None else None)
        if shared is not None and self.settings.shared_certificate == "refuse":
            refused = self._refuse_shared(request, peer, shared, now)
            if refused is not None:
                return refused, []
        actions = self.enforcer.handle(ConnectRequested(conn, request, now, persistent))
        outcome = actions[-1]
        admission: Admission = outcome.admission  # type: ignore[union-attr]
        self._peers[conn] = (request.client_id, peer)
        if self.recorder is not None:
            if admission.allowed:
                self.recorder.connect(admission, request.client_id, peer, self.pdp.snapshot_revision)
            else:
                self._refused("connect", (admission, request.client_id, peer, self.pdp.snapshot_revision),
                              request.client_id, peer, admission.reason,
                              admission.certificate.fingerprint_sha256 if admission.certificate else None)
        if admission.allowed and self.sharing is not None and fingerprint is not None:
            self.sharing.opened(conn, fingerprint, request.client_id, peer, now.timestamp())
            if shared is not None:
                self._shared(admission, request.client_id, peer, shared, refused=False)
        if self.metrics is not None:
            self.metrics.connect(admission.allowed, admission.reason)
        if admission.allowed and admission.device is not None and self.l2 is not None:
            self._spawn(self._warm(admission.device))
        cert = admission.identity.certificate if admission.identity else admission.certificate
        device_id = admission.identity.device_id if admission.identity else (
            admission.device.device_id if admission.device else None)
        fingerprint = cert.fingerprint_sha256 if cert else None
        if admission.allowed:
            self.connected_at[conn] = time.time()
            log.info("connect accepted: client=%s device=%s fingerprint=%s peer=%s",
                     field(request.client_id), field(device_id), fingerprint, peer)
        else:
            self._peers.pop(conn, None)
            log.warning("connect refused: client=%s device=%s fingerprint=%s peer=%s reason=%s",
                        field(request.client_id), field(device_id), fingerprint, peer, safe(admission.reason),
                        extra={"event": "connect_refused", "client_id": request.client_id, "device_id": device_id,
                               "fingerprint": fingerprint, "peer": peer, "reason": admission.reason})
        superseded = [a for a in actions if isinstance(a, Disconnect)]
        for action in superseded:
            log.info("client %s reconnected: closing its previous connection", field(action.client_id))
            self._record_end(action)
        return admission, superseded

    def tls_refused(self, peer: str | None, reason: str, certificate_der: bytes | None) -> None:
        """A failed TLS handshake is a refusal too: a ``tls`` record with the peer, the reason, and the
        certificate's fingerprint, serial, issuer and subject when one was presented."""
        if self.recorder is None:
            return
        cert = None
        if certificate_der:
            try:
                cert = read_certificate(certificate_der)
            except Exception:  # noqa: BLE001 - unparsable: recorded without it
                cert = None
        text = f"TLS handshake refused: {reason}; " + (
            f"certificate subject {cert.subject}" if cert else "no certificate presented")
        self._refused("tls", (Admission(False, text, certificate=cert), None, peer, self.pdp.snapshot_revision),
                      None, peer, text, cert.fingerprint_sha256 if cert else None)

    def _refused(self, action: str, payload: tuple[Admission, str | None, str | None, str], client_id: str | None,
                 peer: str | None, reason: str, fingerprint: str | None) -> None:
        """Recorded now, or counted into the open window of identical refusals (same action, client id, peer
        address, reason and certificate), which ``flush_refusals`` records as one record with the count."""
        address = peer.rpartition(":")[0] if peer else None
        if self._refusals.admit((action, client_id, address, reason, fingerprint), (action, payload), time.time()):
            self._record_refusal(action, payload, None)

    def _record_refusal(self, action: str, payload: tuple[Admission, str | None, str | None, str],
                        repeats: str | None) -> None:
        assert self.recorder is not None
        admission, client_id, peer, revision = payload
        reason = admission.reason if repeats is None else f"{admission.reason}; {repeats}"
        self.recorder.decision(admission, client_id, peer, action, None, Decision(False, admission.rule_id, reason),
                               None, 0, revision)

    def flush_refusals(self, everything: bool = False) -> int:
        """Record the windows of repeated refusals that ended; returns how many records that made."""
        due = self._refusals.due(time.time(), everything)
        if self.recorder is not None:
            for repeats in due:
                action, payload = repeats.payload
                self._record_refusal(action, payload, repeats.note())
        return len(due)

    @property
    def log_refusing(self) -> bool:
        """``on_log_failure: refuse`` and records cannot be made durable now: decide nothing (fail closed)."""
        return self.recorder is not None and self.recorder.failing and self.settings.on_log_failure == "refuse"

    def _refuse_unrecordable(self, conn: ConnId, request: ConnectRequest, peer: str | None) -> Admission:
        cert = None
        if request.certificate_der:
            try:
                cert = read_certificate(request.certificate_der)
            except Exception:  # noqa: BLE001 - refused anyway; the record then lacks the certificate
                cert = None
        admission = Admission(False, LOG_REFUSAL, certificate=cert)
        assert self.recorder is not None
        self.recorder.connect(admission, request.client_id, peer, self.pdp.snapshot_revision)
        log.warning("connect refused: client=%s peer=%s reason=%s", field(request.client_id), peer, LOG_REFUSAL)
        return admission

    def _refuse_shared(self, request: ConnectRequest, peer: str | None, shared: SharedCertificate,
                       now: datetime) -> Admission | None:
        """``shared_certificate: refuse``: the second connection of an otherwise admitted certificate is refused
        before it touches any session (a takeover of the first included); None when it is refused anyway."""
        admission = self.pdp.admit(request, now)  # pure: the enforcer's state is untouched
        if not admission.allowed:
            return None
        admission = dataclasses.replace(admission, allowed=False, reason=shared.reason)
        if self.recorder is not None:
            self.recorder.connect(admission, request.client_id, peer, self.pdp.snapshot_revision)
        self._shared(admission, request.client_id, peer, shared, refused=True)
        log.warning("connect refused: client=%s device=%s fingerprint=%s peer=%s reason=%s", field(request.client_id),
                    field(admission.device.device_id if admission.device else None), shared.fingerprint, peer,
                    safe(admission.reason))
        return admission

    def _shared(self, admission: Admission, client_id: str, peer: str | None, shared: SharedCertificate,
                refused: bool) -> None:
        self.shared_certificates += 1
        device_id = admission.device.device_id if admission.device else None
        log.warning("shared certificate%s: client=%s device=%s fingerprint=%s peer=%s: %s",
                    " (connection refused)" if refused else "", field(client_id), field(device_id),
                    shared.fingerprint, peer, safe(shared.reason))
        if self.recorder is not None:
            self.recorder.decision(admission, client_id, peer, "shared-certificate", None,
                                   Decision(not refused, None, shared.reason), None, 0, self.pdp.snapshot_revision)

    def _record_end(self, action: Disconnect) -> None:
        """Every session the broker ends (revocation, expiry, CRL, takeover) is evidence, with its reason."""
        if self.recorder is not None:
            peer = self._peers.get(action.conn, (None, None))[1]
            self.recorder.decision(self.enforcer.admission_of(action.conn), action.client_id, peer, "disconnect",
                                   None, Decision(False, None, action.reason), None, 0, self.pdp.snapshot_revision)

    def ended(self, conn: ConnId, client_id: str, reason: str) -> None:
        """A session the broker ended for what the client did on the wire (protocol violation, keep-alive,
        size): a ``disconnect`` record like a revocation's, so the evidence says why the device went away."""
        self._record_end(Disconnect(conn, client_id, reason))

    def unsubscribed(self, conn: ConnId, topic_filter: str) -> None:
        self.enforcer.handle(Unsubscribed(conn, topic_filter))

    def closed(self, conn: ConnId) -> None:
        admission = self.enforcer.admission_of(conn)
        self.enforcer.handle(ConnectionClosed(conn))
        if self.sharing is not None:
            self.sharing.closed(conn)
        client_id, peer = self._peers.pop(conn, NO_PEER)
        if self.recorder is not None and admission is not None:
            self._ended[conn] = (admission, client_id, peer)
            if len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        self.connected_at.pop(conn, None)

    def _identity_of(self, conn: ConnId) -> tuple[Admission | None, str | None, str | None]:
        """Admission, client id and peer for a record: of the connection, or of one that has just ended."""
        admission = self.enforcer.admission_of(conn)
        if admission is None:
            return self._ended.get(conn, NO_IDENTITY)
        client_id, peer = self._peers.get(conn, NO_PEER)
        return admission, client_id, peer

    def allows(self, conn: ConnId, action: str, topic: str, origin: Origin = "live",
               publisher: Admission | None = None) -> bool:
        """One synchronous verdict, recorded; a connection that is not admitted now gets nothing."""
        return self.verdict(conn, action, topic, origin, publisher).allowed

    def publish_relay(self, conn: ConnId, topic: str) -> tuple[bool, tuple[str, str] | None]:
        """A publish that may be a gateway's relay (``pdp.core.gateway``): allowed, and (child, inner topic) to
        deliver it as, or None for an ordinary publish."""
        verdict = self.verdict(conn, "publish", topic)
        return verdict.allowed, verdict.relay

    def verdict(self, conn: ConnId, action: str, topic: str, origin: Origin = "live",
                publisher: Admission | None = None) -> Verdict:
        if self.log_refusing:
            assert self.recorder is not None
            admission, client_id, peer = self._identity_of(conn)
            refusal = Decision(False, None, LOG_REFUSAL)
            self.recorder.decision(admission, client_id, peer, action, topic, refusal, None, 0,
                                   self.pdp.snapshot_revision)
            return Verdict(conn, action, topic, refusal, "log-refusal", self.pdp.snapshot_revision)
        start = perf_counter_ns()
        verdict: Verdict = self.enforcer.handle(_event(conn, action, topic, origin, publisher))[0]  # type: ignore[assignment]
        elapsed = perf_counter_ns() - start
        if self.metrics is not None:
            self.metrics.decided(verdict.action, verdict.allowed, verdict.tier, elapsed)
        if self.recorder is not None:  # AssertionRecorder.decision and _identity_of, inlined: per message
            admission = self.enforcer.admission_of(conn)
            if admission is None:
                admission, client_id, peer = self._ended.get(conn, NO_IDENTITY)
            else:
                client_id, peer = self._peers.get(conn, NO_PEER)
            recorder = self.recorder
            if len(recorder.queue) >= recorder.queue_room:  # the durable reservation first (reserve_now)
                recorder.reserve_now()
            recorder.capture((time.time(), admission, client_id, peer, verdict.action, topic,
                              verdict.decision, verdict.tier, elapsed, verdict.snapshot_revision))
        if not verdict.allowed and action != "receive":
            client_id = self._peers.get(conn, (None,))[0]
            held = self._denials_logged.admit(client_id or "", time.monotonic())
            if held is not None:
                log.info("%s %s %s denied: %s%s", field(client_id), verdict.action, field(topic),
                         safe(verdict.decision.reason), f" ({held} more denials of this client not logged)" if held else "",
                         extra={"event": "denied", "client_id": client_id, "action": verdict.action, "topic": topic,
                                "reason": verdict.decision.reason, "not_logged_before": held})
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s: %s", field(self._peers.get(conn, (None,))[0]), verdict.action, field(topic),
                      "allowed" if verdict.allowed else "denied", safe(verdict.decision.reason))
        return verdict

    # -- background: reloads, clock, Redis, retention ---------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        cfg = self.settings
        if self.loader is not None:
            self._spawn(self.loader.start())
        self._spawn(self._watch())
        if self.recorder is not None:
            self.recorder.start()
        if self.recorder is not None and cfg.retention_days > 0 and cfg.assertion_db:
            signer = prune_signer(cfg.anchor_key_file, cfg.anchor_dir) if cfg.anchor_key_file else None
            self._spawn(prune_forever(cfg.assertion_db, cfg.retention_days, sign_checkpoint=signer))
        if self.l2 is not None:
            l2 = self.l2
            self.pdp.on_computed = lambda rev, device, action, topic, decision: l2.record(
                rev, device.attributes_revision, action, topic, decision)
            self._spawn(self.l2.run())
        if self.bus is not None:
            self._spawn(self.bus.run())
        if self.registry_follower is not None:
            self._spawn(self.registry_follower.run())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            await self.reload(announce=True)
            await self._carry_out(self.enforcer.handle(ClockTick(datetime.now(timezone.utc))))
            self.flush_refusals()

    async def reload(self, announce: bool) -> bool | None:
        """Reload changed files, end what the new snapshot no longer admits, and tell the other brokers."""
        async with self._reload_lock:
            try:
                if not self.pdp.may_have_changed():
                    return None
                self.reload_pending_since = time.time()
                reply = await self._ask_loader()
                # The collector is paused from here to the swap, not while the loader parses: a stuck loader
                # must not stop collection (an outside attack grew the broker by 85 MB waiting on one).
                with collector_paused():
                    loaded = None if reply is None else await self._build(reply)
                    result = loaded if loaded is None or loaded is False else True
                    if isinstance(loaded, Snapshot):
                        # Swap and revoke in one synchronous step: no decision after the swap sees stale attributes.
                        previous = self.pdp.swap(loaded)
                        revocations = self.enforcer.handle(SnapshotSwapped())
                        await self._carry_out(revocations)
                        self._spawn(run_in_steps(releasing(previous, loaded), pause=RELEASE_PAUSE))
                if isinstance(loaded, Snapshot) and announce and self.bus is not None:
                    await self.bus.publish({"type": "reload", "revision": self.pdp.snapshot_revision})
            except Exception:  # the watcher must outlive any single bad reload
                log.exception("policy reload failed")
                result = False
            finally:
                self.reload_pending_since = None
        if result is not None:
            if self.metrics is not None:
                self.metrics.reloaded(bool(result))
            with self.reload_condition:
                self.reload_attempts += 1
                self.reload_condition.notify_all()
        return result

    async def apply_registry(self, registry: Any, revision: int) -> bool:
        """A new version of a Redis registry: swapped in and live sessions re-judged in one step, as a reload."""
        async with self._reload_lock:
            try:
                snapshot = self.pdp.with_registry(registry)
            except SourceError as exc:
                log.error("registry revision %d rejected, the previous version stays in force: %s", revision, exc)
                return False
            self.pdp.swap(snapshot)
            await self._carry_out(self.enforcer.handle(SnapshotSwapped()))
        with self.reload_condition:
            self.reload_attempts += 1
            self.reload_condition.notify_all()
        return True

    async def _ask_loader(self) -> Reply | None | object:
        """What the loader process found changed (None: nothing), or ``IN_BROKER`` when there is no loader
        or it failed: the change is then parsed in a thread of this process (see ``_build``)."""
        if self.loader is None:
            return IN_BROKER
        try:
            return await self.loader.load(self.pdp.file_signature, self.pdp.in_force())
        except LoaderError as exc:
            log.warning("the loader process failed (%s); this change is loaded in the broker, and a new "
                        "loader process is started for the next one", exc)
            return IN_BROKER

    async def _build(self, reply: Reply | object) -> Snapshot | bool | None:
        """The next snapshot (see ``DecisionPoint.load_if_changed``): from the loader's reply, built here in
        steps between messages; or parsed and built in a thread of this process."""
        if isinstance(reply, Reply):
            try:
                loaded = await run_in_steps(applying(self.pdp, reply))
            except DeltaMismatch as exc:
                log.warning("the loader process sent a change that does not fit the version in force (%s); this "
                            "change is loaded in the broker, and a new loader process is started", exc)
                if self.loader is not None:
                    await self.loader.close()
            else:
                self.loads["loader"] += 1
                return loaded
        loaded = await asyncio.to_thread(self._load_yielding)
        self.loads["broker"] += loaded is not None
        return loaded

    def _load_yielding(self) -> Snapshot | bool | None:
        """``load_if_changed`` in a thread, with the GIL handed back to the event loop quickly while it runs.

        A load is pure Python and holds the GIL; with the default 5 ms switch interval every message the
        loop handles meanwhile waits up to 5 ms at each of its GIL hand-overs, so while a changed file is
        loaded the interval is 0.5 ms. (Only when the loader process failed: see ``_load``.)
        """
        previous = sys.getswitchinterval()
        sys.setswitchinterval(RELOAD_SWITCH_INTERVAL)
        try:
            return self.pdp.load_if_changed()
        finally:
            sys.setswitchinterval(previous)

    async def _carry_out(self, actions: Sequence[Any]) -> None:
        """Close what the core revoked, all at once: each is already denied everything, so order does not matter."""
        ending: list[Disconnect | DropSession | DropSubscription] = []
        for action in actions:
            if isinstance(action, Disconnect):
                if self.aborter is not None:
                    self.aborter(action.conn)  # before any await: no backlog of other work delays the close
                admission = self.enforcer.admission_of(action.conn)
                device_id = admission.device.device_id if admission and admission.device else None
                log.warning("session revoked: client=%s device=%s reason=%s", field(action.client_id), device_id,
                            action.reason, extra={"event": "revoked", "client_id": action.client_id,
                                                  "device_id": device_id, "reason": action.reason})
                self._record_end(action)
                ending.append(action)
                if self.metrics is not None:
                    self.metrics.revoked("disconnect")
            elif isinstance(action, DropSession):
                log.warning("offline session dropped: client=%s reason=%s", field(action.client_id),
                            safe(action.reason))
                ending.append(action)
            elif isinstance(action, DropSubscription):
                log.warning("subscription dropped: client=%s filter=%s reason=%s", field(action.client_id),
                            field(action.topic_filter), safe(action.reason))
                if self.recorder is not None:
                    peer = self._peers.get(action.conn, (None, None))[1]
                    self.recorder.decision(self.enforcer.admission_of(action.conn), action.client_id, peer,
                                           "unsubscribe", action.topic_filter, Decision(False, None, action.reason),
                                           None, 0, self.pdp.snapshot_revision)
                ending.append(action)
        if self.closer is not None and ending:
            closer = self.closer
            results = await asyncio.gather(*(closer(action) for action in ending), return_exceptions=True)
            for action, result in zip(ending, results):
                if isinstance(result, BaseException):
                    log.error("could not close %s (%s): %r", action.client_id, action.reason, result)

    async def _on_event(self, event: dict[str, Any]) -> None:
        result = await self.reload(announce=False)
        if result:
            self.remote_reloads += 1
        revision = event.get("revision")
        if result is None and revision and revision != self.pdp.snapshot_revision:
            # Anyone who can publish on the Redis channel can send these: at most one line a minute.
            now = time.monotonic()
            if now - self._mismatch_logged_at >= MISMATCH_LOG_INTERVAL:
                log.warning("node %s announced revision %s but this node's files give %s; do the brokers share "
                            "the policy files? (%d more such announcements not logged)", safe(str(event.get("node"))),
                            safe(str(revision)), self.pdp.snapshot_revision, self._mismatches_unlogged)
                self._mismatch_logged_at, self._mismatches_unlogged = now, 0
            else:
                self._mismatches_unlogged += 1

    async def _warm(self, device: Device) -> None:
        """Fill L1 with what any broker already decided for this device under the current policy."""
        assert self.l2 is not None
        snapshot = self.pdp.snapshot
        entries = await self.l2.fetch(snapshot.policy.revision, snapshot.policy.rules, device.attributes_revision, device.attrs)
        self.pdp.warm(snapshot, device, entries)

    def _readings(self) -> dict[str, tuple[str, str, float]]:
        """What the metrics endpoint reads at each scrape (nothing here is counted per message)."""
        recorder = self.recorder
        return {
            "mqtt_pdp_connections": ("gauge", "Admitted connections open now", len(self.connected_at)),
            "mqtt_pdp_assertion_backlog": ("gauge", "Decisions captured, not yet acknowledged by the writer",
                                           recorder.pending if recorder is not None else 0),
            "mqtt_pdp_spool_bytes": ("gauge", "Bytes of records spooled to disk while a sink is down",
                                     directory_bytes(self.settings.spool_dir) if recorder is not None else 0),
            "mqtt_pdp_records_written": ("counter", "Assertion records acknowledged by the writer",
                                         recorder.shipped if recorder is not None else 0),
            "mqtt_pdp_redis_outages": ("counter", "Times Redis became unavailable",
                                       self.redis.outages if self.redis is not None else 0),
            "mqtt_pdp_redis_up": ("gauge", "1 while Redis is reachable (0 also when none is configured)",
                                  1 if self.redis is not None and self.redis.available else 0),
            "mqtt_pdp_uptime_seconds": ("gauge", "Seconds since this service started", time.time() - self.started_at),
        }

    async def close(self) -> None:
        self.flush_refusals(everything=True)
        if self.loader is not None:
            await self.loader.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.recorder is not None:
            await self.recorder.close()
        # Bounded: redis-py's asyncio clients can swallow a cancellation while closing a socket
        # (seen at shutdown, Python 3.11), and a broker must still stop.
        await finish(list(self._tasks), "background task")
        if self.registry_follower is not None:
            try:
                await asyncio.wait_for(self.registry_follower.close(), 2.0)
            except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - shutting down: a stuck socket must not stop it
                log.debug("registry follower close failed", exc_info=True)
        if self.redis is not None:
            closing = asyncio.ensure_future(self.redis.close())
            if not (await asyncio.wait({closing}, timeout=2.0))[0]:
                await finish([closing], "Redis connection close")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Keep the garbage collector out of a reload, and out of what it leaves behind.

    A reload allocates while messages flow; a collection it triggers meanwhile can be a full pass over the
    heap (100,000 devices, the index: 120 ms with the GIL held, every message waiting). So the collector is
    paused until the swap is done. When it is switched back on, everything allocated meanwhile is still in
    the youngest generation, and the first young collection would walk all of it; ``gc.freeze()`` then
    ``gc.unfreeze()`` moves every tracked object to the oldest generation instead, a list splice, so the new
    snapshot is examined only by the next full collection, like any long-lived object. (Freezing *without*
    unfreezing made later collections cheaper but kept every garbage cycle pending at that moment,
    connections and sockets included, for good: a leak per reload.)
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if collecting:
            gc.enable()


async def finish(tasks: list[asyncio.Future[Any]], what: str, timeout: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again if a cancellation was lost; give up after a bound."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(3):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=timeout)
    log.warning("%d %s(s) did not stop at shutdown; abandoned", len(pending), what)
