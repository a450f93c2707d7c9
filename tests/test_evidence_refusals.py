"""Refusals that happen before any MQTT session are evidence too: every failed TLS handshake is a ``tls``
record (peer, reason, and the certificate's fingerprint and subject when one was presented), and repeated
identical refusals become one record with a count."""

from __future__ import annotations

import re
from pathlib import Path

from pdp.evidence.ratelimit import RefusalLimiter
from pdp.evidence.store import AssertionStore, QueryFilters
from tests.support import Client, wait_for
from tests.test_strict_identity import refused_certificates, tls_attempt


def test_limiter_records_the_first_and_counts_the_rest_of_its_window() -> None:
    limiter = RefusalLimiter(window=10)
    assert limiter.admit("k", "first", 100.0)
    assert not limiter.admit("k", "second", 101.0) and not limiter.admit("k", "third", 105.0)
    assert limiter.admit("other", "x", 105.0)
    assert limiter.due(109.9) == []
    [repeats] = limiter.due(110.0)
    assert (repeats.payload, repeats.count, repeats.first, repeats.last) == ("first", 2, 101.0, 105.0)
    assert limiter.admit("k", "again", 111.0)  # a new window
    assert limiter.due(200.0, everything=True) == []  # nothing repeated: nothing more to record
    small = RefusalLimiter(window=10, max_keys=2)
    for key in "abc":
        small.admit(key, key, 0.0)
        small.admit(key, key, 1.0)
    assert sorted(r.payload for r in small.due(2.0)) == ["a", "b", "c"]  # too many kinds: closed early


def records(db: Path, action: str) -> list:
    if not db.exists():
        return []
    store = AssertionStore(db, readonly=True)
    try:
        return [r for _, r in store.query(QueryFilters(action=action))]
    except Exception:  # the writer has not created the table yet
        return []
    finally:
        store.close()


def test_every_tls_refusal_is_a_record_with_the_presented_certificate_and_repeats_are_counted(
        make_broker, test_pki, policy_dir, tmp_path: Path) -> None:
    broker = make_broker(connect_timeout=1.0, refusal_window=6.0)  # 3 s was too short on a loaded machine
    db = policy_dir.parent / "assertions.db"
    cases = {name: case for name, case in refused_certificates(tmp_path, test_pki).items()
             if name in ("expired", "wrong-key-usage", "foreign-ca", "none")}
    ports = {name: tls_attempt(broker.port, test_pki.ca_file, creds) for name, (creds, _) in cases.items()}
    wait_for(lambda: len(records(db, "tls")) == len(cases), "a record per refused handshake")
    by_peer = {r.peer: r for r in records(db, "tls")}
    for name, (creds, reason) in cases.items():
        record = by_peer[f"127.0.0.1:{ports[name]}"]
        assert (record.decision, record.client_id, record.device_id) == ("deny", None, None)
        assert record.reason.startswith("TLS handshake refused: ") and reason in record.reason, (name, record.reason)
        if creds is None:
            assert record.fingerprint is None and record.reason.endswith("no certificate presented")
        else:
            assert record.fingerprint == creds.fingerprint, name
            assert record.serial and record.issuer
            assert re.search(r"certificate subject .*CN=", record.reason), record.reason

    # The expired device retries: four more identical refusals within the window are one more record.
    expired = cases["expired"][0]
    for _ in range(4):
        tls_attempt(broker.port, test_pki.ca_file, expired)
    # A refused connect (retired device) retried three times: the same.
    retired = test_pki.device("retired-1")
    for _ in range(3):
        client = Client(broker.port, "retired-1", retired, test_pki.ca_file)
        assert client.connect() == 5
        client.client.loop_stop()

    def accounted(action: str, text: str) -> int:
        """Refusals a set of records stands for: 1 each, a repeats record its count."""
        total = 0
        for record in records(db, action):
            if text in record.reason:
                match = re.search(r"repeated (\d+) more time", record.reason)
                total += int(match.group(1)) if match else 1
        return total

    wait_for(lambda: accounted("tls", "certificate has expired") == 5 and accounted("connect", "retired") == 3,
             "the repeats recorded when their window ended")
    assert len([r for r in records(db, "tls") if "certificate has expired" in r.reason]) < 5
    assert len([r for r in records(db, "connect") if r.client_id == "retired-1"]) < 3
    assert broker.run(lambda: broker.broker.tls_refused) == len(cases) + 4


def test_malformed_filters_refused_before_the_policy_are_recorded(make_broker, test_pki, policy_dir) -> None:
    """paho will not send these, so a raw client does (amqtt refused them before asking the policy)."""
    from tests.rawmqtt import RawClient, subscribe_packet

    broker = make_broker()
    db = policy_dir.parent / "assertions.db"
    sensor = RawClient(broker.port, test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert sensor.connect("sensor-1") == 0
        sensor.send(subscribe_packet([("sites/#/x", 0), ("sites/pl+nt/x", 0), ("sites/plant-a/sensor-1/cmd", 0)],
                                     packet_id=5))
        assert sensor.read_packet() == b"\x90\x05\x00\x05\x80\x80\x00"  # refused, refused, granted
    finally:
        sensor.close()
    wait_for(lambda: len(records(db, "subscribe")) == 3, "three subscribe records")
    got = [(r.topic, r.decision, r.device_id, r.reason.split(":")[0]) for r in records(db, "subscribe")]
    assert got[:2] == [("sites/#/x", "deny", "sensor-1", "invalid filter"),
                       ("sites/pl+nt/x", "deny", "sensor-1", "invalid filter")]
    assert got[2][:2] == ("sites/plant-a/sensor-1/cmd", "allow")


def test_established_connections_leave_the_capturing_context(make_broker, test_pki) -> None:
    """The message callback that keeps presented certificates runs during handshakes only."""
    broker = make_broker()
    sensor = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert sensor.connect() == 0

        def contexts() -> tuple[object, object, bytes | None]:
            session, _ = broker.broker._sessions["sensor-1"]
            return (session.ssl_object.context, broker.broker._tls_contexts["default"],
                    session.ssl_object.getpeercert(binary_form=True))

        import hashlib
        import ssl

        callback = ssl._ssl._SSLContext._msg_callback.__get__  # the C-level one the capture sets
        established, capturing, peer = broker.run(contexts)
        assert established is not capturing and callback(capturing) is not None
        assert callback(established) is None
        assert peer is not None and hashlib.sha256(peer).hexdigest() == test_pki.device("sensor-1").fingerprint
    finally:
        sensor.close()
