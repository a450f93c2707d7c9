"""The retained store's limits: how many topics and payload bytes it holds, and how many topics one device.

amqtt kept every retained message without limit, so one device allowed to retain on many topics (a
wildcard grant such as ``sites/{location}/{device_id}/#``) could grow the broker's memory without bound,
and fill the store for every other device. Pure bookkeeping, no I/O: the broker asks before it retains.
"""

from __future__ import annotations

from collections import Counter


class RetainedLedger:
    """What the retained store holds, by topic: its payload size and the device that retained it."""

    def __init__(self, max_messages: int, max_bytes: int, max_per_device: int,
                 max_bytes_per_device: int | None = None) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_per_device = max_per_device
        self.max_bytes_per_device = max_bytes if max_bytes_per_device is None else max_bytes_per_device
        self._topics: dict[str, tuple[int, str]] = {}  # topic -> (bytes: payload and topic name, owner)
        self._per_owner: Counter[str] = Counter()
        self._owner_bytes: Counter[str] = Counter()
        self.bytes = 0  # payload and topic-name bytes (a topic name can be 64 KiB: an outside attack held 59 MB
        # in 1,000 retained topics of 1-byte payloads when only payloads counted)
        self.refused = 0  # retained PUBLISHes not retained, since start
        self._logged: set[str] = set()  # owners whose refusal was logged since they last retained

    def __len__(self) -> int:
        return len(self._topics)

    def refuses(self, topic: str, payload: int, owner: str) -> str | None:
        """Why retaining a ``payload``-byte message on ``topic`` for ``owner`` would pass a limit, or None. An
        empty payload (removing the topic's message) is never refused."""
        if payload == 0:
            return None
        held = self._topics.get(topic)
        size = _size(topic, payload)
        new_topic = held is None
        owned = held[0] if held is not None and held[1] == owner else 0  # what this owner already holds there
        if new_topic and len(self._topics) >= self.max_messages:
            reason = f"max_retained_messages {self.max_messages} reached"
        elif self.bytes - (held[0] if held else 0) + size > self.max_bytes:
            reason = f"max_retained_bytes {self.max_bytes} would be passed"
        elif (new_topic or held[1] != owner) and self._per_owner[owner] >= self.max_per_device:
            reason = f"max_retained_per_device {self.max_per_device} reached"
        elif self._owner_bytes[owner] - owned + size > self.max_bytes_per_device:
            reason = f"max_retained_bytes_per_device {self.max_bytes_per_device} would be passed"
        else:
            return None
        self.refused += 1
        self._forget(topic)  # the broker removes the topic's earlier message: a stale one would pass for the newest
        return reason

    def store(self, topic: str, payload: int, owner: str) -> None:
        """Note what was retained (after ``refuses`` said None)."""
        self._forget(topic)
        if payload:
            size = _size(topic, payload)
            self._topics[topic] = (size, owner)
            self._per_owner[owner] += 1
            self._owner_bytes[owner] += size
            self.bytes += size
        self._logged.discard(owner)

    def first_refusal(self, owner: str) -> bool:
        """Whether this refusal is the owner's first since it last retained (logged once per spell)."""
        if owner in self._logged:
            return False
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(owner)
        return True

    def _forget(self, topic: str) -> None:
        held = self._topics.pop(topic, None)
        if held is not None:
            size, owner = held
            self.bytes -= size
            self._per_owner[owner] -= 1
            self._owner_bytes[owner] -= size
            if self._per_owner[owner] <= 0:
                del self._per_owner[owner], self._owner_bytes[owner]


def _size(topic: str, payload: int) -> int:
    """What a retained message counts against the byte limits: its payload and its topic name."""
    return payload + len(topic.encode("utf-8", "surrogatepass"))
