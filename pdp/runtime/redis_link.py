"""One Redis connection shared by the decision cache and the invalidation bus, with its faults reported once.

Redis is optional and never on the per-message path: when it is down,
decisions come from the in-process cache and the compiled policy, and the
operator sees one warning per outage, not one per message.
"""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis

log = logging.getLogger("mqtt_pdp.redis")

REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)


class RedisLink:
    # A second failure soon after recovery (a stale socket noticed late, a flapping server) is the same
    # outage to an operator: it is logged at debug level, not warned again.
    WARN_INTERVAL = 60.0

    def __init__(self, url: str, timeout: float = 0.5) -> None:
        self.url = url
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              health_check_interval=5)
        self.available = True
        self.outages = 0
        self._last_warning = -self.WARN_INTERVAL

    def failed(self, exc: BaseException) -> None:
        if self.available:
            self.available = False
            self.outages += 1
            now = time.monotonic()
            if now - self._last_warning < self.WARN_INTERVAL:
                log.debug("Redis unavailable again: %s", exc)
                return
            self._last_warning = now
            log.warning("Redis at %s unavailable (%s); decisions continue from the in-process cache and the "
                        "compiled policy; reconnecting in the background", _safe_url(self.url), exc or type(exc).__name__)

    def succeeded(self) -> None:
        if not self.available:
            self.available = True
            log.info("Redis at %s is back", _safe_url(self.url))

    async def close(self) -> None:
        await self.client.aclose()


def _safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url
