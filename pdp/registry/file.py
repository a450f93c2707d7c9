"""The device registry: the authoritative source of each device's attributes and lifecycle status.

The embedded default is a YAML file under ``policies/``; anything with
``lookup`` and ``revision`` (for example a Redis-backed registry) can take its place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import yaml

from pdp.errors import SourceError
from pdp.core.identity import normalize_fingerprint
from pdp.core.topics import level_value_problem

STATUSES: tuple[str, ...] = ("provisioned", "active", "suspended", "retired")
ATTRIBUTE_FIELDS: tuple[str, ...] = ("type", "location", "purpose", "owner")
_KNOWN_FIELDS = frozenset({"id", "status", "fingerprints", *ATTRIBUTE_FIELDS})


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
    def revision(self) -> str:
        """Changes whenever anything a decision or admission depends on changes; part of cache keys."""
        text = "\0".join([*self.attrs.values(), self.status, *sorted(self.fingerprints)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Registry(Protocol):
    """What the PDP needs from a registry; a Redis-backed one implements the same two members."""

    @property
    def revision(self) -> str: ...

    def lookup(self, device_id: str) -> Device | None: ...


@dataclass(frozen=True)
class FileRegistry:
    devices: Mapping[str, Device]
    revision: str
    path: str = ""
    lines: Mapping[str, int] = field(default_factory=dict)  # device id -> its line, for messages

    def lookup(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    def __len__(self) -> int:
        return len(self.devices)


def yaml_error(path: str, exc: yaml.YAMLError) -> SourceError:
    """PyYAML's error as one line: where it failed, and where the construct it was reading began."""
    mark = getattr(exc, "problem_mark", None)
    reason = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        reason += f" ({context} at line {context_mark.line + 1})"
    return SourceError(path, mark.line + 1 if mark else None, reason)


def _scalar(node: yaml.Node, path: str, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise SourceError(path, node.start_mark.line + 1, f"{what} must be a single value")
    return str(node.value)


def _device_from_node(node: yaml.Node, path: str) -> Device:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise SourceError(path, line, "each device must be a mapping with id, type, location, purpose, owner, status")
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    fingerprints: set[str] = set()
    for key_node, value_node in node.value:
        key = _scalar(key_node, path, "a field name")
        key_line = key_node.start_mark.line + 1
        if key not in _KNOWN_FIELDS:
            raise SourceError(path, key_line, f"unknown field {key!r} (known: {', '.join(sorted(_KNOWN_FIELDS))})")
        if key in values or (key == "fingerprints" and fingerprints):
            raise SourceError(path, key_line, f"field {key!r} given twice")
        if key == "fingerprints":
            if not isinstance(value_node, yaml.SequenceNode):
                raise SourceError(path, key_line, "fingerprints must be a list of SHA-256 fingerprints")
            for item in value_node.value:
                try:
                    fingerprints.add(normalize_fingerprint(_scalar(item, path, "a fingerprint")))
                except ValueError as exc:
                    raise SourceError(path, item.start_mark.line + 1, str(exc)) from None
            continue
        values[key] = _scalar(value_node, path, f"field {key!r}")
        lines[key] = key_line
    for required in ("id", "status", *ATTRIBUTE_FIELDS):
        if required not in values:
            raise SourceError(path, line, f"device is missing field {required!r}")
    for name in ("id", *ATTRIBUTE_FIELDS):
        problem = level_value_problem(values[name])
        if problem is not None:
            raise SourceError(path, lines[name], f"{name} {values[name]!r} {problem}")
    if values["status"] not in STATUSES:
        raise SourceError(path, lines["status"], f"status {values['status']!r} is not one of {', '.join(STATUSES)}")
    return Device(
        device_id=values["id"],
        type=values["type"],
        location=values["location"],
        purpose=values["purpose"],
        owner=values["owner"],
        status=values["status"],
        fingerprints=frozenset(fingerprints),
    )


def parse_registry(text: str, path: str) -> FileRegistry:
    """Parse the registry YAML; every problem is a SourceError naming the line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    if root is None:
        raise SourceError(path, None, "registry is empty; expected 'devices:' with a list of devices")
    if not isinstance(root, yaml.MappingNode):
        raise SourceError(path, root.start_mark.line + 1, "expected a mapping with a 'devices:' list")
    device_nodes: list[yaml.Node] | None = None
    for key_node, value_node in root.value:
        key = _scalar(key_node, path, "a top-level key")
        if key != "devices":
            raise SourceError(path, key_node.start_mark.line + 1, f"unknown top-level key {key!r}; expected 'devices'")
        if isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null"):
            device_nodes = []
        elif not isinstance(value_node, yaml.SequenceNode):
            raise SourceError(path, value_node.start_mark.line + 1, "'devices' must be a list")
        else:
            device_nodes = list(value_node.value)
    if device_nodes is None:
        raise SourceError(path, None, "missing 'devices:' list")
    devices: dict[str, Device] = {}
    first_line: dict[str, int] = {}
    for node in device_nodes:
        device = _device_from_node(node, path)
        line = node.start_mark.line + 1
        if device.device_id in devices:
            raise SourceError(path, line, f"device {device.device_id!r} already defined at line {first_line[device.device_id]}")
        devices[device.device_id] = device
        first_line[device.device_id] = line
    revision = hashlib.sha256(text.encode()).hexdigest()[:12]
    return FileRegistry(devices=devices, revision=revision, path=path, lines=first_line)


def load_registry(path: str | Path) -> FileRegistry:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(path, None, f"cannot read registry: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SourceError(path, None, "registry is not UTF-8 text") from None
    return parse_registry(text, path)
