"""The Casbin oracle is independent of our topic code and catches it when it is wrong.

``pdp.policy.oracle.topic_match`` is checked against hand-written MQTT 3.1.1 cases; then
``pdp.core`` is broken on purpose (the subscribe-widening hole ``a/+`` granting ``a/#``,
``#`` reaching ``$SYS``, a subscribe deny of ``a/secret/#`` letting ``a/#`` through) and
the differentials must report it. The decision point's
verification must see every decision it hands out: L1 hits, warmed entries, invalid-topic denials.
"""

from __future__ import annotations

import ast
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

import pdp.core.engine as engine_module
import pdp.core.index as index_module
import pdp.runtime.decision_point as decision_point_module
from pdp.core.admission import AdmissionSettings
from pdp.core.engine import decision_for
from pdp.core.topics import TopicError, level_value_problem
from pdp.policy import oracle
from pdp.policy.oracle import topic_match, valid_filter, valid_topic_name
from pdp.runtime.decision_point import DecisionPoint, PdpSettings
from tests.test_engine_vs_casbin import ROOT, Stats, casbin_builder, differential, engine_candidate
from tests.test_index import index_candidate
from tests.test_topics import _universe, common_topics, filters, topic_names

ATTRS = {"device_id": "s-1", "type": "sensor", "location": "plant-a", "purpose": "telemetry", "owner": "ops"}


def test_oracle_shares_no_code_with_the_topic_implementation() -> None:
    tree = ast.parse(Path(oracle.__file__).read_text())
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if (node.module or "").startswith("pdp.")}
    imported |= {(alias.name, None) for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names if alias.name.startswith("pdp.")}
    assert {name for module, name in imported if module.startswith("pdp.core")} == {"Decision", "decision_for"}
    assert not any(module.startswith("pdp.core.") and module != "pdp.core.engine" for module, _ in imported)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # MQTT 3.1.1, 4.7.1.2: '#' matches the parent and any number of child levels.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("sport/#", "sports", False),
        ("#", "sport/tennis", True),
        ("#", "/", True),
        # 4.7.1.3: '+' is exactly one level, possibly empty.
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("a/+/b", "a//b", True),
        ("a//b", "a//b", True),
        ("a//b", "a/b", False),
        # 4.7.2: a leading wildcard never matches a '$' topic; elsewhere '$' is an ordinary character.
        ("#", "$SYS/broker", False),
        ("+", "$", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("x/+", "x/$SYS", True),
        ("x/#", "x/$SYS/y", True),
        # Regex metacharacters in literal levels are literal.
        ("a.b/c*", "aXb/c*", False),
        ("a.b/c*", "a.b/c*", True),
        # Placeholders, whole and inside a level, bound to the device's own values.
        ("sites/{location}/{device_id}/telemetry", "sites/plant-a/s-1/telemetry", True),
        ("sites/{location}/{device_id}/telemetry", "sites/plant-b/s-1/telemetry", False),
        ("dev-{device_id}/#", "dev-s-1/x", True),
        ("dev-{device_id}/#", "dev-s-2/x", False),
        ("{type}-{purpose}", "sensor-telemetry", True),
        ("{owner}/+", "ops/x", True),
        ("{owner}/+", "{owner}/x", False),
        # Invalid topic names are refused whatever the pattern.
        ("#", "a/+", False),
        ("#", "a/#", False),
        ("#", "", False),
        ("#", "a\x00", False),
        ("#", "x" * 65536, False),
        ("#", "x" * 65535, True),
        ("#", "é" * 32767 + "x", True),
        ("#", "é" * 32768, False),
    ],
)
def test_oracle_topic_names(pattern: str, topic: str, expected: bool) -> None:
    for action in ("publish", "receive"):
        assert topic_match(action, topic, pattern, ATTRS) is expected


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        ("a/+", "a/#", False),
        ("a/#", "a/+/c", True),
        ("a/#", "a", True),
        ("a/#", "a/#", True),
        ("a/#", "a//#", True),
        ("a", "a/#", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),
        ("a/+", "a/+", True),
        ("a/+", "a/b", True),
        ("a/b", "a/+", False),
        ("a/+/#", "a/#", False),
        ("a/+/#", "a/+", True),
        ("a/+", "a/+/#", False),
        ("#", "+/x", True),
        ("#", "+", True),
        ("#", "#", True),
        ("+/#", "a/#", True),
        ("+/#", "+", True),
        # A filter of just '#' selects every non-'$' topic of one level or more: exactly '+/#'.
        ("+/#", "#", True),
        ("+", "#", False),
        ("+/+/#", "#", False),
        ("+/+", "+/#", False),
        # '/#' selects the single empty level by the parent rule; coverage counts it, refusing the grant.
        ("+/+/#", "/#", False),
        ("/+/#", "/#", False),
        ("+/#", "/#", True),
        # '$' topics: only a pattern starting with the same literal reaches them.
        ("#", "$SYS/#", False),
        ("#", "$SYS", False),
        ("+/#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/+", "$SYS/x", True),
        ("$SYS/#", "#", False),
        ("$SYS/#", "+/x", False),
        # Placeholders bind before containment is decided.
        ("sites/{location}/#", "sites/plant-a/+/cmd", True),
        ("sites/{location}/#", "sites/+/cmd", False),
        ("dev-{device_id}/+", "dev-s-1/+", True),
        ("dev-{device_id}/+", "+/+", False),
        # Invalid filters are refused whatever the pattern.
        ("#", "a/#/b", False),
        ("#", "a#", False),
        ("#", "a/b+", False),
        ("#", "", False),
        ("#", "a\x00/#", False),
        ("#", "a/" + "b" * 65534, False),
    ],
)
def test_oracle_covers(pattern: str, topic_filter: str, expected: bool) -> None:
    assert topic_match("subscribe", topic_filter, pattern, ATTRS) is expected


@settings(max_examples=600, deadline=None)
@given(filters(), topic_names)
def test_oracle_matching_agrees_with_paho(pattern: str, topic: str) -> None:
    assume(pattern != "" and topic != "")  # not a filter, not a topic name: the oracle refuses them, paho does not
    for action in ("publish", "receive"):
        assert topic_match(action, topic, pattern, ATTRS) == topic_matches_sub(pattern, topic)


@settings(max_examples=400, deadline=None)
@given(filters(), filters())
def test_oracle_covers_is_exactly_set_containment(pattern: str, topic_filter: str) -> None:
    """The symbolic regex over the filter's text equals containment of the selected topic sets (paho as matcher).

    The empty level counts as a topic here, as in ``tests/test_topics.py``: '/#' selects it by the
    parent rule, so '+/+/#' does not cover '/#'. Coverage grants, so this errs towards refusing.
    """
    assume(pattern != "" and topic_filter != "")
    universe = _universe(pattern, topic_filter)
    contained = all(topic_matches_sub(pattern, t) for t in universe if topic_matches_sub(topic_filter, t))
    assert topic_match("subscribe", topic_filter, pattern, ATTRS) == contained


@pytest.mark.parametrize(
    ("pattern", "topic_filter", "expected"),
    [
        # The issue: a subscribe deny refuses every filter that could select one of its topics.
        ("a/secret/#", "a/#", True),
        ("a/secret/#", "+/secret", True),
        ("a/secret/#", "#", True),
        ("a/secret/#", "a/secret", True),
        ("a/secret/#", "a/public/#", False),
        ("a/secret", "a/secret/+", False),
        ("#", "$SYS/#", False),
        ("$SYS/#", "+/x", False),
        ("+", "/#", False),
        ("/#", "+", False),
        ("/#", "#", True),
        ("sites/{location}/secret/#", "sites/+/#", True),
        ("sites/{location}/secret/#", "sites/plant-b/#", False),
        ("dev-{device_id}/#", "+/x", True),
        ("a/secret/#", "a/#/b", False),  # an invalid filter is refused whatever the rule
    ],
)
def test_oracle_subscribe_deny_overlaps(pattern: str, topic_filter: str, expected: bool) -> None:
    assert topic_match("subscribe", topic_filter, pattern, ATTRS, "deny") is expected


@settings(max_examples=800, deadline=None)
@given(filters(), filters())
def test_oracle_overlap_is_exactly_a_common_topic(pattern: str, topic_filter: str) -> None:
    """One witness per length decides overlap exactly as brute force over a complete universe does."""
    assume(pattern != "" and topic_filter != "")
    common = bool(common_topics(pattern, topic_filter))
    assert oracle.overlap(pattern, topic_filter) == common
    assert topic_match("subscribe", topic_filter, pattern, ATTRS, "deny") == common


@pytest.mark.parametrize("value", ["a/b", "+", "#", "a+b", "$x", "", "x" * 129, " a", "a\n", "a\x00b", "a\x7f"])
def test_oracle_refuses_unsafe_values(value: str) -> None:
    attrs = {**ATTRS, "device_id": value}
    for pattern, action, topic in [("x/{device_id}", "publish", f"x/{value}"), ("x/{device_id}", "subscribe", f"x/{value}"),
                                   ("x/{device_id}/#", "receive", "x/a/b/c"), ("{device_id}/#", "receive", f"{value}/q")]:
        assert topic_match(action, topic, pattern, attrs) is False
    assert topic_match("publish", "x/a", "x/{device_id}", {k: v for k, v in ATTRS.items() if k != "device_id"}) is False


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(alphabet="ab/+#${} \t\x00\x7f\u00a0\u2028é", max_size=5),
                 st.integers(min_value=126, max_value=130).map(lambda n: "a" * n)))
def test_oracle_value_rule_is_the_documented_one(value: str) -> None:
    """The oracle's own rule for bindable values accepts exactly what the registry accepts."""
    attrs = {**ATTRS, "type": value}
    safe = level_value_problem(value) is None
    assert (oracle.bind("{type}", attrs) is not None) is safe
    assert topic_match("publish", "x/" + value, "x/{type}", attrs) is safe


@pytest.mark.parametrize(("text", "topic_ok", "filter_ok"), [
    ("a", True, True), ("/", True, True), ("a//b", True, True), ("$SYS/x", True, True),
    ("+", False, True), ("#", False, True), ("a/+/b", False, True), ("a/#", False, True), ("+/#", False, True),
    ("", False, False), ("a/#/b", False, False), ("a#", False, False), ("#a", False, False), ("a+", False, False),
    ("+a/b", False, False), ("##", False, False), ("++", False, False), ("a\x00", False, False),
    ("a\nb", True, True), ("x" * 65535, True, True), ("x" * 65536, False, False),
])
def test_oracle_validation(text: str, topic_ok: bool, filter_ok: bool) -> None:
    assert valid_topic_name(text) is topic_ok
    assert valid_filter(text) is filter_ok


# -- the oracle catches broken topic code --------------------------------------------------------


def _against_casbin(tmp_path: Path, candidate: Callable) -> Stats:  # type: ignore[type-arg]
    return differential(random.Random(7), casbin_builder(tmp_path, candidate), policies=20, requests=100,
                        max_rules=20)


def _widened(action: str, topic: str, allowed_by_us: bool) -> bool:
    return action == "subscribe" and topic.endswith("#") and allowed_by_us


def test_broken_covers_in_the_engine_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine_module.covers

    def widening(pattern: str, topic_filter: str) -> bool:  # 'a/+' grants 'a/#'
        if topic_filter.endswith("#") and real(pattern, topic_filter[:-1] + "+"):
            return True
        return real(pattern, topic_filter)

    monkeypatch.setattr(engine_module, "covers", widening)
    stats = _against_casbin(tmp_path, engine_candidate)
    print(stats.report())
    assert any(_widened(action, topic, ours.allowed) and not ref.allowed
               for action, topic, _, ours, ref in stats.mismatches), stats.mismatches[:5]


def test_broken_covers_in_the_index_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = index_module._walk

    def widening(node, levels, i, attrs, dollar, subscribe, out):  # type: ignore[no-untyped-def]
        if subscribe and levels[-1] == "#":
            levels = [*levels[:-1], "+"]  # a filter 'a/#' walked as 'a/+': 'a/+' grants it
        real(node, levels, i, attrs, dollar, subscribe, out)

    monkeypatch.setattr(index_module, "_walk", widening)
    stats = _against_casbin(tmp_path, index_candidate)
    print(stats.report())
    assert any(_widened(action, topic, ours.allowed) and not ref.allowed
               for action, topic, _, ours, ref in stats.mismatches), stats.mismatches[:5]


def _bypass(action: str, topic: str, ours_allowed: bool, reference_allowed: bool) -> bool:
    return action == "subscribe" and ours_allowed and not reference_allowed


def test_subscribe_deny_by_coverage_in_the_engine_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's hole put back: a deny that only refuses filters it covers lets 'a/#' past 'a/secret/#'."""
    monkeypatch.setattr(engine_module, "overlaps", engine_module.covers)
    stats = _against_casbin(tmp_path, engine_candidate)
    print(stats.report())
    assert any(_bypass(action, topic, ours.allowed, ref.allowed) for action, topic, _, ours, ref in stats.mismatches)


def test_subscribe_deny_by_coverage_in_the_index_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def covering(node, levels, i, attrs, dollar, out):  # type: ignore[no-untyped-def]
        index_module._walk(node, levels, i, attrs, dollar, True, out)

    monkeypatch.setattr(index_module, "_overlap", covering)
    stats = _against_casbin(tmp_path, index_candidate)
    print(stats.report())
    assert any(_bypass(action, topic, ours.allowed, ref.allowed) for action, topic, _, ours, ref in stats.mismatches)


def test_broken_dollar_rule_in_the_engine_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine_module.matches
    monkeypatch.setattr(engine_module, "matches", lambda f, t: f == "#" or real(f, t))  # '#' reaches '$SYS'
    stats = _against_casbin(tmp_path, engine_candidate)
    print(stats.report())
    assert any(topic.startswith("$") and action != "subscribe" for action, topic, *_ in stats.mismatches)


def test_broken_dollar_rule_in_the_index_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = index_module._walk

    def no_dollar(node, levels, i, attrs, dollar, subscribe, out):  # type: ignore[no-untyped-def]
        real(node, levels, i, attrs, False, subscribe, out)

    monkeypatch.setattr(index_module, "_walk", no_dollar)
    stats = _against_casbin(tmp_path, index_candidate)
    print(stats.report())
    assert any(topic.startswith("$") for _, topic, *_ in stats.mismatches)


def test_correct_code_has_no_mismatch_on_the_same_load(tmp_path: Path) -> None:
    """The runs above fail because of the breakage, not because the load itself disagrees."""
    assert _against_casbin(tmp_path, engine_candidate).mismatches == []
    assert _against_casbin(tmp_path, index_candidate).mismatches == []


# -- the decision point verifies every decision it returns ---------------------------------------


def _decision_point(tmp_path: Path, verify: bool = True) -> DecisionPoint:
    shutil.copy(ROOT / "policies" / "model.conf", tmp_path / "model.conf")
    shutil.copy(ROOT / "policies" / "devices.yaml", tmp_path / "devices.yaml")
    (tmp_path / "policy.csv").write_text("p, pub-sites, *, *, *, sites/#, publish, allow\n")
    return DecisionPoint(PdpSettings(str(tmp_path / "model.conf"), str(tmp_path / "policy.csv"),
                                     str(tmp_path / "devices.yaml"), AdmissionSettings(), verify_with_casbin=verify))


def test_verification_sees_l1_hits_and_warmed_entries(tmp_path: Path) -> None:
    point = _decision_point(tmp_path)
    device = point.snapshot.registry.lookup("sensor-001")
    assert device is not None
    assert point.lookup(device, "publish", "sites/a")[:2] == (decision_for(True, "pub-sites"), "index")
    assert point.lookup(device, "publish", "sites/a")[1] == "l1"
    assert point.casbin_mismatches == 0
    point.warm(point.snapshot, device, {("publish", "other/x"): decision_for(True, "pub-sites")})  # a bad L2 entry
    assert point.lookup(device, "publish", "other/x")[1] == "l1"
    assert point.casbin_mismatches == 1
    point.snapshot.l1.put((device.attributes_revision, "publish", "sites/a"), decision_for(False, None))  # a corrupted L1 entry
    assert point.lookup(device, "publish", "sites/a")[0].allowed is False
    assert point.casbin_mismatches == 2


def test_verification_sees_invalid_topic_denials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point = _decision_point(tmp_path)
    device = point.snapshot.registry.lookup("sensor-001")
    assert device is not None
    for topic in ("sites/+", "sites/#", "sites/a\x00"):
        assert point.lookup(device, "publish", topic)[0].allowed is False
    assert point.casbin_mismatches == 0  # the oracle refuses invalid topics by itself

    def refuse(topic: str) -> None:
        raise TopicError("refused by a broken validator")

    monkeypatch.setattr(decision_point_module, "validate_topic", refuse)
    assert point.lookup(device, "publish", "sites/b")[0].allowed is False
    assert point.casbin_mismatches == 1


def test_lookup_is_untouched_without_verification(tmp_path: Path) -> None:
    point = _decision_point(tmp_path, verify=False)
    assert point.lookup.__func__ is DecisionPoint.lookup  # type: ignore[attr-defined]
    assert _decision_point(tmp_path).lookup.__func__ is DecisionPoint._verified_lookup  # type: ignore[attr-defined]
