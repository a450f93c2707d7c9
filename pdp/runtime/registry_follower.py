"""A broker following the Redis registry: each published change applied to its live sessions at once.

Changes arrive on the registry's channel (``pdp.registry.redis_registry``); only the
devices a change names are read. A lost message cannot go unnoticed for long: a
revision that does not follow the one in force, a reconnection, or the counter
moving without a message (checked whenever a check interval passes quietly) makes
the follower load the whole registry again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from pdp.registry.file import FileRegistry
from pdp.registry.redis_registry import decode_all, keys, registry_of
from pdp.runtime.redis_link import REDIS_ERRORS, _safe_url

log = logging.getLogger("mqtt_pdp.registry")

Apply = Callable[[FileRegistry, int], Awaitable[bool]]


class RegistryFollower:
    def __init__(self, url: str, prefix: str, revision: int, current: Callable[[], FileRegistry], apply: Apply,
                 check_interval: float = 1.0) -> None:
        self.url = url
        self.client = aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.devices_key, self.revision_key, self.channel = keys(prefix)
        self.location = f"{_safe_url(url)} ({self.devices_key})"
        self.revision = revision
        self.current = current
        self.apply = apply
        self.check_interval = check_interval
        self.subscribed = asyncio.Event()
        self.changes = 0  # changes applied (partial and full)
        self.full_loads = 0
        self.failures = 0  # unexpected errors survived (a malformed revision counter, say)

    async def run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                backoff = 0.05
                if await self._revision() != self.revision:  # changed while we were not listening
                    await self._full()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.check_interval)
                    if message is None:
                        if await self._revision() != self.revision:
                            log.warning("registry revision moved without an announcement; loading it all again")
                            await self._full()
                        continue
                    await self._on_message(message["data"])
            except REDIS_ERRORS as exc:
                self.subscribed.clear()
                log.warning("registry at %s unavailable (%s); the registry in force stays; retrying", self.location,
                            exc or type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            except asyncio.CancelledError:
                raise
            except Exception:  # whatever Redis holds, the follower must not die silently and stop all changes
                self.subscribed.clear()
                self.failures += 1
                log.exception("following the registry at %s failed; the registry in force stays; retrying",
                              self.location)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except REDIS_ERRORS:
                    pass

    async def _revision(self) -> int:
        return _revision_of(await self.client.get(self.revision_key), self.location)

    async def _on_message(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            revision = int(event["revision"])
            ids = [str(i) for i in event.get("ids") or []]
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring malformed registry change on %s: %r", self.channel, data[:200])
            return
        if revision <= self.revision:
            return
        if event.get("full") or revision != self.revision + 1 or not ids:
            await self._full()
            return
        values = await self.client.hmget(self.devices_key, ids)
        found = decode_all(zip(ids, values), self.location)
        devices = dict(self.current().devices)
        for device_id in ids:
            device = found.get(device_id)
            if device is None:
                devices.pop(device_id, None)  # deleted, or malformed: unknown, so refused
            else:
                devices[device_id] = device
        if await self.apply(registry_of(devices, revision, self.location), revision):
            self.revision = revision
            self.changes += 1

    async def _full(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.revision_key)
        pipe.hgetall(self.devices_key)
        revision_raw, entries = await pipe.execute()
        revision = _revision_of(revision_raw, self.location)
        if revision < 0:
            return  # nothing trustworthy to apply; the registry in force stays until the counter is repaired
        devices = await asyncio.to_thread(decode_all, list(entries.items()), self.location)
        self.full_loads += 1
        if await self.apply(registry_of(devices, revision, self.location), revision):
            self.revision = revision
            self.changes += 1
        else:
            self.revision = revision  # rejected as a whole: wait for the next change rather than retry in a loop

    async def close(self) -> None:
        await self.client.aclose()


def _revision_of(raw: bytes | str | None, location: str) -> int:
    """The revision counter's value; -1 (logged) when it is not an integer, which no change can follow."""
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        log.error("registry at %s: revision counter %r is not an integer; changes wait until it is repaired",
                  location, str(raw)[:40])
        return -1
