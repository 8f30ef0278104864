"""Key layout: stream names, their parsing, and the hash tags that keep companions in one cluster slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from fabric.keys import Keys, Priority, StreamRef


def slot(key: str) -> int:
    """The Redis Cluster slot of a key (CRC16 of its hash tag, mod 16384)."""
    return int(key_slot(key.encode()))


def test_crc16_slot_helper_matches_the_cluster_spec():
    # the example from the Redis Cluster specification: CRC16("123456789") is 0x31C3
    assert slot("123456789") == 0x31C3 % 16384
    # and a hash tag makes only the tag count
    assert slot("a:{user1000}:b") == slot("{user1000}.following") == slot("user1000")


def test_stream_key_with_symbol():
    assert Keys("ns1").stream("tick", Priority.HIGH, "BTC-USD") == "ns1:s:tick:high:{BTC-USD}"


def test_stream_key_without_symbol_is_tagged_by_topic():
    assert Keys("ns1").stream("alerts", Priority.CRITICAL, None) == "ns1:s:alerts:critical:{~alerts}"


def test_default_namespace_is_fabric():
    assert Keys().stream("tick", Priority.NORMAL, "A") == "fabric:s:tick:normal:{A}"


@pytest.mark.parametrize(
    ("topic", "priority", "symbol"),
    [
        ("tick", Priority.LOW, "BTC-USD"),
        ("tick", Priority.NORMAL, "BTC/USD"),
        ("order_book", Priority.HIGH, "ES.H25"),
        ("alerts", Priority.CRITICAL, None),
        ("s", Priority.NORMAL, None),
        ("a.b-c_d", Priority.LOW, "x_1"),
    ],
)
def test_parse_stream_round_trips(topic, priority, symbol):
    # given a stream key built from a topic, priority and symbol
    keys = Keys("ns-1.x")
    key = keys.stream(topic, priority, symbol)
    # when it is parsed, as str and as the bytes Redis returns
    # then the same parts come back
    assert keys.parse_stream(key) == StreamRef(key, topic, priority, symbol)
    assert keys.parse_stream(key.encode()) == StreamRef(key, topic, priority, symbol)


def test_parse_stream_refuses_another_namespace():
    key = Keys("other").stream("tick", Priority.NORMAL, "A")
    with pytest.raises(ValueError, match="namespace 'mine'"):
        Keys("mine").parse_stream(key)


@pytest.mark.parametrize("key", ["ns:topic:tick", "ns:dlq:{A}", "ns:s:tick:{A}", "ns:s:tick:normal:A", ""])
def test_parse_stream_refuses_keys_that_are_not_streams(key):
    with pytest.raises(ValueError, match="not a fabric stream key"):
        Keys("ns").parse_stream(key)


def test_parse_stream_refuses_an_unknown_priority_with_value_error():
    # given a stream-shaped key whose priority is not one fabric has
    # when it is parsed
    # then a ValueError (not a KeyError) says it is not a fabric stream key
    with pytest.raises(ValueError, match="not a fabric stream key"):
        Keys("ns").parse_stream("ns:s:tick:urgent:{A}")


@pytest.mark.parametrize("symbol", ["BTC-USD", None])
def test_stream_dedup_failures_and_dlq_share_one_slot(symbol):
    # given a stream and its companion keys
    keys = Keys("ns")
    stream = keys.stream("tick", Priority.HIGH, symbol)
    companions = [keys.dedup(stream, "0" * 32), keys.failures(stream), keys.dlq(stream)]
    # then every one hashes to the stream's slot
    assert {slot(k) for k in companions} == {slot(stream)}


@pytest.mark.parametrize("symbol", ["BTC-USD", None])
def test_companion_keys_carry_the_stream_hash_tag(symbol):
    keys = Keys("ns")
    stream = keys.stream("tick", Priority.HIGH, symbol)
    tag = Keys.tag("tick", symbol)
    assert Keys.tag_of(stream) == tag
    assert keys.dedup(stream, "e1") == f"ns:d:tick:{tag}:e1"
    assert keys.failures(stream) == f"ns:f:tick:high:{tag}"
    assert keys.dlq(stream) == f"ns:dlq:{tag}"


def test_streams_of_every_topic_and_priority_for_one_symbol_share_one_slot():
    # given streams of several topics and every priority for one symbol
    keys = Keys("ns")
    streams = [keys.stream(t, p, "ETH-USD") for t in ("tick", "bar", "order", "fill") for p in Priority]
    # then they all live in one slot
    assert len({slot(s) for s in streams}) == 1


def test_different_symbols_spread_over_slots():
    keys = Keys("ns")
    slots = {slot(keys.stream("tick", Priority.NORMAL, f"SYM{i}")) for i in range(50)}
    assert len(slots) > 1


def test_failures_key_keeps_topic_and_priority():
    keys = Keys("ns")
    low = keys.stream("tick", Priority.LOW, "A")
    high = keys.stream("tick", Priority.HIGH, "A")
    assert keys.failures(low) != keys.failures(high)


def test_registry_and_counter_keys():
    keys = Keys("ns")
    assert keys.topic_registry("tick") == "ns:topic:tick"
    assert keys.dlq_registry() == "ns:dlqs"
    assert keys.counters() == "ns:counters"


@pytest.mark.parametrize("topic", ["", "has space", "a:b", "a{b}", "x" * 101, "tick*"])
def test_invalid_topic_raises_value_error_saying_what_is_allowed(topic):
    with pytest.raises(ValueError) as info:
        Keys("ns").stream(topic, Priority.NORMAL, None)
    message = str(info.value)
    assert f"invalid topic {topic!r}" in message
    assert "1-100 characters" in message


@pytest.mark.parametrize("symbol", ["", "BTC USD", "A:B", "{A}", "A}", "x" * 65])
def test_invalid_symbol_raises_value_error_saying_what_is_allowed(symbol):
    with pytest.raises(ValueError) as info:
        Keys("ns").stream("tick", Priority.NORMAL, symbol)
    message = str(info.value)
    assert f"invalid symbol {symbol!r}" in message
    assert "1-64 characters" in message


@pytest.mark.parametrize("ns", ["", "a:b", "a{b", "a b"])
def test_invalid_namespace_raises_value_error(ns):
    with pytest.raises(ValueError, match="invalid namespace"):
        Keys(ns)


def test_invalid_name_is_refused_again_on_a_second_call():
    # given a topic refused once
    keys = Keys("ns")
    with pytest.raises(ValueError):
        keys.stream("bad topic", Priority.NORMAL, "A")
    # then it is refused again (nothing invalid is cached)
    with pytest.raises(ValueError):
        keys.stream("bad topic", Priority.NORMAL, "A")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("high", Priority.HIGH),
        ("HIGH", Priority.HIGH),
        (" Critical ", Priority.CRITICAL),
        ("low", Priority.LOW),
        (1, Priority.NORMAL),
        (Priority.CRITICAL, Priority.CRITICAL),
    ],
)
def test_priority_parse_accepts_names_numbers_and_members(value, expected):
    assert Priority.parse(value) is expected


def test_priority_parse_refuses_unknown_name_listing_the_valid_ones():
    with pytest.raises(ValueError) as info:
        Priority.parse("urgent")
    assert "'urgent'" in str(info.value)
    assert "low, normal, high, critical" in str(info.value)


def test_priority_parse_refuses_out_of_range_number():
    with pytest.raises(ValueError):
        Priority.parse(7)


def test_priority_order_and_labels():
    assert Priority.LOW < Priority.NORMAL < Priority.HIGH < Priority.CRITICAL
    assert [p.label for p in Priority] == ["low", "normal", "high", "critical"]
