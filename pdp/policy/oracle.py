"""Casbin, loaded from the model and policy files, as the reference decision maker.

Casbin decides selectors, action, effect and rule order from the model. Its
``topicMatch`` is written here again, from the MQTT 3.1.1 specification
(sections 1.5.3, 4.7), and shares no code with ``pdp.core.topics``,
``pdp.core.engine`` or ``pdp.core.index``: a reference that called our own
topic code would agree with every bug in it. It is deliberately plain and
slow: placeholders are bound by string substitution, and the bound pattern is
compiled into a regular expression over the requested topic name (publish,
receive) or over the requested filter's text, its wildcards read as symbols
(subscribe allow). A subscribe deny applies when the bound pattern and the
filter select a common topic name: one witness topic per length is built from
both texts and both topic-name expressions are tried on it (``overlap``). It also
refuses invalid topics and filters by itself, so that the PDP's invalid-topic
denials are checked too.

The model passes the rule's effect to ``topicMatch`` because subscribe applies
differently to allows (coverage) and denies (overlap); one function keeps the
matcher one readable line, and the effect is the rule's own field.

Casbin's deny-override effect reports the deciding rule only for denials, so a
second enforcer over the same files with an allow-override effect names the
first applicable allow. Together they give the decision and deciding rule that
``pdp.core.engine.decide`` must reproduce.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

import casbin
from casbin.persist import Adapter, load_policy_line
from casbin.util.expression import SimpleEval

from pdp.core.engine import Decision, decision_for
from pdp.registry.device import Device

FIRST_ALLOW_EFFECT = "some(where (p.eft == allow))"

# MQTT 3.1.1, 1.5.3: a UTF-8 string is at most 65535 bytes and never contains U+0000.
_MAX_BYTES = 65535
# 4.7.1.2 / 4.7.1.3: '#' only as the whole last level, '+' only as a whole level; other levels hold neither.
_VALID_FILTER = re.compile(r"(?:(?:[^/+#]*|\+)/)*(?:[^/+#]*|\+|#)", re.DOTALL)
# 4.7.1.1: wildcards are for filters; a topic name holds neither.
_VALID_TOPIC_NAME = re.compile(r"[^+#]+", re.DOTALL)
# Our own rule for a value bound into a pattern: one non-empty level of at most 128 characters, no
# separator, wildcard or control character, not a '$' topic's first level, no surrounding whitespace;
# anything else makes the rule bind to nothing.
_SAFE_VALUE = re.compile(r"(?!\$)(?!\s)[^/+#\x00-\x1f\x7f]{1,128}(?<!\s)")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _utf8_ok(text: str) -> bool:
    return text != "" and "\x00" not in text and len(text.encode("utf-8", "surrogatepass")) <= _MAX_BYTES


def valid_topic_name(topic: str) -> bool:
    return _utf8_ok(topic) and _VALID_TOPIC_NAME.fullmatch(topic) is not None


def valid_filter(topic_filter: str) -> bool:
    return _utf8_ok(topic_filter) and _VALID_FILTER.fullmatch(topic_filter) is not None


def bind(pattern: str, attributes: Mapping[str, str]) -> str | None:
    """The pattern with each ``{name}`` replaced by the device's value; None when a value is missing or unsafe.

    One pass, so a value that happens to contain ``{owner}`` is not substituted again.
    """
    failed = False

    def value(match: re.Match[str]) -> str:
        nonlocal failed
        found = attributes.get(match.group(1))
        if found is None or _SAFE_VALUE.fullmatch(found) is None:
            failed = True
            return ""
        return found

    bound = _PLACEHOLDER.sub(value, pattern)
    return None if failed else bound


@lru_cache(maxsize=8192)
def _name_regex(pattern: str) -> re.Pattern[str]:
    """The topic names the filter ``pattern`` selects (4.7.1, 4.7.2)."""
    levels = pattern.split("/")
    # 4.7.2: a filter starting with a wildcard does not match a topic name starting with '$'.
    head = r"(?!\$)" if levels[0] in ("+", "#") else ""
    if levels == ["#"]:
        return re.compile(head + r".*", re.DOTALL)
    tail = ""
    if levels[-1] == "#":
        levels = levels[:-1]
        tail = r"(?:/.*)?"  # 4.7.1.2: '#' also matches the parent ('sport/#' matches 'sport')
    body = "/".join(r"[^/]*" if level == "+" else re.escape(level) for level in levels)
    return re.compile(head + body + tail, re.DOTALL)


@lru_cache(maxsize=8192)
def _filter_regex(pattern: str) -> re.Pattern[str]:
    """The filters, as text, all of whose topics ``pattern`` selects.

    Read a filter's '+' and '#' as symbols: a pattern's literal level takes only the
    same literal; its '+' takes any literal level or '+', never '#' (that also selects
    the parent and deeper levels); its final '#' takes whatever follows, '#' included.
    """
    levels = pattern.split("/")
    head = r"(?!\$)" if levels[0] in ("+", "#") else ""
    if levels == ["#"]:
        return re.compile(head + r".*", re.DOTALL)
    tail = ""
    if levels[-1] == "#":
        levels = levels[:-1]
        tail = r"(?:/.*)?"
    body = "/".join(r"(?:[^/+#]*|\+)" if level == "+" else re.escape(level) for level in levels)
    return re.compile(head + body + tail, re.DOTALL)


def _witness(first: list[str], second: list[str], length: int) -> str:
    """The topic name of ``length`` levels taking each filter's literal level where it has one, else 'fresh'."""
    chosen = []
    for at in range(length):
        literal = [levels[at] for levels in (first, second) if at < len(levels) and levels[at] not in ("+", "#")]
        chosen.append(literal[0] if literal else "fresh")
    return "/".join(chosen)


def overlap(first: str, second: str) -> bool:
    """Whether two valid filters select at least one common valid topic name.

    Complete with one witness per length from 1 to the longer filter's level count:
    (1) if some topic of n levels is selected by both, so is the witness of n levels:
    where a filter has a literal level the topic has that very level, which the witness
    takes; elsewhere both filters have '+' or are past a '#', which take 'fresh' as
    well as any level, and at the first level 'fresh' is not a '$' level, which a
    topic selected by two filters both starting with a wildcard is not either.
    (2) a common topic longer than both filters means both end in '#' (without one a
    filter selects only its own length), and cutting it to the longer filter's length
    keeps it selected by both. A witness of one empty level is no topic name
    (``valid_topic_name`` refuses it); a literal empty first level forced it, so no
    other one-level topic was common either.
    """
    first_levels, second_levels = first.split("/"), second.split("/")
    first_names, second_names = _name_regex(first), _name_regex(second)
    for length in range(1, max(len(first_levels), len(second_levels)) + 1):
        witness = _witness(first_levels, second_levels, length)
        if valid_topic_name(witness) and first_names.fullmatch(witness) and second_names.fullmatch(witness):
            return True
    return False


def topic_match(action: str, topic: str, pattern: str, attributes: Mapping[str, str], effect: str = "allow") -> bool:
    """Casbin's ``topicMatch``: does the rule's pattern, bound to the device, select the request?

    For subscribe, an allow must cover the requested filter and a deny need only overlap it.
    """
    bound = bind(pattern, attributes)
    if bound is None:
        return False
    if action == "subscribe":
        if not valid_filter(topic):
            return False
        if effect == "deny":
            return overlap(bound, topic)
        # A filter of just '#' selects every non-'$' topic of one level or more, exactly as '+/#' does.
        return _filter_regex(bound).fullmatch("+/#" if topic == "#" else topic) is not None
    if not valid_topic_name(topic):
        return False
    return _name_regex(bound).fullmatch(topic) is not None


def _topic_match(action: str, topic: str, pattern: str, device: Device, effect: str) -> bool:
    return topic_match(action, topic, pattern, device.attrs, effect)


class TextAdapter(Adapter):
    """Rules from a text already read and validated, so Casbin never reads a file a second time."""

    def __init__(self, text: str) -> None:
        self._text = text

    def load_policy(self, model: casbin.model.Model) -> None:
        for line in self._text.splitlines():
            if line.strip() and not line.strip().startswith("#"):
                load_policy_line(line.strip(), model)


class CasbinReference:
    def __init__(self, model_text: str, policy_text: str) -> None:
        self._model_text = model_text
        self._policy_text = policy_text
        model = casbin.model.Model()
        model.load_model_from_text(model_text)
        self.enforcer = _parsing_once(casbin.Enforcer(model, TextAdapter(policy_text)))
        self.enforcer.add_function("topicMatch", _topic_match)
        self._first_allow_enforcer: casbin.Enforcer | None = None

    @property
    def _first_allow(self) -> casbin.Enforcer:
        """Built on first use: only explanations and verification need the allowing rule's id."""
        if self._first_allow_enforcer is None:
            allow_model = casbin.model.Model()
            allow_model.load_model_from_text(self._model_text)
            allow_model.add_def("e", "e", FIRST_ALLOW_EFFECT)
            enforcer = _parsing_once(casbin.Enforcer(allow_model, TextAdapter(self._policy_text)))
            enforcer.add_function("topicMatch", _topic_match)
            self._first_allow_enforcer = enforcer
        return self._first_allow_enforcer

    def policy_lines(self) -> list[list[str]]:
        return [list(rule) for rule in self.enforcer.get_policy()]

    def decide(self, device: Device, action: str, topic: str) -> Decision:
        allowed, explain = self.enforcer.enforce_ex(device, topic, action)
        if not allowed:
            return decision_for(False, explain[0] if explain else None)
        _, allow_explain = self._first_allow.enforce_ex(device, topic, action)
        return decision_for(True, allow_explain[0])


def _parsing_once(enforcer: casbin.Enforcer) -> casbin.Enforcer:
    """Casbin parses the model's matcher with ``ast.parse`` on every request; here once per enforcer.

    Besides the cost, CPython 3.11's AST builder keeps its recursion depth per interpreter, not per
    thread: two threads compiling at once (two brokers' verifications in one test process) fail with
    ``SystemError: AST constructor recursion depth mismatch``, which killed a broadcast task. Each
    request still gets its own evaluator (it holds the request's names); only the parsed tree is shared.
    """
    parsed: dict[str, object] = {}
    build = enforcer._get_expression

    def get_expression(expr: str, functions: object = None) -> SimpleEval:
        tree = parsed.get(expr)
        if tree is None:
            tree = parsed[expr] = build(expr, functions).ast_parsed_value
        evaluator = SimpleEval("", functions)
        evaluator.expr, evaluator.ast_parsed_value = expr, tree
        return evaluator

    enforcer._get_expression = get_expression  # type: ignore[method-assign]
    return enforcer
