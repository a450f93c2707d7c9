"""The registry in Redis, shared by every broker of a large fleet, with a change feed.

Layout (``P`` = the ``redis_prefix`` setting):

* ``P:registry:devices``: a hash, device id -> the device as compact JSON (``encode``);
* ``P:registry:revision``: a counter, incremented by every change;
* ``P:registry:changes``: a channel; each change publishes ``{"revision": n, "ids": [...]}``
  (or ``{"revision": n, "full": true}`` after an import) in the same atomic script as the write.

A broker loads the whole hash at start, then applies each published change by reading
only the devices it names. A gap in revisions (a message lost while disconnected, pub/sub
is fire-and-forget) or a revision seen by the periodic check that no message announced
makes it load everything again, so a missed change costs at most one check interval.

A malformed entry (written by something else than these tools) is left out with an
error: that device is unknown, so it is refused (fail closed), and the others load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pdp.core.identity import device_id_problem, normalize_fingerprint
from pdp.core.topics import level_value_problem
from pdp.registry.device import STATUSES, CertBinding, Device
from pdp.registry.file import FileRegistry, format_time, parse_time

log = logging.getLogger("mqtt_pdp.registry")

SCHEMES = ("redis://", "rediss://", "unix://")
_STATUS = {status: status for status in STATUSES}


def is_redis_url(location: str | None) -> bool:
    return bool(location) and str(location).startswith(SCHEMES)


def keys(prefix: str) -> tuple[str, str, str]:
    """The devices hash, the revision counter and the change channel."""
    return f"{prefix}:registry:devices", f"{prefix}:registry:revision", f"{prefix}:registry:changes"


# -- the codec (pure) ------------------------------------------------------------------------------


def encode(device: Device) -> str:
    bound = {b.fingerprint for b in device.bindings}
    return json.dumps([device.type, device.location, device.purpose, device.owner, device.status,
                       sorted(device.fingerprints - bound),
                       [[b.fingerprint, format_time(b.not_after) or None, b.serial, b.issuer,
                         format_time(b.expires) or None] for b in device.bindings],
                       *([device.gateway] if device.gateway else [])], separators=(",", ":"))


def decode(device_id: str, text: str | bytes, intern: dict[str, str]) -> Device:
    """ValueError when the entry is not one ``encode`` could have written with valid values."""
    data = json.loads(text)
    if not isinstance(data, list) or len(data) not in (7, 8):
        raise ValueError("not a device entry")
    dtype, location, purpose, owner, status, legacy, bindings = data[:7]
    gateway = data[7] if len(data) == 8 else ""
    if not isinstance(gateway, str) or (gateway and device_id_problem(gateway) is not None):
        raise ValueError(f"gateway {gateway!r} is not a device id")
    values = []
    for name, value in (("id", device_id), ("type", dtype), ("location", location), ("purpose", purpose),
                        ("owner", owner)):
        if not isinstance(value, str):
            raise ValueError(f"{name} is not a string")
        shared = intern.get(value)
        if shared is None:
            problem = device_id_problem(value) if name == "id" else level_value_problem(value)
            if problem is not None:
                raise ValueError(f"{name} {value!r} {problem}")
            shared = intern[value] = value
        values.append(shared)
    if status not in _STATUS:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    fingerprints = {normalize_fingerprint(fp) for fp in legacy}
    cert_bindings = tuple(CertBinding(normalize_fingerprint(fp), parse_time(until) if until else None, serial or "",
                                      issuer or "", parse_time(expires) if expires else None)
                          for fp, until, serial, issuer, expires in bindings)
    fingerprints |= {b.fingerprint for b in cert_bindings}
    return Device(values[0], values[1], values[2], values[3], values[4], _STATUS[status], frozenset(fingerprints),
                  cert_bindings, gateway)


def decode_all(entries: Iterable[tuple[Any, Any]], location: str) -> dict[str, Device]:
    devices: dict[str, Device] = {}
    intern: dict[str, str] = {}
    for raw_id, text in entries:
        device_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        if text is None:
            continue
        try:
            devices[device_id] = decode(device_id, text, intern)
        except Exception as exc:  # any shape Redis may hold: a bad entry costs its device, never the registry
            log.error("%s: device %r left out (malformed entry: %s); it is refused until it is rewritten",
                      location, device_id[:128], exc)
    return devices


def registry_of(devices: Mapping[str, Device], revision: int, location: str) -> FileRegistry:
    """The devices as the registry a snapshot holds (the same type as the file's, no lines)."""
    return FileRegistry(devices=devices, revision=f"r{revision}", path=location)


# -- synchronous access (CLI, broker start) -----------------------------------------------------------

# One device (or several) written, the revision incremented and the change published, atomically.
_PUT = """
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local rev = redis.call('INCR', KEYS[2])
local ids = {}
for i = 1, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
redis.call('PUBLISH', KEYS[3], cjson.encode({revision = rev, ids = ids}))
return rev
"""
# Everything replaced (import): the hash swapped in by RENAME, so readers see all old or all new.
_REPLACE = """
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[1]) else redis.call('DEL', KEYS[1]) end
local rev = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', KEYS[3], cjson.encode({revision = rev, full = true}))
return rev
"""


class RedisRegistryStore:
    """Reading and writing the registry in Redis (redis-py, synchronous)."""

    def __init__(self, url: str, prefix: str, timeout: float = 5.0) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.devices_key, self.revision_key, self.channel = keys(prefix)

    @property
    def location(self) -> str:
        from pdp.runtime.redis_link import _safe_url

        return f"{_safe_url(self.url)} ({self.devices_key})"

    def revision(self) -> int:
        return int(self.client.get(self.revision_key) or 0)

    def load(self) -> FileRegistry:
        """Every device, at one revision (read in one MULTI, so no change falls between the two)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.revision_key)
        pipe.hgetall(self.devices_key)
        revision, entries = pipe.execute()
        return registry_of(decode_all(entries.items(), self.location), int(revision or 0), self.location)

    def get(self, device_ids: Iterable[str]) -> dict[str, Device | None]:
        ids = list(device_ids)
        if not ids:
            return {}
        found = decode_all(zip(ids, self.client.hmget(self.devices_key, ids)), self.location)
        return {device_id: found.get(device_id) for device_id in ids}

    def put(self, devices: Iterable[Device]) -> int:
        args: list[str] = []
        for device in devices:
            args += [device.device_id, encode(device)]
        return int(self.client.eval(_PUT, 3, self.devices_key, self.revision_key, self.channel, *args))

    def replace_all(self, devices: Iterable[Device], batch: int = 5000) -> int:
        """Write every device under a staging key, then swap it in and announce a full change."""
        staging = f"{self.devices_key}:import"
        self.client.delete(staging)
        chunk: dict[str, str] = {}
        for device in devices:
            chunk[device.device_id] = encode(device)
            if len(chunk) >= batch:
                self.client.hset(staging, mapping=chunk)
                chunk = {}
        if chunk:
            self.client.hset(staging, mapping=chunk)
        return int(self.client.eval(_REPLACE, 4, self.devices_key, self.revision_key, self.channel, staging))

    def close(self) -> None:
        self.client.close()
