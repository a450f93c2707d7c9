"""The enforcement core without a broker: each amqtt hole and each change scenario as events in, actions out.

The authority is the real ``DecisionPoint`` over real files and real certificates;
only the broker and the sockets are absent, so each case runs in milliseconds.
Each hole also has its socket test in tests/test_bypasses.py.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pdp import pki
from pdp.core.admission import AdmissionSettings, ConnectRequest
from pdp.core.enforcement import (
    Admitted,
    ClockTick,
    ConnectionClosed,
    ConnectRequested,
    DeliveryDue,
    Disconnect,
    DropSession,
    DropSubscription,
    Enforcer,
    PublishReceived,
    Refused,
    SnapshotSwapped,
    SubscribeRequested,
    Unsubscribed,
    Verdict,
    WillDue,
)
from pdp.core.identity import IdentitySettings
from pdp.runtime.decision_point import DecisionPoint, PdpSettings
from tests.conftest import DEVICES, ROOT, TEST_POLICY, registry_yaml

TRUST = "test.example"
NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_ca("enforcement test CA")


@pytest.fixture(scope="module")
def certs(ca: pki.Issued) -> dict[str, bytes]:
    return {device_id: pki.issue_device(ca, device_id, TRUST).cert.public_bytes(Encoding.DER)
            for device_id, *_ in DEVICES}


class World:
    """A decision point over files in a directory, an enforcer over it, and a way to change the files."""

    def __init__(self, directory: Path, certs: dict[str, bytes]) -> None:
        self.dir = directory
        self.certs = certs
        shutil.copy(ROOT / "policies" / "model.conf", directory / "model.conf")
        (directory / "policy.csv").write_text(TEST_POLICY)
        (directory / "devices.yaml").write_text(registry_yaml(DEVICES))
        self.pdp = DecisionPoint(PdpSettings(
            str(directory / "model.conf"), str(directory / "policy.csv"), str(directory / "devices.yaml"),
            AdmissionSettings(identity=IdentitySettings(trust_domain=TRUST)),
        ))
        self.core = Enforcer(self.pdp)
        self._next = 0

    def connect(self, device: str, client_id: str | None = None, *, will: str | None = None,
                persistent: bool = False) -> tuple[int, list]:
        self._next += 1
        request = ConnectRequest(client_id or device, self.certs[device], tls=True, will_topic=will)
        return self._next, self.core.handle(ConnectRequested(self._next, request, NOW, persistent))

    def admitted(self, device: str, **kwargs) -> int:
        conn, actions = self.connect(device, **kwargs)
        assert [type(a) for a in actions] == [Admitted], actions
        return conn

    def verdict(self, event) -> Verdict:
        [verdict] = self.core.handle(event)
        assert isinstance(verdict, Verdict)
        return verdict

    def swap(self, policy: str | None = None, devices: list | None = None) -> list:
        """Change the files, load them, swap and re-judge in one step, as the service does."""
        if policy is not None:
            (self.dir / "policy.csv").write_text(policy)
        if devices is not None:
            (self.dir / "devices.yaml").write_text(registry_yaml(devices))
        loaded = self.pdp.load_if_changed()
        assert loaded not in (None, False), self.pdp.last_error
        self.pdp.swap(loaded)  # type: ignore[arg-type]
        return self.core.handle(SnapshotSwapped())


@pytest.fixture
def world(tmp_path: Path, certs: dict[str, bytes]) -> World:
    return World(tmp_path, certs)


def _with_status(device_id: str, status: str) -> list:
    return [(d, t, loc, status if d == device_id else s) for d, t, loc, s in DEVICES]


# -- the six amqtt holes ---------------------------------------------------------------------------


def test_hole_1_retained_message_is_a_receive(world: World) -> None:
    watcher = world.admitted("watcher-1")
    assert world.verdict(SubscribeRequested(watcher, "a/#")).allowed
    secret = world.verdict(DeliveryDue(watcher, "a/secret", "retained"))
    assert (secret.allowed, secret.decision.rule_id) == (False, "no-a-secret")
    assert world.verdict(DeliveryDue(watcher, "a/ok", "retained")).decision.rule_id == "watcher-recv"


def test_hole_2_will_is_checked_at_connect_and_when_published(world: World) -> None:
    _, refused = world.connect("sensor-1", will="sites/plant-a/sensor-2/status")
    assert [type(a) for a in refused] == [Refused]
    assert "will topic not permitted" in refused[0].admission.reason
    conn = world.admitted("sensor-1", will="sites/plant-a/sensor-1/status")
    assert world.verdict(WillDue(conn, "sites/plant-a/sensor-1/status")).allowed
    world.swap(policy=TEST_POLICY.replace("p, sensor-will,", "# p, sensor-will,"))
    late = world.verdict(WillDue(conn, "sites/plant-a/sensor-1/status"))
    assert (late.allowed, late.action, late.decision.reason) == (False, "publish", "no matching rule")


def test_a_will_is_never_relayed_for_a_gateway_child(world: World) -> None:
    """Found by an outside attack: a gateway's will on 'gw/<another gateway's child>/...' skipped every relay
    check and reached that child's gateway. root-1 may publish '#', so only the relay rule refuses it."""
    _, refused = world.connect("root-1", will="gw/legacy-2/sites/plant-a/legacy-2/cmd")
    assert [type(a) for a in refused] == [Refused]
    assert "a will cannot be relayed" in refused[0].admission.reason
    conn = world.admitted("root-1", will="sites/x")
    late = world.verdict(WillDue(conn, "gw/legacy-2/sites/plant-a/legacy-2/cmd"))
    assert (late.allowed, late.decision.reason) == (False, "a will cannot be relayed for a gateway's child")


def test_hole_3_another_device_can_neither_take_nor_kick_a_client_id(world: World) -> None:
    victim = world.admitted("sensor-1", persistent=True)
    for persistent in (False, True):
        _, actions = world.connect("sensor-2", client_id="sensor-1", persistent=persistent)
        assert [(type(a), a.admission.reason) for a in actions] == [(Refused, "client id mismatch")]
    assert world.core.connection_of("sensor-1") == victim
    assert world.core.revoked(victim) is None
    assert world.verdict(PublishReceived(victim, "sites/plant-a/sensor-1/telemetry")).allowed


def test_hole_4_retained_dollar_topics_are_not_reached_by_wildcards(world: World) -> None:
    root = world.admitted("root-1")
    assert world.verdict(DeliveryDue(root, "sys/x", "retained")).allowed
    assert not world.verdict(DeliveryDue(root, "$SYS/broker/version", "retained")).allowed
    sysmon = world.admitted("sysmon-1")
    assert world.verdict(DeliveryDue(sysmon, "$SYS/broker/version", "retained")).allowed


def test_hole_5_subscriptions_are_granted_on_containment(world: World) -> None:
    lab = world.admitted("lab-1")  # may subscribe a/+ only
    assert world.verdict(SubscribeRequested(lab, "a/x")).allowed
    assert world.verdict(SubscribeRequested(lab, "a/+")).allowed
    assert not world.verdict(SubscribeRequested(lab, "a/#")).allowed
    assert not world.verdict(SubscribeRequested(lab, "a/+/c")).allowed
    root = world.admitted("root-1")
    assert world.verdict(SubscribeRequested(root, "#")).allowed
    assert not world.verdict(SubscribeRequested(root, "$SYS/#")).allowed


def test_hole_6_a_verdict_needs_no_await_and_ignores_other_connections(world: World) -> None:
    """The broadcast takes its targets, then asks the core synchronously; another subscriber leaving
    between two verdicts changes nothing for the ones that stay."""
    first, second = world.admitted("root-1"), world.admitted("root-2")
    assert world.verdict(DeliveryDue(first, "race/t")).allowed
    world.core.handle(ConnectionClosed(first))
    assert world.verdict(DeliveryDue(second, "race/t")).allowed
    assert not world.verdict(DeliveryDue(first, "race/t")).allowed  # gone: nothing more for it


# -- changes -----------------------------------------------------------------------------------------


def test_second_connection_of_a_client_id_supersedes_the_first(world: World) -> None:
    old = world.admitted("sensor-1")
    new, actions = world.connect("sensor-1")
    assert actions == [Disconnect(old, "sensor-1", "superseded by a new connection of the same client id"),
                       Admitted(new, actions[1].admission, world.pdp.snapshot_revision)]
    stale = world.verdict(PublishReceived(old, "sites/plant-a/sensor-1/telemetry"))
    assert (stale.allowed, stale.decision.reason) == (False, "superseded by a new connection of the same client id")
    assert world.verdict(PublishReceived(new, "sites/plant-a/sensor-1/telemetry")).allowed
    world.core.handle(ConnectionClosed(old))  # the old socket closing later does not end the new one
    assert world.core.connection_of("sensor-1") == new


def test_swap_revokes_in_the_same_step_before_any_disconnect_is_carried_out(world: World) -> None:
    sensor, dash = world.admitted("sensor-1"), world.admitted("dash-1")
    actions = world.swap(devices=_with_status("sensor-1", "suspended"))
    assert actions == [Disconnect(sensor, "sensor-1", "device suspended")]
    # The shell has not closed anything yet: the connection is already denied, the others are not.
    denied = world.verdict(PublishReceived(sensor, "sites/plant-a/sensor-1/telemetry"))
    assert (denied.allowed, denied.decision.reason) == (False, "device suspended")
    assert world.verdict(DeliveryDue(dash, "sites/plant-a/sensor-9/telemetry")).allowed


def test_changed_attributes_revoke_the_connection(world: World) -> None:
    sensor = world.admitted("sensor-1")
    moved = [(d, t, "plant-b" if d == "sensor-1" else loc, s) for d, t, loc, s in DEVICES]
    assert world.swap(devices=moved) == [Disconnect(sensor, "sensor-1", "device attributes changed")]
    assert not world.verdict(PublishReceived(sensor, "sites/plant-b/sensor-1/telemetry")).allowed
    world.core.handle(ConnectionClosed(sensor))  # the shell carried out the Disconnect
    fresh = world.admitted("sensor-1")  # reconnecting gives the new attributes and their rights
    assert world.verdict(PublishReceived(fresh, "sites/plant-b/sensor-1/telemetry")).allowed
    assert not world.verdict(PublishReceived(fresh, "sites/plant-a/sensor-1/telemetry")).allowed


def test_policy_only_change_keeps_connections_and_judges_with_the_new_rules(world: World) -> None:
    dash = world.admitted("dash-1")
    assert world.verdict(DeliveryDue(dash, "sites/plant-a/x")).allowed
    assert world.swap(policy=TEST_POLICY.replace("p, dash-recv,", "# p, dash-recv,")) == []
    assert not world.verdict(DeliveryDue(dash, "sites/plant-a/x")).allowed


def test_offline_persistent_session_is_judged_then_dropped_when_its_device_is_suspended(world: World) -> None:
    sensor = world.admitted("sensor-1", persistent=True)
    world.core.handle(ConnectionClosed(sensor))
    assert world.core.offline_sessions() == ("sensor-1",)
    assert world.verdict(DeliveryDue(sensor, "sites/plant-a/sensor-1/cmd", "queued")).allowed  # queued for it
    assert world.swap(devices=_with_status("sensor-1", "suspended")) == [DropSession("sensor-1", "device suspended")]
    assert world.core.offline_sessions() == ()
    assert not world.verdict(DeliveryDue(sensor, "sites/plant-a/sensor-1/cmd", "queued")).allowed


def test_clean_session_end_leaves_nothing_behind(world: World) -> None:
    sensor = world.admitted("sensor-1")
    world.core.handle(ConnectionClosed(sensor))
    assert (world.core.offline_sessions(), world.core.connections()) == ((), ())


def test_certificate_expiry_disconnects_at_not_after(world: World) -> None:
    sensor = world.admitted("sensor-1")
    not_after = world.core.admission_of(sensor).identity.certificate.not_after  # type: ignore[union-attr]
    assert world.core.handle(ClockTick(not_after - timedelta(seconds=1))) == []
    assert world.core.handle(ClockTick(not_after)) == [Disconnect(sensor, "sensor-1", "certificate expired")]
    assert not world.verdict(PublishReceived(sensor, "sites/plant-a/sensor-1/telemetry")).allowed
    assert world.core.handle(ClockTick(not_after + timedelta(days=1))) == []  # once


def test_unknown_connection_gets_nothing(world: World) -> None:
    verdict = world.verdict(SubscribeRequested(999, "#"))
    assert (verdict.allowed, verdict.decision.reason, verdict.tier) == (False, "connection not admitted", "session")


def test_refused_connect_registers_nothing(world: World) -> None:
    conn, actions = world.connect("suspended-1")
    assert [(type(a), a.admission.reason) for a in actions] == [(Refused, "device suspended")]
    assert world.core.connections() == ()
    assert not world.verdict(PublishReceived(conn, "sites/plant-a/suspended-1/telemetry")).allowed



def test_retained_message_is_served_only_while_its_publisher_may_publish_it(world: World) -> None:
    watcher, root = world.admitted("watcher-1"), world.admitted("root-1")
    publisher = world.core.admission_of(root)
    retained = DeliveryDue(watcher, "a/cmd", "retained", publisher=publisher)
    assert world.verdict(retained).decision.rule_id == "watcher-recv"
    assert world.verdict(DeliveryDue(watcher, "a/cmd", "retained")).allowed  # the broker's own: no publisher
    world.swap(policy=TEST_POLICY.replace("p, root-pub,", "# p, root-pub,"))
    lost = world.verdict(retained)
    assert (lost.allowed, lost.tier, lost.decision.reason) == (
        False, "publisher", "retained message of 'root-1', which may no longer publish it (no matching rule)")
    world.swap(policy=TEST_POLICY, devices=_with_status("root-1", "suspended"))
    assert world.verdict(retained).decision.reason == "retained message of 'root-1', which is suspended"
    world.swap(devices=[d for d in DEVICES if d[0] != "root-1"])
    assert world.verdict(retained).decision.reason == "retained message of 'root-1', which is unknown"


def test_retained_message_goes_with_its_publishing_certificate(world: World, ca: pki.Issued) -> None:
    """A CRL entry or an unbinding is how a compromised key is answered: its retained messages stop too."""
    watcher, root = world.admitted("watcher-1"), world.admitted("root-1")
    retained = DeliveryDue(watcher, "a/cmd", "retained", publisher=world.core.admission_of(root))
    assert world.verdict(retained).allowed
    bound = [(d, t, loc, s) for d, t, loc, s in DEVICES]
    registry = registry_yaml(bound, {"root-1": "sha256:" + "ab" * 32})
    (world.dir / "devices.yaml").write_text(registry)
    world.pdp.swap(world.pdp.load_if_changed())  # type: ignore[arg-type]
    world.core.handle(SnapshotSwapped())
    assert world.verdict(retained).decision.reason == (
        "retained message of 'root-1', published with a certificate no longer good (certificate not bound to device)")


def test_swap_drops_subscriptions_the_new_policy_no_longer_grants(world: World) -> None:
    watcher, lab = world.admitted("watcher-1"), world.admitted("lab-1", persistent=True)
    assert world.verdict(SubscribeRequested(watcher, "a/#")).allowed
    assert world.verdict(SubscribeRequested(watcher, "a/x")).allowed
    assert not world.verdict(SubscribeRequested(watcher, "b/#")).allowed  # refused: never held
    assert world.verdict(SubscribeRequested(lab, "a/+")).allowed
    world.core.handle(Unsubscribed(watcher, "a/x"))
    world.core.handle(ConnectionClosed(lab))  # offline persistent session: its filters are judged too
    narrower = TEST_POLICY.replace("p, watcher-sub, watcher, *, *, a/#,", "p, watcher-sub, watcher, *, *, a/+,")
    narrower = narrower.replace("p, lab-sub,", "# p, lab-sub,")
    assert world.swap(policy=narrower) == [
        DropSubscription(watcher, "watcher-1", "a/#", "no longer granted (no matching rule)"),
        DropSubscription(lab, "lab-1", "a/+", "no longer granted (no matching rule)"),
    ]
    assert world.swap(policy=TEST_POLICY) == []  # what was dropped stays dropped


def test_dollar_topics_are_never_published_whatever_the_policy_grants(world: World) -> None:
    world.swap(policy=TEST_POLICY + "p, sys-pub, sysmon, *, *, $SYS/#, publish, allow\n")
    sysmon = world.admitted("sysmon-1")
    for event in (PublishReceived(sysmon, "$SYS/broker/x"), WillDue(sysmon, "$SYS/broker/x")):
        verdict = world.verdict(event)
        assert (verdict.allowed, verdict.tier) == (False, "session")
        assert verdict.decision.reason == "topics starting with '$' are reserved for the broker [MQTT-4.7.2-1]"
    # Control: the rule itself grants it, so only the core's reservation refuses it.
    assert world.pdp.lookup(world.pdp.registered("sysmon-1"), "publish", "$SYS/broker/x")[0].allowed
