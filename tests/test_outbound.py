"""The per-session outbound queue's policy (pure): order, in-flight room, drop oldest QoS 0, then overflow."""

from __future__ import annotations

from pdp.core.outbound import Offered, OutboundLimits, OutboundQueue, Outgoing


def queue(inflight: int = 2, messages: int = 4, size: int = 1000) -> OutboundQueue:
    return OutboundQueue(OutboundLimits(inflight, messages, size))


def msg(name: str, qos: int, size: int = 1) -> Outgoing:
    return Outgoing(name, b"x" * size, qos)


def test_sends_in_order_with_at_most_the_inflight_limit_of_qos_1_2_open() -> None:
    q = queue(inflight=2, messages=10)
    for item in (msg("a", 1), msg("b", 0), msg("c", 2), msg("d", 1), msg("e", 0)):
        assert q.offer(item).overflow is False
    sent = [q.next_to_send(), q.next_to_send(), q.next_to_send()]
    assert [i.topic for i in sent] == ["a", "b", "c"]
    assert q.next_to_send() is None  # 'd' waits: two flows open, and 'e' stays behind it (order kept)
    q.sent(sent[0])
    assert q.next_to_send().topic == "d"
    assert q.next_to_send().topic == "e"
    assert q.inflight == 2


def test_full_queue_drops_the_oldest_waiting_qos_0_first() -> None:
    q = queue(inflight=1, messages=4)
    for item in (msg("q1a", 1), msg("q0a", 0), msg("q1b", 1), msg("q0b", 0)):
        assert q.offer(item).dropped == 0
    offered = q.offer(msg("q1c", 1))
    assert (offered.dropped, offered.overflow) == (1, False)
    assert [i.topic for i in q.waiting] == ["q1a", "q1b", "q0b", "q1c"]
    assert q.offer(msg("q0c", 0)).dropped == 1  # q0b, the oldest QoS 0, goes
    assert [i.topic for i in q.waiting] == ["q1a", "q1b", "q1c", "q0c"]


def test_only_qos_1_left_over_the_limit_is_an_overflow() -> None:
    q = queue(inflight=1, messages=3)
    for name in ("a", "b", "c"):
        assert not q.offer(msg(name, 1)).overflow
    offered = q.offer(msg("d", 1))
    assert (offered.dropped, offered.overflow) == (0, True)


def test_bytes_limit_counts_waiting_and_in_flight() -> None:
    q = queue(inflight=5, messages=100, size=250)
    assert not q.offer(msg("a", 1, 100)).overflow
    first = q.next_to_send()
    assert not q.offer(msg("b", 0, 100)).overflow
    offered = q.offer(msg("c", 1, 100))  # 300 bytes held: the QoS 0 goes
    assert (offered.dropped, offered.overflow) == (1, False)
    assert q.held_bytes == 200
    assert q.offer(msg("d", 1, 100)).overflow  # in flight still counts
    q.sent(first)
    assert q.held_bytes == 200 and q.held_messages == 2


def test_a_qos_0_message_larger_than_the_limit_is_dropped_not_an_overflow() -> None:
    q = queue(size=10)
    offered = q.offer(msg("big", 0, 11))
    assert (offered.dropped, offered.overflow) == (1, False)
    assert q.held_bytes == 0 and not q.waiting


def test_drain_empties_and_returns_the_waiting_in_order() -> None:
    q = queue(inflight=1, messages=10)
    for name in ("a", "b", "c"):
        q.offer(msg(name, 1))
    q.next_to_send()
    assert [i.topic for i in q.drain()] == ["b", "c"]
    assert q.held_messages == 1 and q.inflight == 1


def test_a_backlog_is_held_on_top_of_the_live_limits() -> None:
    q = queue(inflight=1, messages=2, size=1000)
    for name in ("b1", "b2", "b3"):
        q.offer_backlog(msg(name, 1))
    assert not q.offer(msg("live1", 1)).overflow  # the backlog does not count against the live limits
    assert not q.offer(msg("live2", 1)).overflow
    assert q.offer(msg("live3", 1)).overflow
    assert q.offer(msg("live0", 0)).dropped == 1  # a live QoS 0 goes; backlog QoS 0 are not dropped either


def test_a_retained_message_waits_once_per_topic_however_often_the_client_subscribes() -> None:
    q = queue(inflight=1, messages=2)
    for _ in range(50):  # fifty SUBSCRIBEs matching the same three retained messages
        for name in ("r1", "r2", "r3"):
            q.offer_retained(msg(name, 1))
    assert (q.held_messages, [i.topic for i in q.waiting]) == (3, ["r1", "r2", "r3"])
    assert all(i.retain and i.backlog for i in q.waiting)
    first = q.next_to_send()
    assert first.topic == "r1" and not q.retained_waiting("r1") and q.retained_waiting("r2")
    assert q.offer_retained(msg("r1", 1)) is True  # sent, not waiting: a new SUBSCRIBE gets it again
    assert q.offer_retained(msg("r2", 1)) is False
    assert [i.topic for i in q.drain()] == ["r2", "r3", "r1"]
    assert q.offer_retained(msg("r2", 1)) is True  # the connection's end forgets what waited


def test_backlog_qos_0_is_not_counted_as_droppable_and_an_overflow_still_ends() -> None:
    """Found in review: a waiting backlog QoS 0 message (the offline queue, or a retained message for a new
    subscription) was counted as droppable, but never dropped: offering live QoS 1 past the limits then looped
    for ever, the broker's event loop with it."""
    q = queue(inflight=1, messages=2)
    q.offer_backlog(msg("b", 0))
    q.offer_retained(msg("r", 0))
    offered = [q.offer(msg(f"l{i}", 1)) for i in range(3)]
    assert [o.overflow for o in offered] == [False, False, True]
    assert [i.topic for i in q.waiting] == ["b", "r", "l0", "l1", "l2"]  # the backlog kept, not dropped
    assert [q.next_to_send().topic for _ in range(3)] == ["b", "r", "l0"]
    assert q.offer(msg("z", 0)) == Offered(dropped=1, overflow=True)  # a live QoS 0 one is droppable
