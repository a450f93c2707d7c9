"""How many new connections one source address may open: a token bucket per address.

One address (an attacker, or a device stuck in a reconnect loop) could otherwise make
the broker do a TLS handshake, a certificate check and an admission decision as fast
as it can dial. Each address may open ``burst`` connections at once and then
``rate`` per second. Pure: the caller passes the time; idle buckets are forgotten
so the table stays bounded by the addresses seen within one refill period.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class ConnectRateLimit:
    def __init__(self, rate: float, burst: int, max_addresses: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self._buckets: dict[str, _Bucket] = {}
        self._swept = 0.0

    def allow(self, address: str, now: float) -> bool:
        """Whether a new connection from ``address`` may proceed at time ``now`` (seconds, monotonic)."""
        self._sweep(now)
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _sweep(self, now: float) -> None:
        """Forget full buckets (an address idle long enough to refill is the same as a new one)."""
        refill = self.burst / self.rate
        if now - self._swept < refill and len(self._buckets) < self.max_addresses:
            return
        self._swept = now
        self._buckets = {a: b for a, b in self._buckets.items()
                         if b.tokens + (now - b.updated) * self.rate < self.burst}
