"""Prometheus metrics of one authorization service, in its own registry (no process-wide state).

Counted where things happen: decisions (by action, decision, cache tier, with a latency histogram),
connects (accepted, refused by reason), TLS refusals by reason, reloads applied or rejected and
revocations. Read when scraped: active connections, assertion backlog, spool bytes, records written,
Redis outages, and the broker's limit counters (listener full, packet guard, offline queue drops).

Reasons are free text that can carry device-supplied values; as label values they are cut to their
leading words and at most ``MAX_REASONS`` distinct ones are kept (then ``other``), so a hostile
client cannot grow the scrape without bound.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("mqtt_pdp.metrics")

MAX_REASONS = 32
LATENCY_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2, 0.1)
_REASON_HEAD = re.compile(r"[:('\"{\[]")


def reason_label(reason: str, known: set[str]) -> str:
    """A bounded label value for a free-text reason: its words before any detail, from a bounded set."""
    head = _REASON_HEAD.split(reason or "unknown", maxsplit=1)[0].strip()[:60] or "unknown"
    if head in known:
        return head
    if len(known) >= MAX_REASONS:
        return "other"
    known.add(head)
    return head


def directory_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (the spool: records waiting for a sink that is down)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue  # moved away by the writer meanwhile
    return total


# What is read at scrape time: name -> (kind, help, value). Kind is "counter" or "gauge".
Readings = dict[str, tuple[str, str, float]]


class _Readings(Collector):
    def __init__(self, sources: list[Callable[[], Readings]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        for source in list(self.sources):
            for name, (kind, text, value) in source().items():
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, text, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("mqtt_pdp_decisions", "Publish, subscribe, receive and will decisions",
                                 ["action", "decision", "tier"], registry=r)
        self.latency = Histogram("mqtt_pdp_decision_seconds", "Time to decide one request (cache lookup included)",
                                 ["action"], buckets=LATENCY_BUCKETS, registry=r)
        self.connects = Counter("mqtt_pdp_connects", "CONNECTs decided after the TLS handshake",
                                ["outcome", "reason"], registry=r)
        self.tls_refusals = Counter("mqtt_pdp_tls_refused", "TLS handshakes refused", ["reason"], registry=r)
        self.reloads = Counter("mqtt_pdp_reloads", "Policy, registry and CRL reloads", ["outcome"], registry=r)
        self.revocations = Counter("mqtt_pdp_revocations", "Live sessions ended by the broker (revocation, expiry, "
                                   "CRL, kick) and subscriptions dropped by a reload", ["kind"], registry=r)
        self.sources: list[Callable[[], Readings]] = []
        r.register(_Readings(self.sources))
        self._connect_reasons: set[str] = set()
        self._tls_reasons: set[str] = set()
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # labels resolved once, not per decision
        self._lock = threading.Lock()
        self._server: Any = None
        self.address: tuple[str, int] | None = None

    def decided(self, action: str, allowed: bool, tier: str | None, nanoseconds: int) -> None:
        key = (action, "allow" if allowed else "deny", tier or "none")
        children = self._children.get(key)
        if children is None:
            children = (self.decisions.labels(*key), self.latency.labels(action))
            self._children[key] = children
        children[0].inc()
        children[1].observe(nanoseconds / 1e9)

    def connect(self, allowed: bool, reason: str) -> None:
        if allowed:
            self.connects.labels("accepted", "").inc()
        else:
            with self._lock:
                label = reason_label(reason, self._connect_reasons)
            self.connects.labels("refused", label).inc()

    def tls_refused(self, reason: str) -> None:
        with self._lock:
            label = reason_label(reason, self._tls_reasons)
        self.tls_refusals.labels(label).inc()

    def reloaded(self, applied: bool) -> None:
        self.reloads.labels("applied" if applied else "rejected").inc()

    def revoked(self, kind: str) -> None:
        self.revocations.labels(kind).inc()

    # -- the HTTP endpoint ----------------------------------------------------------------------

    def serve(self, address: str) -> tuple[str, int]:
        """Start the scrape endpoint at ``host:port`` (port 0: any free one); returns where it listens."""
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"metrics {address!r}: use host:port, e.g. 127.0.0.1:9883")
        server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self._server = server
        self.address = (host, server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
