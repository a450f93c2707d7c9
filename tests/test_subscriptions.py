"""The broker's subscription index selects exactly the filters that MQTT (paho) says match."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from broker_plugin.subscriptions import FilterIndex
from tests.test_topics import filters, topic_names


@settings(max_examples=1500, deadline=None)
@given(st.lists(filters(), max_size=12), st.lists(st.integers(0, 11), max_size=6), topic_names)
def test_index_matches_exactly_the_matching_filters(all_filters, removals, topic):
    index = FilterIndex()
    for f in all_filters:
        index.add(f)
    present = set(all_filters)
    for r in removals:
        if r < len(all_filters):
            index.remove(all_filters[r])
            present.discard(all_filters[r])
    assert len(index) == len(present)
    assert sorted(index.match(topic)) == sorted(f for f in present if topic_matches_sub(f, topic))
