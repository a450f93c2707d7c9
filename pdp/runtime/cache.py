"""Decision caches. L1: a bounded in-process LRU, the only tier on the per-message path.

A cache entry is keyed by everything its decision depends on (policy revision,
the device's attribute revision, action, topic), so a changed policy or device
is never answered from a stale entry; it simply stops being hit.

L2 lives in Redis, which anyone with write access to it can edit and whose keys
are computable from the registry. So Redis is not trusted with decisions: each
L2 entry carries a format version and an HMAC-SHA256 under a key only brokers
hold, binding the decision to the exact hash key (policy and device revision),
action and topic; and an entry is used only if the rule it names exists in the
current policy and applies to this device, action and topic with that effect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections import OrderedDict, deque
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Generic, TypeVar

from pdp.core.engine import ACTIONS, Decision, Rule, decision_for
from pdp.core.topics import (
    TopicError,
    bind,
    covers,
    matches,
    overlaps,
    validate_filter,
    validate_topic,
)
from pdp.runtime.redis_link import REDIS_ERRORS, RedisLink

log = logging.getLogger("mqtt_pdp.l2")

_SEP = "\x00"  # between action and topic in an L2 field; topics cannot contain NUL
L2_VERSION = "v1"  # the entry format and MAC construction; entries of any other version are ignored
MIN_KEY_BYTES = 16
K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """Bounded LRU; used from one event loop thread, so no lock on the read path."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        data = self._data
        data[key] = value
        if len(data) > self.capacity:
            data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def releasing(self, chunk: int = 256) -> Generator[None, None, None]:
        """Empty the cache a chunk at a time, yielding in between (see ``decision_point.releasing``)."""
        data = self._data
        while data:
            for _ in range(min(chunk, len(data))):
                data.popitem()
            yield None

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached, without counting a hit or refreshing it (for tools and tests)."""
        return key in self._data


def load_l2_key(path: str) -> bytes:
    """The L2 MAC key: the file's raw bytes (no trimming, so every broker given a copy of the file agrees).

    ValueError names the setting, so a broker with a bad key file stops at start with one line.
    """
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"l2_key_file {path}: cannot read: {exc.strerror or exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"l2_key_file {path}: {'empty' if not key else f'only {len(key)} bytes'}; at least "
                         f"{MIN_KEY_BYTES} random bytes are needed (mqtt-pdp l2-key --out {path})")
    return key


def _mac_input(key: str, action: str, topic: str, allowed: bool, rule_id: str) -> bytes:
    """One unambiguous string: the key and topic are length-prefixed, the action is one of ACTIONS (checked
    before an entry is opened), the tag is one character and the rule id is the rest."""
    return f"{L2_VERSION}|{len(key)}:{key}|{action}|{len(topic)}:{topic}|{'A' if allowed else 'D'}|{rule_id}".encode()


class EntrySealer:
    """Seals and opens L2 entry values: ``v1|A|<rule id>|<mac>`` (``v1|D||<mac>`` for a deny by no rule)."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # copied per entry: the key is processed once

    def _mac(self, key: str, action: str, topic: str, allowed: bool, rule_id: str) -> str:
        mac = self._keyed.copy()
        mac.update(_mac_input(key, action, topic, allowed, rule_id))
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")

    def seal(self, key: str, action: str, topic: str, decision: Decision) -> str:
        rule_id = decision.rule_id or ""
        tag = "A" if decision.allowed else "D"
        return f"{L2_VERSION}|{tag}|{rule_id}|{self._mac(key, action, topic, decision.allowed, rule_id)}"

    def open(self, key: str, action: str, topic: str, value: str) -> tuple[bool, str] | None:
        """(allowed, rule id) if ``value`` was sealed by a holder of the key for exactly this key, action and topic."""
        parts = value.split("|")
        if len(parts) != 4 or parts[0] != L2_VERSION or parts[1] not in ("A", "D"):
            return None
        _, tag, rule_id, mac = parts
        allowed = tag == "A"
        if allowed and not rule_id:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(key, action, topic, allowed, rule_id).encode()):
            return None
        return allowed, rule_id


def _topic_problem(action: str, topic: str) -> str | None:
    if action not in ACTIONS:
        return "unknown action"
    try:
        (validate_filter if action == "subscribe" else validate_topic)(topic)
    except TopicError:
        return "invalid topic"
    return None


def _policy_problem(rules: Mapping[str, Rule], attributes: Mapping[str, str], action: str, topic: str,
                    allowed: bool, rule_id: str, bound: dict[str, str | None]) -> str | None:
    """Why an authenticated entry still cannot be used under the current policy, if it cannot.

    The named rule must exist, be of this action and effect, select this device (the engine's selector
    semantics) and apply to this topic as the index applies it (a subscribe deny by overlap): one rule evaluated, not the whole policy. ``bound`` memoizes each
    rule's pattern bound to this device for one fetch, since binding costs more than matching.
    A deny by no rule needs nothing: it can only refuse.
    """
    if not allowed and not rule_id:
        return None
    rule = rules.get(rule_id)
    if rule is None:
        return "rule not in policy"
    if rule.action != action or (rule.effect == "allow") != allowed:
        return "rule of another action or effect"
    for selector, value in ((rule.type, "type"), (rule.location, "location"), (rule.purpose, "purpose")):
        if selector != "*" and selector != attributes[value]:
            return "rule does not select the device"
    if rule_id not in bound:
        bound[rule_id] = bind(rule.topic, attributes)
    pattern = bound[rule_id]
    if pattern is None:
        return "rule does not cover the topic"
    if action != "subscribe":
        return None if matches(pattern, topic) else "rule does not cover the topic"
    # The index's subscribe semantics: an allow covers the filter, a deny needs only to overlap it.
    if (covers if allowed else overlaps)(pattern, topic):
        return None
    return "rule does not cover the topic" if allowed else "rule does not overlap the filter"


class RedisDecisionCache:
    """L2: decisions shared through Redis by every broker using it, so a fleet of brokers warms one cache.

    A Redis round trip costs more than a compiled decision, so L2 is never read
    per message: entries are written behind the decision in batches, and read
    in one round trip per device at connect to warm that broker's L1.
    """

    def __init__(self, link: RedisLink, prefix: str, ttl: int, key: bytes, max_pending: int = 100_000,
                 flush_interval: float = 0.05) -> None:
        if ttl < 1:
            raise ValueError(f"L2 TTL must be at least 1 second, got {ttl}")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"L2 key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self.link = link
        self.prefix = prefix
        self.ttl = ttl
        self.flush_interval = flush_interval
        self.sealer = EntrySealer(key)
        self._pending: deque[tuple[str, str, str, Decision]] = deque(maxlen=max_pending)
        self._rules: tuple[tuple[Rule, ...], dict[str, Rule]] = ((), {})
        self.written = 0
        self.fetches = 0  # completed reads (Redis answered); lets tests and tools see that a warm-up ran
        self.warmed = 0  # entries that passed every check
        self.rejected = 0  # entries ignored: bad MAC, unknown version, malformed, invalid topic, rule check

    def key(self, policy_revision: str, device_revision: str) -> str:
        """The format version is in the key too, so brokers of another format (a rolling upgrade) neither
        read these entries as their own (an older broker would take each for a deny) nor leave theirs here."""
        return f"{self.prefix}:l2:{L2_VERSION}:{policy_revision}:{device_revision}"

    def record(self, policy_revision: str, device_revision: str, action: str, topic: str, decision: Decision) -> None:
        """O(1) and never blocks; under a long Redis outage the oldest unwritten entries are let go (it is a cache)."""
        self._pending.append((self.key(policy_revision, device_revision), action, topic, decision))

    def _rules_by_id(self, rules: tuple[Rule, ...]) -> dict[str, Rule]:
        """The policy's rules by id, built once per policy version (connects are frequent, reloads rare)."""
        if self._rules[0] is not rules:
            self._rules = (rules, {rule.rule_id: rule for rule in rules})
        return self._rules[1]

    async def fetch(self, policy_revision: str, rules: tuple[Rule, ...], device_revision: str,
                    attributes: Mapping[str, str]) -> dict[tuple[str, str], Decision]:
        """What brokers holding the key decided for this device under this policy; empty when Redis is unavailable.

        ``rules`` are the rules of the policy ``policy_revision`` names and ``attributes`` the device's;
        every entry is checked against them before it may reach L1.
        """
        key = self.key(policy_revision, device_revision)
        try:
            raw = await self.link.client.hgetall(key)
        except REDIS_ERRORS as exc:
            self.link.failed(exc)
            return {}
        self.link.succeeded()
        by_id = self._rules_by_id(rules)
        out: dict[tuple[str, str], Decision] = {}
        problems: dict[str, int] = {}
        bound: dict[str, str | None] = {}
        for field, value in raw.items():
            problem = None
            try:
                action, sep, topic = field.decode().partition(_SEP)
                text = value.decode()
            except UnicodeDecodeError:
                problem = "malformed"
            else:
                problem = "malformed" if not sep else _topic_problem(action, topic)
            if problem is None:
                opened = self.sealer.open(key, action, topic, text)
                if opened is None:
                    problem = "bad MAC, version or format"
                else:
                    allowed, rule_id = opened
                    problem = _policy_problem(by_id, attributes, action, topic, allowed, rule_id, bound)
            if problem is not None:
                problems[problem] = problems.get(problem, 0) + 1
                continue
            out[(action, topic)] = decision_for(allowed, rule_id or None)
        self.fetches += 1
        self.warmed += len(out)
        if problems:
            count = sum(problems.values())
            self.rejected += count
            log.warning("ignored %d L2 entr%s in %s (%s): not sealed with this broker's L2 key for this device, "
                        "action and topic, or not valid under the current policy; Redis may have been written to "
                        "by something other than a broker", count, "y" if count == 1 else "ies", key,
                        ", ".join(f"{n} {what}" for what, n in sorted(problems.items())))
        return out

    async def run(self) -> None:
        """Write pending entries in batches until cancelled; a failed batch waits for Redis to come back."""
        backoff = self.flush_interval
        while True:
            await asyncio.sleep(backoff)
            if not self._pending:
                continue
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), 5000))]
            try:
                async with self.link.client.pipeline(transaction=False) as pipe:
                    keys = set()
                    seal = self.sealer.seal
                    for key, action, topic, decision in batch:
                        pipe.hset(key, f"{action}{_SEP}{topic}", seal(key, action, topic, decision))
                        keys.add(key)
                    for key in keys:
                        pipe.expire(key, self.ttl)
                    await pipe.execute()
            except REDIS_ERRORS as exc:
                self.link.failed(exc)
                self._pending.extendleft(reversed(batch))
                backoff = min(1.0, backoff * 2)
                continue
            self.link.succeeded()
            self.written += len(batch)
            backoff = self.flush_interval
