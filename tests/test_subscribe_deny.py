"""A subscribe deny refuses every filter that overlaps it, not only the filters it covers.

The issue: with ``allow subscribe a/#`` and ``deny subscribe a/secret/#``, subscribing
``a/#`` was granted and ``a/secret/x`` delivered. Checked through the linear engine, the
compiled index and Casbin, then end to end through a real broker and a paho client.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pdp.core.engine import decide, decision_for
from pdp.core.index import PolicyIndex
from pdp.policy.load import load_policy
from pdp.registry.device import Device
from tests.support import BrokerThread, Client
from tests.test_engine_vs_casbin import ROOT

ISSUE_POLICY = """\
p, watch-a, *, *, *, a/#, subscribe, allow
p, no-secret-sub, *, *, *, a/secret/#, subscribe, deny
p, no-own-vault, *, *, *, {location}/vault/#, subscribe, deny
p, watch-all, *, *, *, #, subscribe, allow
"""
DEVICE = Device("w-1", "watcher", "plant-a", "test", "qa", "active")


@pytest.mark.parametrize(
    ("topic_filter", "allowed", "rule_id"),
    [
        ("a/#", False, "no-secret-sub"),  # the issue: wider than the deny, overlapping it
        ("+/secret", False, "no-secret-sub"),
        ("+/+/x", False, "no-secret-sub"),
        ("#", False, "no-secret-sub"),  # the first applicable deny in file order decides
        ("a/secret", False, "no-secret-sub"),  # '#' also selects the parent
        ("a/secret/x", False, "no-secret-sub"),  # covered, as before
        ("a/public/#", True, "watch-a"),
        ("a/+", False, "no-secret-sub"),  # 'a/secret' is one of its topics
        ("a", True, "watch-a"),
        ("plant-a/#", False, "no-own-vault"),  # a placeholder is bound before overlap is decided
        ("+/vault", False, "no-own-vault"),
        ("plant-b/#", True, "watch-all"),
        ("$SYS/#", False, None),  # no rule reaches '$' topics from a wildcard
    ],
)
def test_issue_example_through_engine_index_and_casbin(tmp_path: Path, topic_filter: str, allowed: bool,
                                                       rule_id: str | None) -> None:
    (tmp_path / "policy.csv").write_text(ISSUE_POLICY)
    policy = load_policy(ROOT / "policies" / "model.conf", tmp_path / "policy.csv")
    expected = decision_for(allowed, rule_id)
    assert decide(policy.rules, DEVICE.attrs, "subscribe", topic_filter) == expected
    assert PolicyIndex(policy.rules).decide(DEVICE.attrs, "subscribe", topic_filter) == expected
    assert policy.reference.decide(DEVICE, "subscribe", topic_filter) == expected


def test_publish_and_receive_still_match_topic_names(tmp_path: Path) -> None:
    """Overlap is for subscribe denies only: a receive deny still decides per delivered topic."""
    (tmp_path / "policy.csv").write_text("p, recv-a, *, *, *, a/#, receive, allow\n"
                                         "p, no-secret-recv, *, *, *, a/secret/#, receive, deny\n")
    policy = load_policy(ROOT / "policies" / "model.conf", tmp_path / "policy.csv")
    index = PolicyIndex(policy.rules)
    for topic, expected in [("a/public/x", decision_for(True, "recv-a")),
                            ("a/secret/x", decision_for(False, "no-secret-recv"))]:
        assert decide(policy.rules, DEVICE.attrs, "receive", topic) == expected
        assert index.decide(DEVICE.attrs, "receive", topic) == expected
        assert policy.reference.decide(DEVICE, "receive", topic) == expected


@pytest.fixture
def policy_dir(policy_dir: Path) -> Path:
    """The integration policy plus a subscribe deny below the watcher's 'a/#' grant."""
    with (policy_dir / "policy.csv").open("a") as rules:
        rules.write("p, no-a-secret-sub, *, *, *, a/secret/#, subscribe, deny\n")
    return policy_dir


def test_wider_filter_refused_and_narrower_one_delivered(broker: BrokerThread, connect: Callable[..., Client]) -> None:
    watcher = connect("watcher-1")  # may subscribe to 'a/#' and receive 'a/#'
    assert watcher.subscribe("a/#") == 0x80
    assert watcher.subscribe("+/secret") == 0x80
    assert watcher.subscribe("a/public/#") == 0  # the connection stays open; the narrower filter is granted
    publisher = connect("lab-1")
    publisher.publish("a/secret/x", b"never", qos=1)
    publisher.publish("a/public/x", b"hello", qos=1)
    received = watcher.messages_until("a/public/x")
    assert [(m.topic, m.payload) for m in received] == [("a/public/x", b"hello")]
