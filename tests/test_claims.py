"""README claims that no other test exercised, each run with real TLS, real paho clients and a real broker.

Revocation on attribute change and of offline sessions, resumed sessions (certificate and will),
TLS >= 1.2, UNSUBSCRIBE with the subscription index, L1 eviction, SIGINT on `mqtt-pdp broker`,
and broker-side retention.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from pdp import pki
from pdp.evidence.store import AssertionStore, QueryFilters
from tests.conftest import DEVICES, registry_yaml
from tests.support import (
    TRUST_DOMAIN,
    WAIT,
    BrokerProcess,
    Client,
    wait_for,
    write_cli_config,
)


def edit(broker, path: Path, text: str) -> None:
    attempts = broker.plugin.service.reload_attempts
    path.write_text(text)
    broker.wait_reload(attempts)
    assert broker.plugin.service.pdp.last_error is None


def records_of(path: Path, **filters) -> list:
    store = AssertionStore(path, readonly=True)
    try:
        return [record for _, record in store.query(QueryFilters(**filters))]
    finally:
        store.close()


def offline(broker, client_id: str) -> None:
    sessions = broker.broker._sessions
    wait_for(lambda: broker.run(lambda: sessions[client_id][0].transitions.state == "disconnected"),
             f"{client_id} offline")


# -- revocation on reload ------------------------------------------------------------------


def test_attribute_change_disconnects_and_reconnect_gets_the_new_attributes_and_rights(broker, connect, policy_dir):
    root = connect("root-1")
    assert root.subscribe("sites/#") == 0
    sensor = connect("sensor-1")
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"from plant-a")
    assert root.next_message().payload == b"from plant-a"

    moved = [(d, t, "plant-b" if d == "sensor-1" else loc, s) for d, t, loc, s in DEVICES]
    edit(broker, policy_dir / "devices.yaml", registry_yaml(moved))
    assert sensor.wait_disconnected()
    assert not root.disconnected.is_set()  # unchanged devices stay

    sensor = connect("sensor-1")
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd") == 0x80
    assert sensor.subscribe("sites/plant-b/sensor-1/cmd") == 0
    sensor.publish("sites/plant-a/sensor-1/telemetry", b"old location: denied")
    sensor.publish("sites/plant-b/sensor-1/telemetry", b"new location: allowed")
    received = root.messages_until("sites/plant-b/sensor-1/telemetry")
    assert [(m.topic, m.payload) for m in received] == [("sites/plant-b/sensor-1/telemetry", b"new location: allowed")]
    broker.stop()
    publishes = records_of(policy_dir.parent / "assertions.db", device="sensor-1", action="publish")
    assert [(r.topic, r.location, r.decision) for r in publishes] == [
        ("sites/plant-a/sensor-1/telemetry", "plant-a", "allow"),
        ("sites/plant-a/sensor-1/telemetry", "plant-b", "deny"),
        ("sites/plant-b/sensor-1/telemetry", "plant-b", "allow"),
    ]


def test_offline_persistent_session_of_a_suspended_device_is_dropped_with_its_queue(broker, connect, policy_dir):
    sensor = connect("sensor-1", clean=False)
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
    sensor.close()
    offline(broker, "sensor-1")
    dashboard = connect("dash-1")
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"queued before the suspension", qos=1)
    sessions = broker.broker._sessions
    wait_for(lambda: broker.run(lambda: sessions["sensor-1"][0].retained_messages.qsize() == 1), "message queued")

    registry = policy_dir / "devices.yaml"
    suspended = [(d, t, loc, "suspended" if d == "sensor-1" else s) for d, t, loc, s in DEVICES]
    edit(broker, registry, registry_yaml(suspended))
    assert broker.run(lambda: "sensor-1" not in sessions)
    connect("sensor-1", clean=False, expect=5)
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"while suspended", qos=1)

    edit(broker, registry, registry_yaml(DEVICES))
    sensor = connect("sensor-1", clean=False)
    assert sensor.session_present is False
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"after reactivation", qos=1)
    assert sensor.next_message().payload == b"after reactivation"  # nothing of the old queue before it


def test_persistent_session_of_a_reactivated_device_is_resumed_control(broker, connect):
    """Control for the test above: without the suspension the same set-up does get the queued message."""
    sensor = connect("sensor-1", clean=False)
    assert sensor.subscribe("sites/plant-a/sensor-1/cmd", qos=1) == 1
    sensor.close()
    offline(broker, "sensor-1")
    dashboard = connect("dash-1")
    dashboard.publish("sites/plant-a/sensor-1/cmd", b"queued", qos=1)
    sessions = broker.broker._sessions
    wait_for(lambda: broker.run(lambda: sessions["sensor-1"][0].retained_messages.qsize() == 1), "message queued")
    sensor = connect("sensor-1", clean=False)
    assert sensor.session_present is True
    assert sensor.next_message().payload == b"queued"


# -- a resumed session takes this connection's certificate and will ------------------------


def test_resumed_session_takes_the_new_certificate_and_will(broker, connect, test_pki, policy_dir):
    status = "sites/plant-a/sensor-1/status"
    root = connect("root-1")
    assert root.subscribe("sites/#", qos=1) == 1
    first_cert = test_pki.device("sensor-1")
    first = connect("sensor-1", clean=False, will=(status, b"old will", 1, False))
    first.close()  # graceful: no will
    offline(broker, "sensor-1")
    second_cert = test_pki.save("sensor-1-second", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN))
    second = connect("sensor-1", clean=False, creds=second_cert, will=(status, b"new will", 1, True))
    assert second.session_present is True
    second.publish("sites/plant-a/sensor-1/telemetry", b"from the second certificate")
    second.drop()  # ungraceful: the will is published
    received = root.messages_until(status)
    assert [(m.topic, m.payload) for m in received] == [
        ("sites/plant-a/sensor-1/telemetry", b"from the second certificate"), (status, b"new will")]
    late = connect("root-2")  # the new will asked to be retained
    assert late.subscribe(status) == 0
    retained = late.next_message()
    assert (retained.topic, retained.payload, retained.retain) == (status, b"new will", True)

    broker.stop()
    records = records_of(policy_dir.parent / "assertions.db", device="sensor-1")
    names = {first_cert.fingerprint: "first", second_cert.fingerprint: "second"}
    summary = [(r.action, r.topic, names.get(r.fingerprint, r.fingerprint)) for r in records]
    resumed = summary.index(("connect", None, "second"))
    assert [entry for entry in summary if entry[0] == "connect"] == [("connect", None, "first"), ("connect", None, "second")]
    assert summary[resumed + 1:] == [
        ("publish", "sites/plant-a/sensor-1/telemetry", "second"),
        ("publish", status, "second"),  # the will, checked again when published, under the new certificate
    ]


def test_graceful_disconnect_leaves_no_will_publish_record(broker, connect, policy_dir):
    status = "sites/plant-a/sensor-1/status"
    root = connect("root-1")
    assert root.subscribe("sites/#") == 0
    sensor = connect("sensor-1", will=(status, b"offline", 0, False))
    sensor.close()  # DISCONNECT: the will is discarded
    assert sensor.wait_disconnected()
    sentinel = connect("sensor-2")
    sentinel.publish("sites/plant-b/sensor-2/telemetry", b"s")
    assert [m.topic for m in root.messages_until("sites/plant-b/sensor-2/telemetry")] == [
        "sites/plant-b/sensor-2/telemetry"]  # the will was not published
    broker.stop()
    records = records_of(policy_dir.parent / "assertions.db", device="sensor-1")
    assert [(r.action, r.topic) for r in records] == [("connect", None)]


# -- TLS >= 1.2 ----------------------------------------------------------------------------


def client_context(test_pki, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(test_pki.ca_file))
    context.load_cert_chain(str(test_pki.device("sensor-1").cert), str(test_pki.device("sensor-1").key))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL offer old protocol versions at all
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = maximum
    return context


def handshake(context: ssl.SSLContext, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return str(tls.version())


def client_can_negotiate(test_pki, version: ssl.TLSVersion) -> str | None:
    """None if this machine's OpenSSL completes a ``version`` handshake with a local server that allows it."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(test_pki.dir / "server.pem"), str(test_pki.dir / "server-key.pem"))
    try:
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
        server.minimum_version = server.maximum_version = version
        client = client_context(test_pki, version)
    except (ssl.SSLError, ValueError) as exc:
        return f"cannot configure {version.name}: {exc}"
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(WAIT)
            with server.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        got = handshake(client, listener.getsockname()[1])
    except (OSError, ssl.SSLError) as exc:
        return f"the local OpenSSL does not negotiate {version.name}: {exc}"
    finally:
        thread.join(WAIT)
        listener.close()
    return None if got == {ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"}[version] else f"got {got}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1], ids=["tls1.1", "tls1.0"])
def test_tls_below_1_2_fails_the_handshake(broker, test_pki, version):
    why_not = client_can_negotiate(test_pki, version)
    if why_not is not None:
        pytest.skip(f"the client side cannot offer {version.name} here ({why_not})")
    with pytest.raises(ssl.SSLError):
        handshake(client_context(test_pki, version), broker.port)
    # Control: the same client context, allowed up to TLS 1.2, completes the handshake and an MQTT exchange.
    assert handshake(client_context(test_pki, ssl.TLSVersion.TLSv1_2), broker.port) == "TLSv1.2"
    client = Client(broker.port, "sensor-1", None, None, tls=False)
    client.client.tls_set_context(client_context(test_pki, ssl.TLSVersion.TLSv1_2))
    try:
        assert client.connect() == 0
        assert client.subscribe("sites/plant-a/sensor-1/cmd") == 0
        assert client.subscribe("sites/plant-a/#") == 0x80
    finally:
        client.close()


# -- UNSUBSCRIBE and the subscription index --------------------------------------------------


def test_unsubscribe_stops_deliveries_for_that_filter_only(connect):
    first = connect("root-1")
    second = connect("root-2")
    for client in (first, second):
        assert client.subscribe("u/t") == 0
        assert client.subscribe("u/sentinel") == 0
    second.publish("u/t", b"both subscribed")
    assert first.next_message().payload == b"both subscribed"
    assert second.next_message().payload == b"both subscribed"

    first.unsubscribe("u/t")
    second.publish("u/t", b"after unsubscribe")
    second.publish("u/sentinel", b"s")
    assert [m.topic for m in first.messages_until("u/sentinel")] == ["u/sentinel"]
    assert [(m.topic, m.payload) for m in second.messages_until("u/sentinel")] == [
        ("u/t", b"after unsubscribe"), ("u/sentinel", b"s")]

    # The last subscriber leaves the filter; a new subscription to it is delivered again.
    second.unsubscribe("u/t")
    second.publish("u/t", b"nobody subscribed")
    second.publish("u/sentinel", b"s2")
    assert [m.topic for m in second.messages_until("u/sentinel")] == ["u/sentinel"]
    assert [m.topic for m in first.messages_until("u/sentinel")] == ["u/sentinel"]
    assert first.subscribe("u/t") == 0
    second.publish("u/t", b"subscribed again")
    assert first.next_message().payload == b"subscribed again"


def test_overlapping_filters_deliver_once_per_matching_subscription(connect):
    root = connect("root-1")
    for topic_filter in ("o/#", "o/+", "o/x", "s"):
        assert root.subscribe(topic_filter) == 0
    publisher = connect("root-2")
    publisher.publish("o/x", b"three filters match")
    assert [root.next_message().payload for _ in range(3)] == [b"three filters match"] * 3
    publisher.publish("s", b"sentinel")
    assert [m.topic for m in root.messages_until("s")] == ["s"]  # exactly three, no fourth

    root.unsubscribe("o/+")
    publisher.publish("o/x", b"two filters match")
    publisher.publish("s", b"sentinel")
    assert [m.payload for m in root.messages_until("s")] == [b"two filters match"] * 2 + [b"sentinel"]


# -- L1 eviction --------------------------------------------------------------------------------


@pytest.mark.parametrize(("l1_size", "second_round_tier"), [(3, "index"), (1000, "l1")], ids=["small", "control"])
def test_small_l1_stays_bounded_and_decisions_stay_right(make_broker, test_pki, policy_dir, l1_size, second_round_tier):
    broker = make_broker(l1_size=l1_size)
    clients = []
    try:
        def client_for(device: str) -> Client:
            client = Client(broker.port, device, test_pki.device(device), test_pki.ca_file)
            clients.append(client)
            assert client.connect() == 0
            return client

        dashboard = client_for("dash-1")
        assert dashboard.subscribe("sites/plant-a/#") == 0
        sensor = client_for("sensor-1")
        for round_ in range(2):  # the second round asks again for keys a small L1 has evicted
            for i in range(15):
                sensor.publish(f"sites/plant-a/sensor-1/x{i}", b"denied")
                sensor.publish("sites/plant-a/sensor-1/telemetry", f"{round_}.{i}".encode())
        received = [dashboard.next_message() for _ in range(30)]
        assert [(m.topic, m.payload) for m in received] == [
            ("sites/plant-a/sensor-1/telemetry", f"{r}.{i}".encode()) for r in range(2) for i in range(15)]
        sensor.publish("sites/plant-a/sensor-1/sentinel", b"denied too")
        sensor.publish("sites/plant-a/sensor-1/telemetry", b"last")
        assert dashboard.next_message().payload == b"last"  # no x{i} or sentinel delivered in between
        l1 = broker.plugin.service.pdp.snapshot.l1
        assert broker.run(lambda: (l1.capacity, len(l1))) == (l1_size, min(l1_size, 19))  # 19 distinct keys: 1 subscribe, 17 publish, 1 receive
    finally:
        for client in clients:
            client.close()
    broker.stop()
    denied = [r for r in records_of(policy_dir.parent / "assertions.db", device="sensor-1", action="publish")
              if "/x" in (r.topic or "")]
    assert [(r.topic, r.decision) for r in denied] == [(f"sites/plant-a/sensor-1/x{i}", "deny") for i in range(15)] * 2
    assert [r.cache_tier for r in denied] == ["index"] * 15 + [second_round_tier] * 15


# -- SIGINT stops `mqtt-pdp broker` cleanly -------------------------------------------------------


def test_sigint_stops_the_broker_command_and_flushes_the_log(tmp_path, test_pki, policy_dir):
    config = write_cli_config(tmp_path / "sigint-node.yaml", test_pki, policy_dir)
    broker = BrokerProcess(config, tmp_path)
    clients = []
    try:
        for device in ("dash-1", "sensor-1"):
            client = Client(broker.port, device, test_pki.device(device), test_pki.ca_file)
            clients.append(client)
            assert client.connect() == 0
        dashboard, sensor = clients
        assert dashboard.subscribe("sites/plant-a/#") == 0
        sensor.publish("sites/plant-a/sensor-1/telemetry", b"t")
        assert dashboard.next_message().payload == b"t"
        broker.proc.send_signal(signal.SIGINT)  # clients still connected
        assert broker.proc.wait(30) == 0
        broker.wait_line("shutting down")
    finally:
        for client in clients:
            client.close()
        broker.stop()
    assert broker.proc.returncode == 0
    records = records_of(tmp_path / "assertions.db")
    assert [(r.action, r.device_id, r.topic, r.decision) for r in records] == [
        ("connect", "dash-1", None, "allow"),
        ("connect", "sensor-1", None, "allow"),
        ("subscribe", "dash-1", "sites/plant-a/#", "allow"),
        ("publish", "sensor-1", "sites/plant-a/sensor-1/telemetry", "allow"),
        ("receive", "dash-1", "sites/plant-a/sensor-1/telemetry", "allow"),
    ]
    assert all(r.node == "sigint-node" for r in records)


# -- retention in the broker ------------------------------------------------------------------


def write_aged_records(db: Path, state_dir: Path, node: str, ages_s: list[float]) -> None:
    """Records of another node with the given ages, through the real chain writer and SQLite sink."""
    from pdp.evidence.chain import ChainWriter
    from pdp.evidence.sinks import SqliteSink

    now = time.time()
    fields = ("old-1", "f" * 64, "1", "CN=test CA", "sensor", "plant-a", "test", "qa", "active")
    rows = [(now - age, 1, "old-1", None, "publish", f"t/{i}", True, "r", "allowed by rule r", "index", 1000, "rev")
            for i, age in enumerate(ages_s)]
    writer = ChainWriter(node, [SqliteSink(db)], state_dir)
    try:
        writer.write(rows, {1: fields})
    finally:
        writer.close()


DAY = 86400.0


def test_retention_days_prunes_old_records_when_the_broker_starts(make_broker, test_pki, policy_dir, tmp_path):
    """The plugin prunes at start and then hourly; the start is what a test can observe without waiting an hour."""
    db = policy_dir.parent / "assertions.db"
    write_aged_records(db, tmp_path / "old-state", "old-node", [10 * DAY, 5 * DAY, 3 * DAY, 3600, 60])
    broker = make_broker(retention_days=4)
    wait_for(lambda: [r.seq for r in records_of(db, node="old-node")] == [3, 4, 5], "records older than 4 days pruned")
    client = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert client.connect() == 0
    finally:
        client.close()
    node = broker.plugin.service.node_id
    broker.stop()
    store = AssertionStore(db, readonly=True)
    try:
        reports = {r.node: (r.checked, r.problem) for r in store.verify()}
    finally:
        store.close()
    assert reports == {"old-node": (3, None), node: (1, None)}  # the pruned chain still verifies from its checkpoint
