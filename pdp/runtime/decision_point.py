"""The PDP as the broker sees it: the current policy, registry and CRLs, swapped whole on reload.

The files are the source of truth; a snapshot of them is immutable, so a
decision never sees half of an edit. Each source (policy, registry, CRLs) keeps
its own last good version: a file that fails to load leaves that source's
previous version in force and never blocks a change of another source. Files
are read only when complete (``pdp.runtime.sources``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

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
from pdp.core.index import PolicyIndex, run_to_end
from pdp.core.crl import NO_REVOCATIONS, RevocationList, merge_crls, parse_crls
from pdp.policy.load import Policy, decode, parse_policy
from pdp.registry.device import Device
from pdp.registry.file import FileRegistry, parse_registry
from pdp.runtime.sources import FileSignature, read_stable, signature
from pdp.core.topics import TopicError, validate_filter, validate_topic

log = logging.getLogger(__name__)

# Told about each decision the compiled index computed (not L1 hits): policy revision, device, action, topic, decision.
ComputedHook = Callable[[str, Device, str, str, Decision], None]
START_READ_ATTEMPTS = 40  # at start, wait this many settle intervals for files being written


CRL_SOURCE = "crl:"  # a CRL file's source name is this and its path


@dataclass(frozen=True)
class PdpSettings:
    model_path: str
    policy_path: str
    registry_path: str
    admission: AdmissionSettings
    # Ask Casbin for every decision too and count disagreements (tests and audits; slow).
    verify_with_casbin: bool = False
    l1_size: int = 100_000
    crl_paths: tuple[str, ...] = ()
    settle: float = 0.05  # a file must hold still this long (two equal reads) before it is applied
    redis_prefix: str = "mqtt-pdp"  # key prefix of a Redis registry (registry_path a redis:// URL)

    @property
    def registry_in_redis(self) -> bool:
        from pdp.registry.redis_registry import is_redis_url

        return is_redis_url(self.registry_path)

    def sources(self) -> dict[str, tuple[str, ...]]:
        """The files watched; a Redis registry is not one (it is followed by ``RegistryFollower``)."""
        out: dict[str, tuple[str, ...]] = {"policy": (self.model_path, self.policy_path)}
        if not self.registry_in_redis:
            out["registry"] = (self.registry_path,)
        for path in self.crl_paths:  # each CRL file its own source: a broken one does not block the others
            out[CRL_SOURCE + path] = (path,)
        return out


@dataclass(frozen=True)
class Snapshot:
    """One consistent version of policy, registry and CRLs, with its compiled index and its own L1 cache."""

    policy: Policy
    registry: FileRegistry
    index: PolicyIndex
    l1: LruCache[tuple[str, str, str], Decision]
    crl: RevocationList = NO_REVOCATIONS
    crl_files: Mapping[str, RevocationList] = field(default_factory=dict)  # per CRL source, each its last good

    @cached_property
    def snapshot_revision(self) -> str:
        """Cached: it is asked for every decision (an f-string each time was 1% of the broker's CPU), and a
        snapshot never changes."""
        base = f"{self.policy.revision}.{self.registry.revision}"
        return f"{base}.{self.crl.revision}" if self.crl.revision else base


def check_registry(pattern: str, registry: FileRegistry) -> None:
    """What a registry must satisfy before it may replace the one in force."""
    if not registry.devices:
        raise SourceError(registry.path, None, "registry has no devices (it would disconnect every device; "
                                               "to refuse a device, set its status to suspended or retired)")
    check_client_ids(pattern, registry)


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


def _bytes(contents: dict[str, bytes | OSError], path: str, what: str) -> bytes:
    data = contents[path]
    if isinstance(data, OSError):
        raise SourceError(path, None, f"cannot read {what}: {data.strerror or data}")
    return data


def parse_source(settings: PdpSettings, name: str, contents: dict[str, bytes | OSError],
                 previous_registry: FileRegistry | None = None) -> Any:
    """One source's new version from the bytes read; SourceError (with file:line) if it cannot be used.

    ``previous_registry`` (the version in force) lets the registry reader re-read only the devices that changed.
    """
    if name == "policy":
        model, policy_path = settings.model_path, settings.policy_path
        policy = parse_policy(decode(_bytes(contents, model, "model"), model, "model"),
                              decode(_bytes(contents, policy_path, "policy"), policy_path, "policy"), model, policy_path)
        if settings.verify_with_casbin:
            _ = policy.reference  # built here, in the loading thread, not by the first decision verified
        return policy
    if name == "registry":
        path = settings.registry_path
        registry = parse_registry(decode(_bytes(contents, path, "registry"), path, "registry"), path,
                                  previous_registry)
        check_registry(settings.admission.client_id_pattern, registry)
        return registry
    path = name[len(CRL_SOURCE):]
    return parse_crls([(path, _bytes(contents, path, "CRL"))])


@dataclass
class ParsedChange:
    """The sources that changed since ``signature`` was read, parsed: what ``parse_changes`` found."""

    signature: FileSignature  # of the files as read
    parts: dict[str, Any]  # source name -> its new version
    rejected: dict[str, str]  # source name -> why its new version cannot be used (file:line)
    seconds: float
    # The new policy's rules[start:new end] replaced the ones in force at [start:old end], the rest the same
    # objects (a loader's delta knows it): the index is then patched instead of regrouped.
    policy_replaced: tuple[int, int, int] | None = None


def parse_changes(settings: PdpSettings, sources: Mapping[str, tuple[str, ...]], old: FileSignature,
                  previous_registry: FileRegistry | None) -> ParsedChange | None:
    """Read the files once they hold still and parse each source whose files differ from ``old``.

    None when nothing changed or a file is still being written (it is read again at the next poll). All
    files are read in one stable read, so sources changed together (``mqtt-pdp apply``) come together.
    Pure apart from reading the files: the broker runs it in the loader process (``pdp.runtime.loader``).
    """
    paths = tuple(path for group in sources.values() for path in group)
    if signature(paths) == old:
        return None
    stable = read_stable(paths, settings.settle)
    if stable is None:
        return None
    new_signature, contents = stable
    before = {entry[0]: entry for entry in old}
    started = time.perf_counter()
    change = ParsedChange(new_signature, {}, {}, 0.0)
    for name, group in sources.items():
        if all(before.get(p) == entry for p, entry in zip(group, _entries(new_signature, group))):
            continue
        try:
            change.parts[name] = parse_source(settings, name, contents, previous_registry)
        except SourceError as exc:
            change.rejected[name] = str(exc)
    change.seconds = time.perf_counter() - started
    return change


def _read_for_start(paths: tuple[str, ...], settle: float) -> tuple[FileSignature, dict[str, bytes | OSError]]:
    for _ in range(START_READ_ATTEMPTS):
        stable = read_stable(paths, settle)
        if stable is not None:
            return stable
    raise SourceError(paths[0], None, "files kept changing while the broker started; try again")


# Decisions on longer topics are computed each time, never cached (L1 or Redis): the caches are bounded in
# entries, and distinct 60 KB filters would otherwise let one client fill 100,000 of them (an outside attack
# added 100 MB to the broker and 187 MB to Redis with 3,000). Real topics are far shorter.
CACHED_TOPIC_LENGTH = 1024


class DecisionPoint:
    def __init__(self, settings: PdpSettings) -> None:
        self.settings = settings
        self._sources = settings.sources()
        self._paths = tuple(path for paths in self._sources.values() for path in paths)
        self._signature, contents = _read_for_start(self._paths, settings.settle)
        parts = {name: parse_source(settings, name, contents) for name in self._sources}
        if settings.registry_in_redis:
            from pdp.registry.redis_registry import RedisRegistryStore

            from pdp.runtime.redis_link import REDIS_ERRORS

            store = RedisRegistryStore(settings.registry_path, settings.redis_prefix)
            try:
                parts["registry"] = store.load()
            except REDIS_ERRORS as exc:  # no registry, no admissions: the broker does not start without it
                raise SourceError(store.location, None, f"cannot read the registry: {exc}") from None
            finally:
                store.close()
            check_registry(settings.admission.client_id_pattern, parts["registry"])
        policy = parts["policy"]
        crl_files = {name: part for name, part in parts.items() if name.startswith(CRL_SOURCE)}
        self.snapshot = Snapshot(policy, parts["registry"], PolicyIndex(policy.rules), LruCache(settings.l1_size),
                                 merge_crls(list(crl_files.values())), crl_files)
        self.casbin_mismatches = 0
        self.errors: dict[str, str] = {}  # source -> why its newest version was rejected
        self.last_rejected: tuple[float, str] | None = None  # when, and why with file:line
        self.on_computed: ComputedHook | None = None  # e.g. L2 write-behind
        self._load_seconds = 0.0
        if settings.verify_with_casbin:
            self.lookup = self._verified_lookup  # type: ignore[method-assign]

    def admit(self, request: ConnectRequest, now: datetime | None = None) -> Admission:
        snap = self.snapshot
        return admit(request, self.settings.admission, snap.registry, self.decide, now or datetime.now(timezone.utc),
                     snap.crl)

    def decide(self, device: Device, action: str, topic: str) -> Decision:
        return self.lookup(device, action, topic)[0]

    def lookup(self, device: Device, action: str, topic: str) -> tuple[Decision, str, str]:
        """The decision, the tier that answered it (``l1``: cached, ``index``: compiled policy) and the revision."""
        snap = self.snapshot
        key = (device.attributes_revision, action, topic)
        decision = snap.l1.get(key)
        if decision is not None:
            return decision, "l1", snap.snapshot_revision
        try:
            (validate_filter if action == "subscribe" else validate_topic)(topic)
        except TopicError as exc:  # never reaches the rules, so no pattern can grant it
            decision = Decision(False, None, f"invalid {'filter' if action == 'subscribe' else 'topic'}: {exc}")
            if len(topic) <= CACHED_TOPIC_LENGTH:
                snap.l1.put(key, decision)
            return decision, "index", snap.snapshot_revision
        decision = snap.index.decide(device.attrs, action, topic)
        if len(topic) <= CACHED_TOPIC_LENGTH:
            snap.l1.put(key, decision)
            if self.on_computed is not None:
                self.on_computed(snap.policy.revision, device, action, topic, decision)
        return decision, "index", snap.snapshot_revision

    def _verified_lookup(self, device: Device, action: str, topic: str) -> tuple[Decision, str, str]:
        """``lookup``, then Casbin on whatever it returned: index decisions, L1 hits (warmed ones too) and
        invalid-topic denials, since each of them is what the broker acts on.

        Installed in place of ``lookup`` only when verifying, so the ordinary path pays nothing for it.
        """
        before = self.snapshot
        decision, tier, revision = DecisionPoint.lookup(self, device, action, topic)
        snap = before if before.snapshot_revision == revision else self.snapshot
        if snap.snapshot_revision != revision:  # reloaded twice meanwhile: the deciding policy is gone
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
                snapshot.l1.put((device.attributes_revision, action, topic), decision)

    def revocation_reason(self, admission: Admission) -> str | None:
        """Why a session admitted earlier may no longer stay connected under the current snapshot."""
        device = admission.device
        if device is None:
            return "unknown device"
        if admission.identity is not None:
            revoked = self.snapshot.crl.reason(admission.identity.certificate)
            if revoked is not None:
                return revoked
        current = self.snapshot.registry.lookup(device.device_id)
        problem = device_problem(current, admission.identity, datetime.now(timezone.utc))
        if problem is not None:
            return problem
        if current is not None and (current.attrs != device.attrs or current.status != device.status):
            # Certificate bindings alone do not count: binding a successor during a rotation must not cut the
            # session of the certificate in use (device_problem above has judged that certificate already).
            return "device attributes changed"
        return None

    def credential_problem(self, admission: Admission) -> str | None:
        identity = admission.identity
        if identity is None:
            return None
        revoked = self.snapshot.crl.reason(identity.certificate)
        if revoked is not None:
            return revoked
        device = admission.device
        current = self.snapshot.registry.lookup(device.device_id) if device is not None else None
        if current is not None and current.fingerprints and identity.certificate.fingerprint_sha256 not in current.fingerprints:
            return "certificate not bound to device"
        if current is not None and current.binding_closed(identity.certificate.fingerprint_sha256,
                                                          datetime.now(timezone.utc)):
            return "certificate binding window closed"
        return None

    def binding_problem(self, admission: Admission, now: datetime) -> str | None:
        """Why the binding of the certificate an admission was made with has closed by ``now`` (rotation), or None."""
        identity, device = admission.identity, admission.device
        if identity is None or device is None:
            return None
        current = self.snapshot.registry.lookup(device.device_id)
        if current is None or not current.bindings:
            return None
        return device_problem(current, identity, now) if current.binding_closed(
            identity.certificate.fingerprint_sha256, now) else None

    def registered(self, device_id: str) -> Device | None:
        return self.snapshot.registry.lookup(device_id)

    @property
    def snapshot_revision(self) -> str:
        return self.snapshot.snapshot_revision

    @property
    def last_error(self) -> str | None:
        return "; ".join(self.errors.values()) or None

    @property
    def file_signature(self) -> FileSignature:
        """The files as last read (``parse_changes`` looks for changes since then)."""
        return self._signature

    def in_force(self) -> dict[str, str]:
        """The revision of each versioned source in force (what a loader's delta must apply to)."""
        return {"policy": self.snapshot.policy.revision, "registry": self.snapshot.registry.revision}

    def may_have_changed(self) -> bool:
        """A cheap stat of the files: False means ``load_if_changed`` would find nothing to do."""
        return signature(self._paths) != self._signature

    def load_if_changed(self) -> Snapshot | bool | None:
        """A new snapshot when a source changed (not yet in force), False when every change was rejected,
        None when nothing changed (or a file is still being written: it is read again at the next poll).

        Safe to run in a worker thread: it reads files and builds, and swaps nothing. The broker instead
        parses in the loader process and builds on its event loop in steps (``pdp.runtime.loader``).
        """
        change = parse_changes(self.settings, self._sources, self._signature, self.snapshot.registry)
        if change is None:
            return None
        return run_to_end(self.accept(change))

    def accept(self, change: ParsedChange) -> Generator[None, None, Snapshot | bool | None]:
        """Note what ``parse_changes`` found and build the next snapshot from it, in steps (see
        ``PolicyIndex.building``): the new snapshot, False when every change was rejected, None when none."""
        for name in self._sources:
            if name in change.rejected:
                error = change.rejected[name]
                self.errors[name] = error
                self.last_rejected = (time.time(), error)  # for mqtt-pdp status, after the file is fixed too
                log.error("%s reload rejected, its previous version stays in force: %s", name, error,
                          extra={"event": "reload_rejected", "source": name, "error": error})
            elif name in change.parts:
                self.errors.pop(name, None)
        self._signature = change.signature
        if not change.parts:
            return False if change.rejected else None
        started = time.perf_counter()
        snapshot = yield from self._assemble(change.parts, change.policy_replaced)
        self._load_seconds = change.seconds + time.perf_counter() - started
        return snapshot

    def _assemble(self, parts: Mapping[str, Any],
                  replaced: tuple[int, int, int] | None) -> Generator[None, None, Snapshot]:
        current = self.snapshot
        policy = parts.get("policy", current.policy)
        index = (yield from PolicyIndex.building(policy.rules, current.index, replaced)) \
            if "policy" in parts else current.index
        crl_files = {**current.crl_files, **{n: part for n, part in parts.items() if n.startswith(CRL_SOURCE)}}
        crl = merge_crls([crl_files[n] for n in self._sources if n in crl_files]) \
            if crl_files != current.crl_files else current.crl
        return Snapshot(policy, parts.get("registry", current.registry), index, LruCache(self.settings.l1_size),
                        crl, crl_files)

    def with_registry(self, registry: FileRegistry) -> Snapshot:
        """The snapshot in force with another registry (a Redis registry's change); SourceError if unusable."""
        check_registry(self.settings.admission.client_id_pattern, registry)
        current = self.snapshot
        return Snapshot(current.policy, registry, current.index, LruCache(self.settings.l1_size), current.crl,
                        current.crl_files)

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Put a loaded snapshot in force and hand back the one it replaces (see ``release``).

        The caller re-judges live sessions in the same synchronous step.
        """
        previous, self.snapshot = self.snapshot, snapshot
        log.info("policy reloaded: revision %s (%d rules, %d devices) in %.3f s", snapshot.snapshot_revision,
                 len(snapshot.policy.rules), len(snapshot.registry), self._load_seconds)
        return previous


def release(old: Snapshot, new: Snapshot) -> None:
    """``releasing`` in one go."""
    run_to_end(releasing(old, new))


def releasing(old: Snapshot, new: Snapshot) -> Generator[None, None, None]:
    """Free a replaced snapshot's large parts piece by piece, yielding between pieces.

    Dropped at once, a 10,000-rule index and a full L1 cache are one C-level cascade of deallocations
    that holds the GIL for 20-30 ms, stalling every connection; the broker runs this on its event loop
    a step at a time instead. Parts the new snapshot still uses are left alone.
    """
    if old.index is not new.index:
        yield from old.index.releasing(new.index)
    if old.l1 is not new.l1:
        yield from old.l1.releasing()
    if old.registry is not new.registry:
        yield from old.registry.releasing(new.registry)


def _entries(sig: FileSignature, paths: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
    by_path = {entry[0]: entry for entry in sig}
    return [by_path[p] for p in paths]
