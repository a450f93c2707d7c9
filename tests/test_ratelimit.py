"""Per-address connection rate limit: pure token bucket, and over the wire on a real broker."""

from __future__ import annotations

import logging
import socket

import pytest

from pdp.core.ratelimit import ConnectRateLimit
from tests.support import WAIT


def test_burst_then_rate_per_address() -> None:
    limit = ConnectRateLimit(rate=2.0, burst=3)
    assert [limit.allow("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("10.0.0.2", 0.0)  # another address has its own bucket
    assert not limit.allow("10.0.0.1", 0.2)  # 0.4 of a token
    assert limit.allow("10.0.0.1", 0.5)  # one token refilled
    assert not limit.allow("10.0.0.1", 0.5)
    assert [limit.allow("10.0.0.1", 100.0) for _ in range(4)] == [True, True, True, False]  # refills to burst only


def test_idle_addresses_are_forgotten() -> None:
    limit = ConnectRateLimit(rate=1.0, burst=2)
    for i in range(50):
        limit.allow(f"10.0.1.{i}", 0.0)
    limit.allow("10.0.0.9", 10.0)
    assert len(limit._buckets) == 1


@pytest.fixture
def broker_settings():
    return {"connect_rate": 0.5, "connect_burst": 3}


def test_connections_beyond_the_rate_are_closed_and_logged_once(broker, connect, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.broker")
    accepted = [connect(d) for d in ("sensor-1", "dash-1", "root-1")]  # the burst of 3
    for _ in range(3):  # 0.5 per second: these come before the next token
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as sock:
            sock.settimeout(WAIT)
            try:
                assert sock.recv(1) == b""  # closed before any TLS handshake
            except ConnectionResetError:
                pass
    assert broker.run(lambda: broker.broker.refused_rate) == 3
    lines = [r.getMessage() for r in caplog.records if "connection rate" in r.getMessage()]
    assert len(lines) == 1, lines  # once per address, not per connection
    assert accepted[2].subscribe("#") == 0  # the admitted ones are still served
    accepted[0].publish("sites/plant-a/sensor-1/telemetry", b"still")
    assert accepted[2].next_message().payload == b"still"
