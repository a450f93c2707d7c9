"""What changed between two versions of the policy or the registry, as the loader process sends it.

The loader process (``pdp.runtime.loader``) parses a changed file and sends the broker only what differs
from the version in force: the run of rules between the unchanged head and tail of the policy, the
devices added, changed or removed. Rebuilding 100,000 devices from a pickle would hold the broker's
interpreter for a hundred milliseconds; applying a delta, in steps between messages, takes a few.

A delta names the revision it applies to. The broker applies it only to that revision, so a loader that
restarted or fell out of step cannot corrupt the version in force: its delta is then against nothing (the
whole version, ``base`` None), which is slower to apply and just as correct.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pdp.core.engine import Rule
from pdp.core.layered import overlaying
from pdp.policy.load import Policy
from pdp.registry.device import Device
from pdp.registry.file import FileRegistry

FRAME_ITEMS = 100  # rules or devices per frame: unpickling one takes a few hundredths of a millisecond


class DeltaMismatch(Exception):
    """A delta that does not apply to the version in force (the loader fell out of step)."""


@dataclass(frozen=True)
class PolicyDelta:
    """``rules[start:end]`` of the ``base`` version are replaced by the rules sent in frames."""

    base: str | None  # revision it applies to; None: the whole policy (start = end = 0 on no rules)
    revision: str
    model_path: str
    policy_path: str
    model_text: str  # "" unless asked for (``with_texts``): only Casbin's cross-check reads them
    policy_text: str
    start: int
    end: int


@dataclass(frozen=True)
class RegistryDelta:
    """The ``base`` version with ``removed`` taken out and the devices sent in frames put in."""

    base: str | None  # revision it applies to; None: the whole registry
    revision: str
    path: str
    removed: tuple[str, ...]


def policy_delta(base: Policy | None, new: Policy, with_texts: bool = True) -> tuple[PolicyDelta, list[Rule]]:
    """The delta from ``base`` to ``new`` and the rules it puts in: one run between the common head and tail.

    Without ``with_texts`` the files' texts stay behind (a 10,000-rule policy is 800 KB to send and read
    while messages wait); the version applied then has no texts, and its Casbin reference cannot be built.
    """
    old: Sequence[Rule] = base.rules if base is not None else ()
    rules = new.rules
    head = 0
    limit = min(len(old), len(rules))
    while head < limit and old[head] == rules[head]:
        head += 1
    tail = 0
    while tail < limit - head and old[len(old) - 1 - tail] == rules[len(rules) - 1 - tail]:
        tail += 1
    delta = PolicyDelta(base.revision if base is not None else None, new.revision, new.model_path, new.policy_path,
                        new.model_text if with_texts else "", new.policy_text if with_texts else "", head,
                        len(old) - tail)
    return delta, list(rules[head:len(rules) - tail])


def registry_delta(base: FileRegistry | None, new: FileRegistry) -> tuple[RegistryDelta, list[tuple[str, Device]]]:
    """The delta from ``base`` to ``new`` and the devices it puts in (added or changed)."""
    before = base.devices if base is not None else {}
    changed = [(device_id, device) for device_id, device in new.devices.items()
               if (old := before.get(device_id)) is not device and old != device]
    removed = tuple(device_id for device_id in before if device_id not in new.devices)
    return RegistryDelta(base.revision if base is not None else None, new.revision, new.path, removed), changed


def frames(items: Sequence[Any], size: int = FRAME_ITEMS) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def applying_policy(current: Policy, delta: PolicyDelta,
                    hunk: Iterable[Sequence[Rule]]) -> Generator[None, None, Policy]:
    """``current`` with the delta applied, taking the rules a frame at a time (``hunk``, e.g. unpickled
    lazily) and yielding after each; DeltaMismatch if the delta was computed against another version."""
    if delta.base is not None and delta.base != current.revision:
        raise DeltaMismatch(f"policy delta against {delta.base}, in force {current.revision}")
    old = current.rules if delta.base is not None else ()
    put: list[Rule] = []
    for frame in hunk:
        put += frame
        yield None
    rules = (*old[:delta.start], *put, *old[delta.end:])
    yield None
    return Policy(rules=rules, revision=delta.revision, model_path=delta.model_path, policy_path=delta.policy_path,
                  model_text=delta.model_text, policy_text=delta.policy_text)


def applying_registry(current: FileRegistry, delta: RegistryDelta,
                      changed: Iterable[Sequence[tuple[str, Device]]]) -> Generator[None, None, FileRegistry]:
    """``current`` with the delta applied, the devices taken a frame at a time (``changed``) and laid over
    the version in force (``pdp.core.layered``); DeltaMismatch if the delta was computed against another version.

    The result carries no line numbers and no reader state: those serve messages and incremental reads,
    which the loader process does; the broker only looks devices up.
    """
    if delta.base is not None and delta.base != current.revision:
        raise DeltaMismatch(f"registry delta against {delta.base}, in force {current.revision}")
    devices = yield from overlaying(current.devices if delta.base is not None else {}, delta.removed, changed)
    return FileRegistry(devices=devices, revision=delta.revision, path=delta.path)
