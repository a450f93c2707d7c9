"""Allowed publish delivered, denied publish not delivered, subscribe containment, over real mTLS."""

from __future__ import annotations


def test_allowed_publish_is_delivered_and_denied_is_not(connect):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/other", b"denied: not the sensor's telemetry topic")
    sensor.publish("sites/plant-a/sensor-2/telemetry", b"denied: another device's topic")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"allowed")
    received = dashboard.messages_until("sites/plant-a/sensor-1/telemetry")
    assert [(m.topic, m.payload) for m in received] == [("sites/plant-a/sensor-1/telemetry", b"allowed")]


def test_qos1_allowed_publish_delivered(connect):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#", qos=1) == 1
    sensor = connect("sensor-1")
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"q1", qos=1)
    message = dashboard.next_message()
    assert (message.topic, message.payload, message.qos) == ("sites/plant-a/sensor-1/telemetry", b"q1", 1)


def test_receive_deny_carves_out_of_granted_subscription(connect):
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    commander = connect("root-1")
    commander.publish("sites/plant-a/secret/key", b"never to the dashboard")
    commander.publish("sites/plant-a/sensor-1/telemetry", b"sentinel")
    received = dashboard.messages_until("sites/plant-a/sensor-1/telemetry")
    assert [m.topic for m in received] == ["sites/plant-a/sensor-1/telemetry"]


def test_placeholders_confine_devices_to_their_own_topics(connect):
    sensor = connect("sensor-1")
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
    assert sensor.subscribe("sites/plant-a/sensor-2/cmd") == 0x80
    assert sensor.subscribe("sites/plant-b/sensor-1/cmd") == 0x80
    assert sensor.subscribe("sites/plant-a/+/cmd") == 0x80
    dashboard = connect("dash-1")
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"reboot")
    assert sensor.next_message().payload == b"reboot"


def test_subscribe_widening_refused_connection_stays_open(connect):
    lab = connect("lab-1")
    assert lab.subscribe("a/#") == 0x80  # only a/+ is granted: a/# would select a/b/c
    assert lab.subscribe("a/+/c") == 0x80
    assert lab.subscribe("+/x") == 0x80
    assert lab.subscribe("a/x") == 0
    assert lab.subscribe("a/+") == 0
    lab.publish("a/x", b"still connected")
    assert lab.next_message().payload == b"still connected"
    assert not lab.disconnected.is_set()


def test_filter_containment_grants_narrower_filters(connect):
    watcher = connect("watcher-1")  # may subscribe a/#
    assert watcher.subscribe("a/+/c") == 0
    assert watcher.subscribe("a/#") == 0
    assert watcher.subscribe("a") == 0
    assert watcher.subscribe("b/#") == 0x80


def test_hash_never_reaches_sys_topics(connect):
    root = connect("root-1")  # may subscribe '#'
    assert root.subscribe("#") == 0
    assert root.subscribe("$SYS/#") == 0x80
    assert root.subscribe("+/broker/uptime") == 0


def test_username_is_ignored_for_authorization(connect, broker, test_pki):
    from tests.support import Client

    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    client.client.username_pw_set("root-1", "password")
    try:
        assert client.connect() == 0
        assert client.subscribe("#") == 0x80
    finally:
        client.close()


def test_invalid_filters_are_refused_whatever_the_rules(broker, test_pki):
    """paho will not send these, so a raw client does; root-1 may subscribe to '#', which covers nearly
    everything. (A filter with U+0000 closes the connection instead: tests/test_conformance.py.)"""
    from tests.rawmqtt import RawClient, subscribe_packet

    root = RawClient(broker.port, test_pki.device("root-1"), test_pki.ca_file)
    try:
        assert root.connect("root-1") == 0
        root.send(subscribe_packet([("a/#/b", 0), ("a/b+", 0), ("a/b", 0)], packet_id=5))
        assert root.read_packet() == b"\x90\x05\x00\x05\x80\x80\x00"  # SUBACK: refused, refused, granted
    finally:
        root.close()


def test_denied_publish_and_subscribe_are_logged_at_info(broker, connect, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="mqtt_pdp.service")
    sensor = connect("sensor-1")
    dashboard = connect("dash-1")
    assert dashboard.subscribe("sites/plant-a/#") == 0
    sensor.publish("sites/plant-a/sensor-2/telemetry", b"not mine")
    assert sensor.subscribe("sites/#") == 0x80
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"mine")
    assert dashboard.next_message().payload == b"mine"
    denied = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "denied" in r.getMessage()]
    assert denied == ["sensor-1 publish sites/plant-a/sensor-2/telemetry denied: no matching rule",
                      "sensor-1 subscribe sites/# denied: no matching rule"]
