"""A registered device: the attributes placeholders bind to and the lifecycle status admission checks.

A record, and the interface any registry (the YAML file, later Redis) offers the PDP.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from types import MappingProxyType
from typing import Protocol

STATUSES: tuple[str, ...] = ("provisioned", "active", "suspended", "retired")
ATTRIBUTE_FIELDS: tuple[str, ...] = ("type", "location", "purpose", "owner")


@dataclass(frozen=True)
class CertBinding:
    """One certificate bound to a device, with what ``bind-cert`` read from it.

    ``not_after`` closes the binding (the rotation window of an old certificate): from then on the
    certificate no longer admits the device, whatever its own validity. ``expires`` is the
    certificate's own notAfter, kept for the expiry report.
    """

    fingerprint: str
    not_after: datetime | None = None
    serial: str = ""
    issuer: str = ""
    expires: datetime | None = None

    def closed(self, now: datetime) -> bool:
        return self.not_after is not None and self.not_after <= now


@dataclass(frozen=True)
class Device:
    device_id: str
    type: str
    location: str
    purpose: str
    owner: str
    status: str
    fingerprints: frozenset[str] = field(default_factory=frozenset)  # every bound certificate, bindings' too
    bindings: tuple[CertBinding, ...] = ()  # bound with metadata and an optional window (``certificates:``)
    gateway: str = ""  # the gateway device that may act for this one (a legacy device without a certificate)

    def binding(self, fingerprint: str) -> CertBinding | None:
        for binding in self.bindings:
            if binding.fingerprint == fingerprint:
                return binding
        return None

    def binding_closed(self, fingerprint: str, now: datetime) -> bool:
        """True once the window of this certificate's binding has closed (rotation: the old certificate)."""
        binding = self.binding(fingerprint) if self.bindings else None
        return binding is not None and binding.closed(now)

    @cached_property
    def attrs(self) -> Mapping[str, str]:
        """The values placeholders bind to; computed once, decisions read it per message."""
        return MappingProxyType({
            "device_id": self.device_id,
            "type": self.type,
            "location": self.location,
            "purpose": self.purpose,
            "owner": self.owner,
        })

    def attributes(self) -> dict[str, str]:
        return dict(self.attrs)

    @cached_property
    def attributes_revision(self) -> str:
        """Changes whenever anything a decision or admission depends on changes; part of cache keys."""
        windows = sorted(f"{b.fingerprint}@{b.not_after.isoformat() if b.not_after else ''}" for b in self.bindings)
        text = "\0".join([*self.attrs.values(), self.status, *sorted(self.fingerprints), *windows, self.gateway])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry(Protocol):
    """What the PDP needs from a registry; a Redis-backed one implements the same two members."""

    @property
    def revision(self) -> str: ...

    def lookup(self, device_id: str) -> Device | None: ...
