"""A registered device: the attributes placeholders bind to and the lifecycle status admission checks.

A record, and the interface any registry (the YAML file, later Redis) offers the PDP.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Protocol

STATUSES: tuple[str, ...] = ("provisioned", "active", "suspended", "retired")
ATTRIBUTE_FIELDS: tuple[str, ...] = ("type", "location", "purpose", "owner")


@dataclass(frozen=True)
class Device:
    device_id: str
    type: str
    location: str
    purpose: str
    owner: str
    status: str
    fingerprints: frozenset[str] = field(default_factory=frozenset)

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
        text = "\0".join([*self.attrs.values(), self.status, *sorted(self.fingerprints)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry(Protocol):
    """What the PDP needs from a registry; a Redis-backed one implements the same two members."""

    @property
    def revision(self) -> str: ...

    def lookup(self, device_id: str) -> Device | None: ...
