"""Who gets in: only a verified certificate of an active, registered device, with its own client id."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pdp import pki
from tests.support import TRUST_DOMAIN, Client, broker_config


def assert_exchange(connect, client, device: str = "sensor-1") -> None:
    """Positive control: an admitted sensor of plant-a subscribes to its command topic and gets a command through."""
    assert client.subscribe(f"sites/plant-a/{device}/cmd") == 0
    dashboard = connect("dash-1")
    dashboard.publish(f"sites/plant-a/{device}/cmd", b"control")
    message = client.next_message()
    assert (message.topic, message.payload) == (f"sites/plant-a/{device}/cmd", b"control")


def test_no_certificate_refused_at_tls_handshake(broker, connect):
    client = connect("sensor-1", creds=None, expect=None)  # expect=None: no CONNACK at all
    assert client.connack.empty()
    assert broker.run(lambda: "sensor-1" not in broker.broker._sessions)
    assert_exchange(connect, connect("sensor-1"))  # the same client set-up with a certificate gets in


def test_no_certificate_refused_at_connect_when_handshake_allows_it(make_broker, test_pki, refused_reason):
    broker = make_broker(require_client_certificate=False)
    client = Client(broker.port, "sensor-1", None, test_pki.ca_file)
    try:
        assert client.connect() == 5
    finally:
        client.close()
    assert refused_reason("sensor-1") == "no client certificate"
    control = Client(broker.port, "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert control.connect() == 0
        assert control.subscribe("sites/plant-a/sensor-1/cmd") == 0
    finally:
        control.close()


def test_expired_and_not_yet_valid_certificates_refused(connect, test_pki):
    now = datetime.now(timezone.utc)
    expired = test_pki.save("expired", pki.issue_device(
        test_pki.ca, "sensor-1", TRUST_DOMAIN, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)))
    future = test_pki.save("future", pki.issue_device(
        test_pki.ca, "sensor-1", TRUST_DOMAIN, not_before=now + timedelta(days=1), not_after=now + timedelta(days=10)))
    connect("sensor-1", creds=expired, expect=None)
    connect("sensor-1", creds=future, expect=None)
    valid = test_pki.save("valid-now", pki.issue_device(
        test_pki.ca, "sensor-1", TRUST_DOMAIN, not_before=now - timedelta(days=1), not_after=now + timedelta(days=10)))
    assert_exchange(connect, connect("sensor-1", creds=valid, expect=0))  # same issuance, valid now


def test_certificate_from_another_ca_refused(connect, test_pki, tmp_path):
    rogue_ca = pki.make_ca("rogue CA")
    rogue = pki.issue_device(rogue_ca, "sensor-1", TRUST_DOMAIN)
    from tests.support import Credentials

    creds = Credentials(tmp_path / "rogue.pem", tmp_path / "rogue-key.pem", pki.fingerprint(rogue))
    rogue.write(creds.cert, creds.key)
    connect("sensor-1", creds=creds, expect=None)
    # Control: the same writing and loading of a certificate, issued by the broker's CA, is admitted.
    good = pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN)
    good_creds = Credentials(tmp_path / "good.pem", tmp_path / "good-key.pem", pki.fingerprint(good))
    good.write(good_creds.cert, good_creds.key)
    assert_exchange(connect, connect("sensor-1", creds=good_creds, expect=0))


def test_foreign_trust_domain_refused(connect, test_pki, refused_reason):
    creds = test_pki.save("foreign", pki.issue_device(test_pki.ca, "sensor-1", "other.example"))
    connect("sensor-1", creds=creds, expect=5)
    assert refused_reason("sensor-1") == "foreign trust domain other.example"
    own = test_pki.save("own-domain", pki.issue_device(test_pki.ca, "sensor-1", TRUST_DOMAIN))
    assert_exchange(connect, connect("sensor-1", creds=own, expect=0))


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("nobody-1", "unknown device"),
        ("suspended-1", "device suspended"),
        ("retired-1", "device retired"),
        ("provisioned-1", "device provisioned"),
    ],
)
def test_unregistered_or_inactive_devices_refused(connect, refused_reason, device, reason):
    connect(device, expect=5)
    assert refused_reason(device) == reason
    assert_exchange(connect, connect("sensor-1"))  # an active device with a certificate issued the same way


def test_client_id_must_be_the_device_id(connect, refused_reason):
    connect("sensor-1", client_id="sensor-2", expect=5)
    assert refused_reason("sensor-2") == "client id mismatch"
    connect("sensor-1", client_id="sensor-1-extra", expect=5)
    connect("sensor-1", client_id="", expect=5)
    assert_exchange(connect, connect("sensor-1", client_id="sensor-1"))


def test_client_id_prefix_pattern(make_broker, test_pki):
    broker = make_broker(client_id="{device_id}-*")
    results = {}
    for client_id in ("sensor-1-a", "sensor-1-", "sensor-1", "sensor-10", "xsensor-1-a"):
        client = Client(broker.port, client_id, test_pki.device("sensor-1"), test_pki.ca_file)
        results[client_id] = client.connect()
        client.close()
    assert results == {"sensor-1-a": 0, "sensor-1-": 0, "sensor-1": 5, "sensor-10": 5, "xsensor-1-a": 5}


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        (f"spiffe://{TRUST_DOMAIN}/device/sensor+1", "contains '+'"),
        (f"spiffe://{TRUST_DOMAIN}/device/sensor#1", "contains '#'"),
        (f"spiffe://{TRUST_DOMAIN}/device/$sensor", "starts with '$'"),
        (f"spiffe://{TRUST_DOMAIN}/device/plant-a/sensor-1", "contains '/'"),
        (f"spiffe://{TRUST_DOMAIN}/device/", "is empty"),
        (f"spiffe://{TRUST_DOMAIN}/device/" + "x" * 200, "is longer than 128 characters"),
    ],
)
def test_injection_device_ids_refused(connect, test_pki, refused_reason, uri, why):
    device_id = uri.split("/device/", 1)[1]
    creds = test_pki.save(f"inject-{abs(hash(uri))}", pki.issue_device(test_pki.ca, "x", uris=[uri], common_name="x"))
    client_id = device_id or "empty"
    connect("x", client_id=client_id, creds=creds, expect=5)
    assert refused_reason(client_id).endswith(why)
    # Control: the same issuance with a safe device id is admitted.
    good = test_pki.save("inject-control", pki.issue_device(
        test_pki.ca, "x", uris=[f"spiffe://{TRUST_DOMAIN}/device/sensor-1"], common_name="x"))
    assert_exchange(connect, connect("x", client_id="sensor-1", creds=good, expect=0))


def test_several_identities_in_one_certificate_refused(connect, test_pki, refused_reason):
    uris = [pki.spiffe_id(TRUST_DOMAIN, "sensor-1"), pki.spiffe_id(TRUST_DOMAIN, "root-1")]
    creds = test_pki.save("double", pki.issue_device(test_pki.ca, "sensor-1", uris=uris))
    connect("sensor-1", creds=creds, expect=5)
    assert refused_reason("sensor-1") == "several device identities in certificate"
    single = test_pki.save("single", pki.issue_device(test_pki.ca, "sensor-1", uris=uris[:1]))
    assert_exchange(connect, connect("sensor-1", creds=single, expect=0))


def test_certificate_not_bound_to_device_refused(connect, test_pki, refused_reason):
    assert_exchange(connect, connect("bound-1", expect=0), "bound-1")  # the certificate the registry binds
    other = test_pki.save("bound-1-other", pki.issue_device(test_pki.ca, "bound-1", TRUST_DOMAIN))
    connect("bound-1", creds=other, expect=5)
    assert refused_reason("bound-1") == "certificate not bound to device"


def test_common_name_identity_source(make_broker, test_pki):
    broker = make_broker(identity_source="cn")
    creds = test_pki.save("cn-only", pki.issue_device(test_pki.ca, "x", uris=[], common_name="sensor-1"))
    client = Client(broker.port, "sensor-1", creds, test_pki.ca_file)
    try:
        assert client.connect() == 0
        assert client.subscribe("sites/plant-a/sensor-1/cmd") == 0
    finally:
        client.close()


def plain_tcp_config(test_pki, policy_dir, **plugin):
    """amqtt copies the 'default' listener's settings into the others, so plain TCP must be the default."""
    config = broker_config(test_pki, policy_dir, **plugin)
    config["listeners"]["tls"] = config["listeners"]["default"]
    config["listeners"]["default"] = {"type": "tcp", "bind": "127.0.0.1:0", "ssl": False}
    config["listeners"]["plain"] = config["listeners"]["default"]
    return config


def test_plain_tcp_listener_gets_no_access_unless_opted_in(make_broker, test_pki, policy_dir, refused_reason):
    config = plain_tcp_config(test_pki, policy_dir)
    broker = make_broker(config=config)
    client = Client(broker.ports["plain"], "sensor-1", None, None, tls=False)
    try:
        assert client.connect() == 5
    finally:
        client.close()
    assert refused_reason("sensor-1") == "plain TCP not allowed"
    # Control: the same broker's TLS listener admits the device.
    control = Client(broker.ports["tls"], "sensor-1", test_pki.device("sensor-1"), test_pki.ca_file)
    try:
        assert control.connect() == 0
        assert control.subscribe("sites/plant-a/sensor-1/cmd") == 0
    finally:
        control.close()


def test_plain_tcp_opt_in_still_uses_the_registry(make_broker, test_pki, policy_dir):
    config = plain_tcp_config(test_pki, policy_dir, allow_plain_tcp=True)
    broker = make_broker(config=config)
    results = {}
    for client_id in ("sensor-1", "retired-1", "nobody", "a+b"):
        client = Client(broker.ports["plain"], client_id, None, None, tls=False)
        results[client_id] = client.connect()
        client.close()
    assert results == {"sensor-1": 0, "retired-1": 5, "nobody": 5, "a+b": 5}
