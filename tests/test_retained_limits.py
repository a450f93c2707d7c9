"""The retained store's limits (``max_retained_messages``, ``max_retained_bytes``, ``max_retained_per_device``):
amqtt kept every retained message without limit, so one device allowed to retain on many topics grew the
broker's memory without bound and could fill the store for everyone. Pure bookkeeping first, then a real
broker over mutual TLS with paho clients."""

from __future__ import annotations

import logging

import pytest

from pdp.core.retained import RetainedLedger
from pdp.runtime.settings import ServiceSettings


def test_each_limit_refuses_only_what_would_pass_it() -> None:
    """Bytes are the payload and the topic name (every topic here is 3 bytes long)."""
    ledger = RetainedLedger(max_messages=4, max_bytes=112, max_per_device=2, max_bytes_per_device=60)
    assert ledger.refuses("a/1", 7, "d1") is None
    ledger.store("a/1", 7, "d1")
    ledger.store("a/2", 7, "d1")
    assert ledger.refuses("a/3", 7, "d1") == "max_retained_per_device 2 reached"
    assert ledger.refuses("a/1", 27, "d1") is None  # replacing its own topic: not a new one
    ledger.store("a/1", 27, "d1")
    assert (len(ledger), ledger.bytes) == (2, 40)
    ledger.store("b/1", 47, "d2")
    assert ledger.refuses("b/2", 23, "d2") == "max_retained_bytes 112 would be passed"
    assert ledger.refuses("b/2", 7, "d2") is None
    ledger.store("b/2", 7, "d2")
    assert ledger.refuses("c/1", 0, "d3") is None  # an empty payload removes, never refused
    assert ledger.refuses("c/1", 1, "d3") == "max_retained_messages 4 reached"
    # Another device taking over a topic counts against that device's own limits.
    assert ledger.refuses("b/1", 5, "d1") == "max_retained_per_device 2 reached"
    assert (len(ledger), ledger.bytes, ledger.refused) == (3, 50, 4)  # b/1 forgotten: the broker removes it
    assert ledger.refuses("b/1", 5, "d3") is None
    # One device's bytes: its own message on a topic counts once, replaced or not.
    assert ledger.refuses("a/1", 47, "d1") is None  # 10 + 50 of its own
    assert ledger.refuses("a/1", 48, "d1") == "max_retained_bytes_per_device 60 would be passed"
    assert (len(ledger), ledger.bytes) == (2, 20)  # a/1 forgotten with its refusal


def test_topic_names_count_as_bytes() -> None:
    """Found by an outside attack: 1,000 retained topics of 60 KB names and 1-byte payloads held 59 MB while
    the store counted 1,000 bytes."""
    ledger = RetainedLedger(max_messages=100, max_bytes=1_000_000, max_per_device=100, max_bytes_per_device=200_000)
    for i in range(3):
        assert ledger.refuses(f"{i}/" + "x" * 60_000, 1, "d1") is None
        ledger.store(f"{i}/" + "x" * 60_000, 1, "d1")
    assert ledger.bytes == 3 * 60_003
    assert ledger.refuses("3/" + "x" * 60_000, 1, "d1") == "max_retained_bytes_per_device 200000 would be passed"


def test_a_refusal_is_logged_once_per_device_until_it_retains_again() -> None:
    ledger = RetainedLedger(1, 100, 1)
    assert [ledger.first_refusal("d1"), ledger.first_refusal("d1"), ledger.first_refusal("d2")] == [True, False, True]
    ledger.store("x", 1, "d1")
    assert ledger.first_refusal("d1") is True


@pytest.mark.parametrize("name", ["max_retained_messages", "max_retained_bytes", "max_retained_per_device",
                                  "max_retained_bytes_per_device"])
@pytest.mark.parametrize("value", [0, -1, "many", True])
def test_bad_limits_are_refused_with_their_name(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a positive number"):
        ServiceSettings(**{name: value}).broker_limits()  # type: ignore[arg-type]


# -- a real broker ---------------------------------------------------------------------------------------


@pytest.fixture
def broker_settings() -> dict[str, int]:
    return {"max_retained_per_device": 3, "max_retained_messages": 5, "max_retained_bytes": 4096}


def retained_seen(connect, device: str = "root-2") -> list[tuple[str, bytes]]:
    """What a new subscriber gets as retained messages under a/#, up to a live sentinel (lab-1 publishes it)."""
    watcher = connect(device)
    assert watcher.subscribe("a/#") == 0
    connect("lab-1").publish("a/sentinel", b"live")
    return sorted((m.topic, m.payload) for m in watcher.messages_until("a/sentinel") if m.retain)


def test_one_device_cannot_retain_past_its_share_and_live_delivery_goes_on(broker, connect, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.broker")
    live = connect("watcher-1")
    assert live.subscribe("a/#") == 0
    root = connect("root-1")
    for i in range(6):
        root.publish(f"a/{i}", f"v{i}".encode(), qos=1, retain=True)
    assert sorted(live.next_message().payload for _ in range(6)) == [b"v0", b"v1", b"v2", b"v3", b"v4", b"v5"]
    assert retained_seen(connect) == [("a/0", b"v0"), ("a/1", b"v1"), ("a/2", b"v2")]
    refusals = [r.getMessage() for r in caplog.records if "retained store" in r.getMessage()]
    assert refusals == ["retained store: a/3 not retained for root-1 (max_retained_per_device 3 reached); further "
                        "refusals for this device are counted, not logged, until it retains again"]
    root.publish("a/1", b"newer", qos=1, retain=True)  # its own topic again: replaced
    assert retained_seen(connect) == [("a/0", b"v0"), ("a/1", b"newer"), ("a/2", b"v2")]
    assert broker.run(lambda: (len(broker.broker._retained_messages), broker.broker._retained.refused)) == (3, 3)


def test_a_retained_message_that_cannot_be_replaced_is_removed_not_left_stale(broker, connect) -> None:
    root = connect("root-1")
    root.publish("a/state", b"old state", qos=1, retain=True)
    root.publish("a/state", b"x" * 5000, qos=1, retain=True)  # past max_retained_bytes: not retained
    assert broker.run(lambda: "a/state" in broker.broker._retained_messages) is False
    assert retained_seen(connect) == []
    assert broker.run(lambda: (broker.broker._retained.bytes, broker.broker._retained.refused)) == (0, 1)


def test_the_store_holds_at_most_max_retained_messages_across_devices(broker, connect) -> None:
    for device in ("root-1", "lab-1"):
        client = connect(device)
        for i in range(3):
            client.publish(f"a/{device}/{i}", b"v", qos=1, retain=True)
    assert broker.run(lambda: (len(broker.broker._retained_messages), broker.broker._retained.refused)) == (5, 1)
    assert len(retained_seen(connect)) == 5
