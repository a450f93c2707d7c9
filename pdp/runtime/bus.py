"""Telling every broker that shares a Redis that the policy or the registry changed.

A broker that reloads announces its new revision on a Redis channel; the
others reload at once instead of at their next poll, and after a Redis outage
each broker re-checks its files, since it may have missed announcements.
Brokers that share a Redis are expected to read the same policy files.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pdp.runtime.redis_link import REDIS_ERRORS, RedisLink

log = logging.getLogger("mqtt_pdp.invalidation")

Handler = Callable[[dict[str, Any]], Awaitable[None]]
RESYNC = {"type": "resync"}


def channel_name(prefix: str) -> str:
    return f"{prefix}:events"


class InvalidationBus:
    def __init__(self, link: RedisLink, prefix: str, node_id: str, handler: Handler) -> None:
        self.link = link
        self.channel = channel_name(prefix)
        self.node_id = node_id
        self.handler = handler
        self.subscribed = asyncio.Event()
        self.received = 0

    async def publish(self, event: dict[str, Any]) -> bool:
        try:
            await self.link.client.publish(self.channel, json.dumps({**event, "node": self.node_id}))
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
            return False
        self.link.succeeded()
        return True

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with a backoff of at most one second."""
        backoff = 0.05
        first = True
        while True:
            pubsub = self.link.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.link.succeeded()
                self.subscribed.set()
                backoff = 0.05
                if not first:
                    await self.handler(RESYNC)
                first = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    try:
                        event = json.loads(message["data"])
                    except (ValueError, TypeError):
                        log.warning("ignoring malformed event on %s: %r", self.channel, message["data"][:200])
                        continue
                    if not isinstance(event, dict) or event.get("node") == self.node_id:
                        continue
                    self.received += 1
                    await self.handler(event)
            except REDIS_ERRORS as exc:
                self.subscribed.clear()
                self.link.failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            finally:
                try:
                    await pubsub.aclose()
                except REDIS_ERRORS:
                    pass
