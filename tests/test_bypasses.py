"""The six amqtt 0.12.1 authorization holes, each attacked with real clients.

Each attack runs against HardenedBroker (must fail) and, where the hole is in
amqtt itself, against stock amqtt with the same plugin (must succeed), which
shows the test can tell the difference.
"""

from __future__ import annotations

import pytest
from broker_plugin.amqtt_compat import Broker

from tests.support import wait_for

# Runs a test against stock amqtt 0.12.1 (with the same plugin) instead of the hardened broker.
STOCK = pytest.mark.parametrize("broker_class", [Broker], ids=["stock-amqtt"])


def _wait_until(broker, predicate, what: str) -> None:
    wait_for(lambda: broker.run(predicate), what)


# 1. Retained messages on subscribe are checked as receives.


def retained_secret_attack(broker, connect) -> list[str]:
    root = connect("root-1")
    root.publish("a/secret", b"retained secret", qos=1, retain=True)
    root.publish("a/ok", b"retained ok", qos=1, retain=True)
    watcher = connect("watcher-1")  # may subscribe a/# but never receive a/secret
    assert watcher.subscribe("a/#") == 0
    root.publish("a/sentinel", b"after the retained ones")
    return sorted(m.topic for m in watcher.messages_until("a/sentinel"))


def test_1_retained_message_not_sent_to_subscriber_that_may_not_receive_it(broker, connect):
    assert retained_secret_attack(broker, connect) == ["a/ok", "a/sentinel"]


@STOCK
def test_1_stock_amqtt_leaks_the_retained_message(broker, connect):
    assert retained_secret_attack(broker, connect) == ["a/ok", "a/secret", "a/sentinel"]


# 2. Wills are publishes: checked at connect and again when published.


def test_2_will_on_forbidden_topic_refuses_connect(connect):
    connect("sensor-1", will=("sites/plant-a/sensor-2/status", b"forged", 1, True), expect=5)
    connect("sensor-1", will=("$SYS/broker/forged", b"forged", 0, False), expect=5)
    connect("sensor-1", will=("sites/plant-a/sensor-1/status", b"offline", 1, True), expect=0)


def test_2_will_no_longer_permitted_is_neither_delivered_nor_retained(broker, connect, policy_dir):
    root = connect("root-1")
    assert root.subscribe("sites/#") == 0
    sensor = connect("sensor-1", will=("sites/plant-a/sensor-1/status", b"offline", 1, True))
    attempts = broker.plugin.service.reload_attempts
    policy = policy_dir / "policy.csv"
    policy.write_text(policy.read_text().replace("p, sensor-will,", "# p, sensor-will,"))
    broker.wait_reload(attempts)
    sensor.drop()
    sessions = broker.broker._sessions
    _wait_until(broker, lambda: sessions["sensor-1"][0].transitions.state == "disconnected", "sensor-1 disconnected")
    root.publish("sites/plant-a/sentinel", b"s")
    assert [m.topic for m in root.messages_until("sites/plant-a/sentinel")] == ["sites/plant-a/sentinel"]
    assert "sites/plant-a/sensor-1/status" not in broker.run(lambda: dict(broker.broker.retained_messages))


def test_2_permitted_will_is_delivered(broker, connect):
    root = connect("root-1")
    assert root.subscribe("sites/#") == 0
    sensor = connect("sensor-1", will=("sites/plant-a/sensor-1/status", b"offline", 1, False))
    sensor.drop()
    message = root.next_message()
    assert (message.topic, message.payload) == ("sites/plant-a/sensor-1/status", b"offline")


# 3. Client-id take-over: authentication happens before any session is touched.


def victim_offline_with_a_queued_message(broker, connect):
    """sensor-1 holds a persistent session with one QoS 1 command queued while it is offline."""
    victim = connect("sensor-1", clean=False)
    assert victim.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
    victim.close()
    sessions = broker.broker._sessions
    _wait_until(broker, lambda: sessions["sensor-1"][0].transitions.state == "disconnected", "victim offline")
    dashboard = connect("dash-1")
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"queued while offline", qos=1)
    _wait_until(broker, lambda: sessions["sensor-1"][0].retained_messages.qsize() == 1, "message queued")
    return dashboard


def session_takeover_attack(broker, connect) -> list[bytes]:
    dashboard = victim_offline_with_a_queued_message(broker, connect)
    # Another device's certificate, the victim's client id: refused, in both variants.
    connect("sensor-2", client_id="sensor-1", clean=False, expect=5)
    connect("sensor-2", client_id="sensor-1", clean=True, expect=5)
    victim = connect("sensor-1", clean=False)
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"after reconnect", qos=1)
    payloads = []
    for _ in range(4):
        try:
            payloads.append(victim.next_message(timeout=2).payload)
        except AssertionError:
            break
        if payloads[-1] == b"after reconnect":
            break
    return payloads


def test_3_failed_takeover_leaves_victim_session_intact(broker, connect):
    assert session_takeover_attack(broker, connect) == [b"queued while offline", b"after reconnect"]


@STOCK
def test_3_stock_amqtt_hands_the_victims_session_to_another_device(broker, connect):
    """Stock amqtt adopts the victim's session before authenticating, and that session still carries
    the victim's TLS object: even a certificate-checking plugin then sees the victim's certificate."""
    victim_offline_with_a_queued_message(broker, connect)
    attacker = connect("sensor-2", client_id="sensor-1", clean=False, expect=0)
    assert attacker.next_message().payload == b"queued while offline"


def test_3_failed_takeover_does_not_kick_connected_victim(broker, connect):
    victim = connect("sensor-1", clean=False)
    assert victim.subscribe("sites/plant-a/sensor-1/cmd") == 0
    connect("sensor-2", client_id="sensor-1", clean=True, expect=5)
    connect("sensor-2", client_id="sensor-1", clean=False, expect=5)
    dashboard = connect("dash-1")
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"still yours")
    assert victim.next_message().payload == b"still yours"
    assert not victim.disconnected.is_set()


# 4. On connect, retained messages go only to the session's own subscriptions.


def foreign_retained_attack(broker, connect) -> list[str]:
    root = connect("root-1")
    assert root.subscribe("a/#") == 0
    sysmon = connect("sysmon-1")
    assert sysmon.subscribe("$SYS/#") == 0
    root.publish("a/x", b"retained", retain=True)
    broker.call(broker.broker.retain_message(None, "$SYS/broker/secret", b"sys", 0))
    lab = connect("lab-1")  # may receive a/# but has subscribed to nothing
    assert lab.subscribe("a/sentinel") == 0
    root.publish("a/sentinel", b"s")
    return sorted(m.topic for m in lab.messages_until("a/sentinel"))


@STOCK
def test_4_stock_amqtt_sends_retained_messages_of_other_clients_filters(broker, connect):
    assert foreign_retained_attack(broker, connect) == ["$SYS/broker/secret", "a/sentinel", "a/x"]


def test_4_no_retained_messages_from_other_clients_filters(broker, connect):
    assert foreign_retained_attack(broker, connect) == ["a/sentinel"]
    # root-2 may receive '#' (which never selects $SYS) but holds no filter of its own: nothing either.
    root2 = connect("root-2")
    assert root2.subscribe("a/sentinel2") == 0
    root2.publish("a/sentinel2", b"s")
    assert [m.topic for m in root2.messages_until("a/sentinel2")] == ["a/sentinel2"]


def test_4_resumed_session_gets_retained_for_its_own_filters(broker, connect):
    root = connect("root-1")
    root.publish("a/x", b"retained", retain=True)
    lab = connect("lab-1", clean=False)
    assert lab.subscribe("a/x", qos=1) == 1
    assert lab.next_message().topic == "a/x"
    lab.close()
    lab = connect("lab-1", clean=False)
    assert lab.next_message().topic == "a/x"


# 5. Subscribe containment: see test_broker_basic (a/+ does not grant a/#; '#' does not grant $SYS/#).


# 6. Deliveries do not depend on the subscription list staying still during a broadcast.


def broadcast_race_attack(broker, connect) -> list[bytes]:
    first = connect("root-1")
    assert first.subscribe("race/t") == 0
    live = connect("root-2")
    assert live.subscribe("race/t") == 0
    plugin = broker.plugin
    original = plugin.allows
    first_session = broker.run(lambda: broker.broker._sessions["root-1"][0])
    fired = []

    def allows(session, action, topic):
        # What amqtt's once-a-second session monitor does, at the worst moment:
        # drop an earlier subscriber from the list the broadcast is walking.
        if action == "receive" and topic == "race/t" and not fired:
            fired.append(True)
            broker.broker._del_subscription("race/t", first_session)
        return original(session, action, topic)

    plugin.allows = allows
    first.publish("race/t", b"1")
    first.publish("race/t", b"2")
    received: list[bytes] = []
    while b"2" not in received:
        received.append(live.next_message().payload)
    return received


def test_6_delivery_survives_subscription_removal_during_broadcast(broker, connect):
    assert broadcast_race_attack(broker, connect) == [b"1", b"2"]


@STOCK
def test_6_stock_amqtt_skips_the_live_subscriber(broker, connect):
    assert broadcast_race_attack(broker, connect) == [b"2"]


# Messages queued for an offline session are checked again when delivered.


def test_queued_message_not_delivered_after_receive_is_revoked(broker, connect, policy_dir):
    lab = connect("lab-1", clean=False)
    assert lab.subscribe("a/x", qos=1) == 1
    assert lab.subscribe("a/y", qos=1) == 1
    lab.close()
    sessions = broker.broker._sessions
    _wait_until(broker, lambda: sessions["lab-1"][0].transitions.state == "disconnected", "lab-1 offline")
    root = connect("root-1")
    root.publish("a/x", b"queued, then denied", qos=1)
    root.publish("a/y", b"queued, still allowed", qos=1)
    _wait_until(broker, lambda: sessions["lab-1"][0].retained_messages.qsize() == 2, "both queued")
    attempts = broker.plugin.service.reload_attempts
    policy = policy_dir / "policy.csv"
    policy.write_text(policy.read_text() + "p, no-a-x, *, *, *, a/x, receive, deny\n")
    broker.wait_reload(attempts)
    lab = connect("lab-1", clean=False)
    assert lab.subscribe("a/z") == 0
    root.publish("a/z", b"sentinel")
    assert [m.topic for m in lab.messages_until("a/z")] == ["a/y", "a/z"]


# A zero-byte retained PUBLISH removes the retained message: later subscribers get none [MQTT-3.3.1-10/11].


def cleared_retained_attack(broker, connect) -> list[tuple[str, bytes, bool]]:
    root = connect("root-1")
    root.publish("a/ok", b"retained", qos=1, retain=True)
    root.publish("a/ok", b"", qos=1, retain=True)  # cleared
    root.publish("a/kept", b"still retained", qos=1, retain=True)
    watcher = connect("watcher-1")
    assert watcher.subscribe("a/#") == 0
    root.publish("a/sentinel", b"after the retained ones")
    return sorted((m.topic, m.payload, bool(m.retain)) for m in watcher.messages_until("a/sentinel"))


def test_cleared_retained_message_is_not_sent_to_later_subscribers(broker, connect):
    assert cleared_retained_attack(broker, connect) == [("a/kept", b"still retained", True),
                                                         ("a/sentinel", b"after the retained ones", False)]
    assert broker.run(lambda: sorted(broker.broker._retained_messages)) == ["a/kept"]  # a/ok removed, not kept empty

