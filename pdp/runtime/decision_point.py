"""The PDP as the broker sees it: the current policy and registry, swapped whole on reload.

The files are the source of truth; a snapshot of them is immutable, so a
decision never sees half of an edit. A file that fails to load leaves the last
good snapshot in force.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from pdp.core.admission import (
    Admission,
    AdmissionSettings,
    ConnectRequest,
    admit,
    client_id_overlap,
    device_problem,
)
from pdp.runtime.cache import LruCache
from pdp.core.engine import Decision
from pdp.errors import SourceError
from pdp.core.index import PolicyIndex
from pdp.policy.load import Policy, load_policy
from pdp.registry.file import Device, FileRegistry, load_registry
from pdp.core.topics import TopicError, validate_filter, validate_topic

log = logging.getLogger(__name__)

FileSignature = tuple[tuple[str, int, int, int], ...]
# Told about each decision the compiled index computed (not L1 hits): policy revision, device, action, topic, decision.
Recorder = Callable[[str, Device, str, str, Decision], None]


@dataclass(frozen=True)
class PdpSettings:
    model_path: str
    policy_path: str
    registry_path: str
    admission: AdmissionSettings
    # Ask Casbin for every decision too and count disagreements (tests and audits; slow).
    verify_with_casbin: bool = False
    l1_size: int = 100_000


@dataclass(frozen=True)
class Snapshot:
    """One consistent version of policy and registry, with its compiled index and its own L1 cache."""

    policy: Policy
    registry: FileRegistry
    index: PolicyIndex
    l1: LruCache[tuple[str, str, str], Decision]

    def registered(self, device_id: str) -> Device | None:
        return self.snapshot.registry.lookup(device_id)

    @property
    def revision(self) -> str:
        return f"{self.policy.revision}.{self.registry.revision}"


def load_snapshot(settings: PdpSettings) -> Snapshot:
    """Both files or neither: SourceError names the first problem."""
    policy = load_policy(settings.model_path, settings.policy_path)
    registry = load_registry(settings.registry_path)
    check_client_ids(settings.admission.client_id_pattern, registry)
    return Snapshot(policy, registry, PolicyIndex(policy.rules), LruCache(settings.l1_size))


def check_client_ids(pattern: str, registry: FileRegistry) -> None:
    """Refuse a registry in which the client id pattern would let one device claim another's client ids."""
    overlap = client_id_overlap(pattern, registry.devices)
    if overlap is not None:
        first, second = overlap
        example = pattern.replace("{device_id}", second).replace("*", "x")
        raise SourceError(registry.path, registry.lines.get(second),
                          f"client id pattern {pattern!r} lets device {first!r} use the client ids of device "
                          f"{second!r} (e.g. {example!r}) and take over its session; rename one of them or use "
                          "a pattern without '*'")


def _signature(paths: tuple[str, ...]) -> FileSignature:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((path, -1, -1, -1))
    return tuple(out)


class DecisionPoint:
    def __init__(self, settings: PdpSettings) -> None:
        self.settings = settings
        self._paths = (settings.model_path, settings.policy_path, settings.registry_path)
        self._signature = _signature(self._paths)
        self.snapshot = load_snapshot(settings)
        self.casbin_mismatches = 0
        self.last_error: str | None = None
        self.recorder: Recorder | None = None
        self._load_seconds = 0.0
        if settings.verify_with_casbin:
            self.lookup = self._verified_lookup  # type: ignore[method-assign]

    def admit(self, request: ConnectRequest, now: datetime | None = None) -> Admission:
        snap = self.snapshot
        return admit(request, self.settings.admission, snap.registry, self.decide, now or datetime.now(timezone.utc))

    def decide(self, device: Device, action: str, topic: str) -> Decision:
        return self.lookup(device, action, topic)[0]

    def lookup(self, device: Device, action: str, topic: str) -> tuple[Decision, str, str]:
        """The decision, the tier that answered it (``l1``: cached, ``index``: compiled policy) and the revision."""
        snap = self.snapshot
        key = (device.revision, action, topic)
        decision = snap.l1.get(key)
        if decision is not None:
            return decision, "l1", snap.revision
        try:
            (validate_filter if action == "subscribe" else validate_topic)(topic)
        except TopicError as exc:  # never reaches the rules, so no pattern can grant it
            decision = Decision(False, None, f"invalid {'filter' if action == 'subscribe' else 'topic'}: {exc}")
            snap.l1.put(key, decision)
            return decision, "index", snap.revision
        decision = snap.index.decide(device.attrs, action, topic)
        snap.l1.put(key, decision)
        if self.recorder is not None:
            self.recorder(snap.policy.revision, device, action, topic, decision)
        return decision, "index", snap.revision

    def _verified_lookup(self, device: Device, action: str, topic: str) -> tuple[Decision, str, str]:
        """``lookup``, then Casbin on whatever it returned: index decisions, L1 hits (warmed ones too) and
        invalid-topic denials, since each of them is what the broker acts on.

        Installed in place of ``lookup`` only when verifying, so the ordinary path pays nothing for it.
        """
        before = self.snapshot
        decision, tier, revision = DecisionPoint.lookup(self, device, action, topic)
        snap = before if before.revision == revision else self.snapshot
        if snap.revision != revision:  # reloaded twice meanwhile: the deciding policy is gone
            return decision, tier, revision
        reference = snap.policy.reference.decide(device, action, topic)
        if (reference.allowed, reference.rule_id) != (decision.allowed, decision.rule_id):
            self.casbin_mismatches += 1
            log.error("Casbin disagrees on %s %s %s (%s): casbin=%s pdp=%s", device.device_id, action, topic, tier,
                      reference, decision)
        return decision, tier, revision

    def warm(self, snapshot: Snapshot, device: Device, entries: dict[tuple[str, str], Decision]) -> None:
        """Put decisions taken elsewhere (L2) into L1, if ``snapshot`` is still the current one."""
        if self.snapshot is snapshot:
            for (action, topic), decision in entries.items():
                snapshot.l1.put((device.revision, action, topic), decision)

    def revocation_reason(self, admission: Admission) -> str | None:
        """Why a session admitted earlier may no longer stay connected under the current snapshot."""
        device = admission.device
        if device is None:
            return "unknown device"
        current = self.snapshot.registry.lookup(device.device_id)
        problem = device_problem(current, admission.identity)
        if problem is not None:
            return problem
        if current != device:
            return "device attributes changed"
        return None

    def registered(self, device_id: str) -> Device | None:
        return self.snapshot.registry.lookup(device_id)

    @property
    def revision(self) -> str:
        return self.snapshot.revision

    def load_if_changed(self) -> Snapshot | bool | None:
        """A new snapshot when a file changed (not yet in force), False when it was rejected, None when unchanged.

        Safe to run in a worker thread: it reads files and builds, and swaps nothing.
        """
        signature = _signature(self._paths)
        if signature == self._signature:
            return None
        self._signature = signature
        started = time.perf_counter()
        try:
            snapshot = load_snapshot(self.settings)
        except SourceError as exc:
            self.last_error = str(exc)
            log.error("policy reload rejected, previous version stays in force: %s", exc)
            return False
        self._load_seconds = time.perf_counter() - started
        return snapshot

    def swap(self, snapshot: Snapshot) -> None:
        """Put a loaded snapshot in force; the caller re-judges live sessions in the same synchronous step."""
        self.snapshot = snapshot
        self.last_error = None
        log.info("policy reloaded: revision %s (%d rules, %d devices) in %.3f s", snapshot.revision,
                 len(snapshot.policy.rules), len(snapshot.registry), self._load_seconds)
