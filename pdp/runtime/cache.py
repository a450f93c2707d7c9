"""Decision caches. L1: a bounded in-process LRU, the only tier on the per-message path.

A cache entry is keyed by everything its decision depends on (policy revision,
the device's attribute revision, action, topic), so a changed policy or device
is never answered from a stale entry; it simply stops being hit.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Generic, TypeVar

from pdp.core.engine import Decision, decision_for
from pdp.runtime.redis_link import REDIS_ERRORS, RedisLink

_SEP = "\x00"  # between action and topic in an L2 field; topics cannot contain NUL
K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Bounded LRU; used from one event loop thread, so no lock on the read path."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        if len(data) > self.capacity:
            data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RedisDecisionCache:
    """L2: decisions shared through Redis by every broker using it, so a fleet of brokers warms one cache.

    A Redis round trip costs more than a compiled decision, so L2 is never read
    per message: entries are written behind the decision in batches, and read
    in one round trip per device at connect to warm that broker's L1.
    """

    def __init__(self, link: RedisLink, prefix: str, ttl: int, max_pending: int = 100_000,
                 flush_interval: float = 0.05) -> None:
        if ttl < 1:
            raise ValueError(f"L2 TTL must be at least 1 second, got {ttl}")
        self.link = link
        self.prefix = prefix
        self.ttl = ttl
        self.flush_interval = flush_interval
        self._pending: deque[tuple[str, str, str, Decision]] = deque(maxlen=max_pending)
        self.written = 0

    def key(self, policy_revision: str, device_revision: str) -> str:
        return f"{self.prefix}:l2:{policy_revision}:{device_revision}"

    def record(self, policy_revision: str, device_revision: str, action: str, topic: str, decision: Decision) -> None:
        """O(1) and never blocks; under a long Redis outage the oldest unwritten entries are let go (it is a cache)."""
        self._pending.append((self.key(policy_revision, device_revision), action, topic, decision))

    async def fetch(self, policy_revision: str, device_revision: str) -> dict[tuple[str, str], Decision]:
        """What any broker decided for this device under this policy; empty when Redis is unavailable."""
        try:
            raw = await self.link.client.hgetall(self.key(policy_revision, device_revision))
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
            return {}
        self.link.succeeded()
        out: dict[tuple[str, str], Decision] = {}
        for field, value in raw.items():
            action, _, topic = field.decode().partition(_SEP)
            text = value.decode()
            out[(action, topic)] = decision_for(text[0] == "A", text[1:] or None)
        return out

    async def run(self) -> None:
        """Write pending entries in batches until cancelled; a failed batch waits for Redis to come back."""
        backoff = self.flush_interval
        while True:
            await asyncio.sleep(backoff)
            if not self._pending:
                continue
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), 5000))]
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    keys = set()
                    for key, action, topic, decision in batch:
                        value = ("A" if decision.allowed else "D") + (decision.rule_id or "")
                        pipe.hset(key, f"{action}{_SEP}{topic}", value)
                        keys.add(key)
                    for key in keys:
                        pipe.expire(key, self.ttl)
                    await pipe.execute()
            except REDIS_ERRORS as exc:
                self.link.failed(exc)
                self._pending.extendleft(reversed(batch))
                backoff = min(1.0, backoff * 2)
                continue
            self.link.succeeded()
            self.written += len(batch)
            backoff = self.flush_interval
