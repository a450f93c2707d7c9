"""The lifecycle commands against a real broker: a suspension cuts a live session, a rotation window closes."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

import pytest

from pdp import pki
from pdp.cli.main import main
from pdp.evidence.store import AssertionStore, QueryFilters
from tests.support import TRUST_DOMAIN, Client, wait_for, write_cli_config


@pytest.fixture
def cli(policy_dir, test_pki):
    """The CLI as an operator runs it: with the broker's config (registry, database, trust domain)."""
    config = write_cli_config(policy_dir.parent / "cli.yaml", test_pki, policy_dir)
    return lambda *argv: main(["devices", *argv, "-c", str(config)])


def test_suspend_by_cli_cuts_the_live_session_and_is_recorded(broker, connect, policy_dir, cli, test_pki, capsys):
    sensor = connect("sensor-1")
    dash = connect("dash-1")
    attempts = broker.plugin.service.reload_attempts
    assert cli("suspend", "sensor-1", "--actor", "alice", "--reason", "INC-9") == 0
    assert sensor.wait_disconnected(), "the suspended device's session was not cut"
    broker.wait_reload(attempts)
    assert not dash.disconnected.is_set()  # other devices keep their sessions
    connect("sensor-1", expect=5)
    assert cli("activate", "sensor-1") == 0
    wait_for(lambda: broker.plugin.service.pdp.registered("sensor-1").status == "active", "reactivation applied")
    connect("sensor-1", client_id="sensor-1", expect=0)
    broker.stop()  # every record written

    db = str(policy_dir.parent / "assertions.db")
    store = AssertionStore(db, readonly=True)
    admin = [r for _, r in store.query(QueryFilters(device="sensor-1", action="admin"))]
    assert [json.loads(r.reason)["after"]["status"] for r in admin] == ["suspended", "active"]
    assert json.loads(admin[0].reason)["actor"] == "alice"
    cut = [r for _, r in store.query(QueryFilters(device="sensor-1", action="disconnect"))]
    assert [r.reason for r in cut] == ["device suspended"]
    assert all(r.problem is None for r in store.verify())  # broker and admin chains both intact
    store.close()
    capsys.readouterr()
    assert cli("show", "sensor-1", "--format", "json") == 0
    shown = json.loads(capsys.readouterr().out)
    seen = [c for c in shown["certificates"] if c["connects"]]
    assert [c["fingerprint"] for c in seen] == [test_pki.device("sensor-1").fingerprint]
    assert seen[0]["last_seen"] is not None and seen[0]["connects"] == 2
    assert {s["action"] for s in shown["sessions"]} == {"connect", "disconnect"}


def test_rotation_window_keeps_the_old_session_until_it_closes(broker, connect, policy_dir, cli, test_pki, caplog):
    caplog.set_level(logging.WARNING, logger="mqtt_pdp.service")
    old = connect("bound-1")
    successor = test_pki.save("bound-1-next", pki.issue_device(test_pki.ca, "bound-1", TRUST_DOMAIN))
    window_end = datetime.now(timezone.utc) + timedelta(seconds=4)
    attempts = broker.plugin.service.reload_attempts
    assert cli("bind-cert", "bound-1", str(successor.cert), "--old-until", window_end.isoformat()) == 0
    wait_for(lambda: successor.fingerprint in broker.plugin.service.pdp.registered("bound-1").fingerprints,
             "binding applied")
    broker.wait_reload(attempts)
    assert not old.disconnected.is_set(), "binding a successor cut the session of the certificate in use"
    assert old.wait_disconnected(15), "the old certificate's session outlived its window"
    assert any("client=bound-1 " in r.getMessage() and "reason=certificate binding window closed" in r.getMessage()
               for r in caplog.records)
    connect("bound-1", expect=5)  # the old certificate no longer admits the device
    connect("bound-1", creds=successor, expect=0)  # the new one does


def test_unbind_cuts_the_session_of_that_certificate(broker, connect, policy_dir, cli, test_pki):
    successor = test_pki.save("bound-1-other", pki.issue_device(test_pki.ca, "bound-1", TRUST_DOMAIN))
    assert cli("bind-cert", "bound-1", str(successor.cert)) == 0
    wait_for(lambda: successor.fingerprint in broker.plugin.service.pdp.registered("bound-1").fingerprints,
             "binding applied")
    old = connect("bound-1")
    assert cli("unbind-cert", "bound-1", test_pki.device("bound-1").fingerprint) == 0
    assert old.wait_disconnected(), "the unbound certificate's session was not cut"
    fresh = Client(broker.port, "bound-1", successor, test_pki.ca_file)
    try:
        assert fresh.connect() == 0
    finally:
        fresh.close()
