"""Gateway identity translation: a gateway publishes for its legacy children within both sets of rights."""

from __future__ import annotations

import pytest

from pdp.cli.main import main
from pdp.core import gateway
from pdp.core.engine import Decision
from pdp.evidence.store import AssertionStore, QueryFilters
from pdp.registry.device import Device
from tests.support import wait_for, write_cli_config

GW = Device("gw-1", "gateway", "plant-a", "relay", "ops", "active")


def _decide(device: Device, action: str, topic: str) -> Decision:
    allowed = topic == f"sites/{device.location}/{device.device_id}/telemetry"
    return Decision(allowed, "child-rule" if allowed else None, "matched" if allowed else "no rule")


@pytest.mark.parametrize(("child", "inner", "allowed", "reason"), [
    (Device("leg-1", "sensor", "plant-a", "t", "o", "active", gateway="gw-1"), "sites/plant-a/leg-1/telemetry",
     True, "for child leg-1"),
    (Device("leg-1", "sensor", "plant-a", "t", "o", "active", gateway="gw-1"), "sites/plant-a/other/telemetry",
     False, "no rule"),
    (Device("leg-1", "sensor", "plant-a", "t", "o", "active", gateway="gw-9"), "sites/plant-a/leg-1/telemetry",
     False, "gw-1 is not the gateway of leg-1"),
    (Device("leg-1", "sensor", "plant-a", "t", "o", "suspended", gateway="gw-1"), "sites/plant-a/leg-1/telemetry",
     False, "child device leg-1 suspended"),
    (None, "sites/plant-a/leg-1/telemetry", False, "unknown child device"),
])
def test_child_decision(child, inner, allowed, reason) -> None:
    decision = gateway.child_decision(GW, "leg-1", child, inner, _decide)
    assert decision.allowed is allowed and reason in decision.reason


def test_split() -> None:
    assert gateway.split("gw/leg-1/sites/a/b") == ("leg-1", "sites/a/b")
    assert gateway.split("gw/leg-1") is None and gateway.split("gw//x") is None and gateway.split("x/gw/a/b") is None


RULES = """p, gw-relay, gateway, *, *, gw/+/sites/{location}/#, publish, allow
p, gw-relay-sub, gateway, *, *, gw/+/sites/{location}/#, subscribe, allow
p, gw-relay-recv, gateway, *, *, gw/+/sites/{location}/#, receive, allow
p, gw-status, gateway, *, *, gw-status/{device_id}, publish, allow
"""


def test_gateway_relays_within_the_childs_and_its_own_rights(make_broker, connect_to, policy_dir, test_pki, tmp_path):
    (policy_dir / "policy.csv").write_text((policy_dir / "policy.csv").read_text() + RULES)
    config = write_cli_config(tmp_path / "cli.yaml", test_pki, policy_dir)

    def cli(*argv: str) -> int:
        return main(["devices", *argv, "-c", str(config)])

    assert cli("register", "gw-1", "--type", "gateway", "--location", "plant-a", "--purpose", "relay",
               "--owner", "ops", "--active") == 0
    for child, location in (("legacy-1", "plant-a"), ("legacy-2", "plant-b"), ("legacy-3", "plant-a")):
        assert cli("register", child, "--type", "sensor", "--location", location, "--purpose", "telemetry",
                   "--owner", "ops", "--active", "--gateway", "gw-1") == 0
    broker = make_broker()
    watcher = connect_to(broker, "root-1")
    assert watcher.subscribe("#") == 0
    gw = connect_to(broker, "gw-1")
    dash = connect_to(broker, "dash-1")
    assert gw.subscribe("gw/legacy-1/sites/plant-a/legacy-1/cmd") == 0  # the child's commands, for the gateway
    assert gw.subscribe("gw/legacy-3/sites/plant-a/legacy-3/cmd") == 0
    assert gw.subscribe("gw/legacy-1/sites/plant-a/#") == 0x80  # beyond the child's rights
    assert gw.subscribe("gw/legacy-2/sites/plant-b/legacy-2/cmd") == 0x80  # beyond the gateway's (plant-a only)
    dash.publish("sites/plant-a/legacy-1/cmd", b"open", qos=1)
    message = gw.next_message()
    assert (message.topic, message.payload) == ("gw/legacy-1/sites/plant-a/legacy-1/cmd", b"open")
    gw.publish("gw/legacy-1/sites/plant-a/legacy-1/telemetry", b"relayed", qos=1)
    gw.publish("gw/legacy-1/sites/plant-a/sensor-1/telemetry", b"beyond the child", qos=1)
    gw.publish("gw/sensor-1/sites/plant-a/sensor-1/telemetry", b"not its child", qos=1)
    gw.publish("gw/legacy-2/sites/plant-b/legacy-2/telemetry", b"beyond the gateway", qos=1)
    gw.publish("gw-status/gw-1", b"marker 1", qos=1)
    assert [(m.topic, m.payload) for m in watcher.messages_until("gw-status/gw-1") if not m.topic.endswith("/cmd")] == [
        ("sites/plant-a/legacy-1/telemetry", b"relayed"), ("gw-status/gw-1", b"marker 1")]

    assert cli("suspend", "legacy-1") == 0  # the child: the gateway may no longer speak for it
    wait_for(lambda: broker.plugin.service.pdp.registered("legacy-1").status == "suspended", "suspension applied")
    gw.publish("gw/legacy-1/sites/plant-a/legacy-1/telemetry", b"child suspended", qos=1)
    gw.publish("gw-status/gw-1", b"marker 2", qos=1)
    assert [m.payload for m in watcher.messages_until("gw-status/gw-1")] == [b"marker 2"]
    dash.publish("sites/plant-a/legacy-1/cmd", b"to a suspended child", qos=1)
    dash.publish("sites/plant-a/legacy-3/cmd", b"to an active child", qos=1)
    assert [(m.topic, m.payload) for m in gw.messages_until("gw/legacy-3/sites/plant-a/legacy-3/cmd")] == [
        ("gw/legacy-3/sites/plant-a/legacy-3/cmd", b"to an active child")]
    assert not gw.disconnected.is_set()  # the gateway itself stays

    assert cli("suspend", "gw-1") == 0  # the gateway: all of it stops
    assert gw.wait_disconnected()
    broker.stop()
    store = AssertionStore(str(policy_dir.parent / "assertions.db"), readonly=True)
    relayed = [r for _, r in store.query(QueryFilters(device="gw-1", action="publish"))
               if r.topic and r.topic.startswith("gw/legacy-1/")]
    store.close()
    assert [(r.decision, r.client_id) for r in relayed] == [("allow", "gw-1"), ("deny", "gw-1"), ("deny", "gw-1")]
    assert "for child legacy-1 (sites/plant-a/legacy-1/telemetry)" in relayed[0].reason  # both identities
    assert "child device legacy-1 suspended" in relayed[2].reason
