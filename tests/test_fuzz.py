"""A short seeded fuzz run (issue 10, item F): malformed packets over TLS with a valid certificate.

A few hundred packets, mutated from valid ones, are sent by sensor-1 (which may
publish only its own telemetry topic) on connections that are reopened whenever the
broker closes one. Afterwards: no traceback in the broker's log, nothing delivered to
a watcher that sensor-1 may not publish, and the broker still serves.
"""

from __future__ import annotations

import logging
import random

from tests.rawmqtt import (
    RawClient,
    connect_packet,
    packet,
    publish_packet,
    subscribe_packet,
)

SEED = 20261125
PACKETS = 300
OWN = "sites/plant-a/sensor-1/telemetry"


def seeds() -> list[bytes]:
    return [
        publish_packet(OWN, b"ok"), publish_packet("sites/plant-a/valve-1/cmd", b"forbidden"),
        publish_packet("sites/plant-a/sensor-1/telemetry", b"q1", qos=1, packet_id=9),
        subscribe_packet([("sites/#", 1)]), subscribe_packet([("#", 0), ("$SYS/#", 2)]),
        packet(0xA2, b"\x00\x02\x00\x01#"), b"\xc0\x00", packet(0x40, b"\x00\x09"), packet(0x62, b"\x00\x09"),
        connect_packet("sensor-1"), b"\xe0\x00",
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice < 0.6:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif choice < 0.8 and len(buf) > 1:
            del buf[rng.randrange(len(buf))]
        else:
            buf = buf[: rng.randrange(len(buf) + 1)]
    return bytes(buf)


def test_malformed_packets_cause_no_traceback_and_no_unauthorized_delivery(broker, connect, test_pki, caplog):
    caplog.set_level(logging.DEBUG)
    watcher = connect("root-2")
    assert watcher.subscribe("#") == 0
    rng = random.Random(SEED)
    corpus = seeds()
    client: RawClient | None = None
    reconnects = 0
    for i in range(PACKETS):
        if client is None:
            client = RawClient(broker.port, test_pki.device("sensor-1"), test_pki.ca_file)
            if not client.send(connect_packet("sensor-1", keepalive=0)):
                client.close()
                client = None
                continue
            reconnects += 1
        data = rng.choice(corpus)
        if rng.random() < 0.8:
            data = mutate(rng, data)
        if not client.send(data) or (i % 25 == 24 and client.closed_by_peer(timeout=0.05)):
            client.close()
            client = None
    if client is not None:
        client.close()
    # The broker still serves, and the watcher has seen everything published before the sentinel.
    connect("root-1").publish("a/sentinel", b"s")
    seen = watcher.messages_until("a/sentinel")
    unauthorized = [m.topic for m in seen if m.topic not in (OWN, "a/sentinel")]
    assert unauthorized == []
    # At the levels a broker logs (INFO and up): amqtt's own DEBUG lines carry exc_info for routine closes.
    tracebacks = [r for r in caplog.records
                  if r.levelno >= logging.INFO and (r.exc_info or "Traceback" in r.getMessage())]
    assert tracebacks == [], [r.getMessage() for r in tracebacks][:5]
    assert reconnects > 1  # the run did reach the broker's closing paths
