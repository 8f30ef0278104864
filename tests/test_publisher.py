"""The publisher: entries and their wire fields, order, dedup, routing, backpressure and Redis errors."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import fakeredis
import msgspec
import pytest
from redis.asyncio.connection import Connection as RedisConnection

from fabric import Publisher, PublisherConfig, connect, scripts
from fabric.codec import decode_fields
from fabric.errors import (
    AuthenticationFailed,
    EventTooLarge,
    PublishError,
    RedisOutOfMemory,
    RedisUnavailable,
)
from fabric.events import Alert, Order, Severity, Side, Tick
from fabric.keys import Priority
from fabric.nodes import is_cluster, slot_of
from fabric.publisher import _Part
from tests import conftest
from tests.backends import command_calls, kill_clients, on_every_node, with_user
from tests.conftest import RedisServer

ENTRY_ID = re.compile(r"^\d+-\d+$")


def tick(symbol: str = "BTC-USD", **kwargs: object) -> Tick:
    return Tick(symbol=symbol, bid=100.0, ask=100.5, **kwargs)  # type: ignore[arg-type]


async def entries(client, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry of a stream as (id, fields)."""
    return [(i.decode(), f) for i, f in await client.xrange(stream)]


# ---- what an entry looks like ------------------------------------------------------------------------


async def test_publish_returns_the_entry_id(redis, keys):
    # given a publisher
    async with Publisher(redis, keys=keys) as pub:
        # when an event is published
        entry_id = await pub.publish(tick())
    # then its entry id is returned and is the stream's only entry
    assert entry_id is not None and ENTRY_ID.match(entry_id)
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    assert [i for i, _ in await entries(redis, stream)] == [entry_id]


async def test_entry_has_exactly_the_four_wire_fields(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick())
    [(_, fields)] = await entries(redis, keys.stream("tick", Priority.NORMAL, "BTC-USD"))
    assert set(fields) == {b"type", b"v", b"enc", b"data"}
    assert (fields[b"type"], fields[b"v"], fields[b"enc"]) == (b"Tick", b"1", b"msgpack")


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_published_entry_decodes_to_the_event(redis, keys, encoding):
    # given a publisher writing one encoding
    event = tick()
    async with Publisher(redis, PublisherConfig(encoding=encoding), keys=keys) as pub:
        await pub.publish(event)
    # when the entry is read back and decoded
    [(_, fields)] = await entries(redis, keys.stream("tick", Priority.NORMAL, "BTC-USD"))
    # then it is the published event, labelled with that encoding
    assert fields[b"enc"] == encoding.encode()
    assert decode_fields(fields) == event


async def test_publish_many_preserves_order_and_returns_ids(redis, keys):
    # given events published in one call, in more batches than one
    events = [tick() for _ in range(25)]
    async with Publisher(redis, PublisherConfig(max_batch=4, max_buffer=8), keys=keys) as pub:
        ids = await pub.publish_many(events)
    # then the ids are returned in order and the stream holds the events in that order
    stored = await entries(redis, keys.stream("tick", Priority.NORMAL, "BTC-USD"))
    assert ids == [i for i, _ in stored]
    assert [decode_fields(f).event_id for _, f in stored] == [e.event_id for e in events]


async def test_ids_of_events_interleaved_over_streams_are_each_events_own(redis, keys):
    # given a batch whose events alternate between three symbols' streams, with one duplicate among them
    # (publish.lua takes and answers them grouped by stream: the publisher puts the answers back in order)
    events = [tick(symbol=f"S{i % 3}") for i in range(9)]
    events.insert(5, events[1])
    async with Publisher(redis, PublisherConfig(dedup_window_ms=60_000), keys=keys) as pub:
        ids = await pub.publish_many(events)
    # then each id is in its own event's stream and holds that event, and the duplicate's is None
    assert ids[5] is None and None not in ids[:5] + ids[6:]
    for event, entry_id in zip(events, ids, strict=True):
        if entry_id is None:
            continue
        [(found, fields)] = await redis.xrange(keys.stream("tick", Priority.NORMAL, event.symbol), entry_id, entry_id)
        assert decode_fields(fields).event_id == event.event_id
    for s in range(3):
        stored = await entries(redis, keys.stream("tick", Priority.NORMAL, f"S{s}"))
        assert [decode_fields(f).event_id for _, f in stored] == [e.event_id for e in events[:5] + events[6:]
                                                                if e.symbol == f"S{s}"]


async def test_ids_of_one_slots_streams_interleaved_are_each_events_own(redis, keys):
    # given concurrent publishes of one symbol at two priorities, interleaved: two streams in one batch, and one
    # slot (on a cluster: one publish.lua call, which takes and answers them grouped by stream)
    high, low = (keys.stream("tick", p, "X") for p in (Priority.HIGH, Priority.LOW))
    assert slot_of(high) == slot_of(low)
    events = [tick(symbol="X", bid_size=float(i)) for i in range(8)]
    priorities = [Priority.HIGH, Priority.LOW] * 4
    async with Publisher(redis, keys=keys) as pub:
        ids = await asyncio.gather(*(pub.publish(e, priority=p) for e, p in zip(events, priorities, strict=True)))
    # then each id is in its own event's stream and holds that event
    for event, p, entry_id in zip(events, priorities, ids, strict=True):
        [(_, fields)] = await redis.xrange(high if p is Priority.HIGH else low, entry_id, entry_id)
        assert decode_fields(fields).event_id == event.event_id


async def test_publish_many_of_nothing_returns_nothing(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        assert await pub.publish_many([]) == []


# ---- dedup -------------------------------------------------------------------------------------------


DEDUP = PublisherConfig(dedup_window_ms=60_000)


async def test_same_event_twice_in_the_window_creates_one_entry(redis, keys):
    # given an event published once by a publisher with the event_id dedup window on
    event = tick()
    async with Publisher(redis, DEDUP, keys=keys) as pub:
        first = await pub.publish(event)
        # when it is published again within the dedup window
        second = await pub.publish(event)
    # then the second publish returns None and adds no entry
    assert first is not None
    assert second is None
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 1


async def test_duplicate_inside_one_batch_is_dropped(redis, keys):
    event = tick()
    async with Publisher(redis, DEDUP, keys=keys) as pub:
        ids = await pub.publish_many([event, event])
    assert ids[0] is not None and ids[1] is None
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 1


async def test_dedup_mark_expires_with_the_window(redis, keys):
    # given an event published with a 60 s window
    event = tick()
    async with Publisher(redis, PublisherConfig(dedup_window_ms=60_000), keys=keys) as pub:
        await pub.publish(event)
    # then its mark lives in the stream's slot and carries a TTL within the window
    mark = keys.dedup(keys.stream("tick", Priority.NORMAL, "BTC-USD"), event.event_id)
    assert 0 < await redis.pttl(mark) <= 60_000


async def test_the_same_event_published_to_two_topics_lands_in_both(redis, keys):
    # given one event
    event = tick()
    async with Publisher(redis, DEDUP, keys=keys) as pub:
        # when it is published to two topics
        first = await pub.publish(event, topic="tick")
        second = await pub.publish(event, topic="quotes")
    # then dedup (per topic) lets both through
    assert first is not None and second is not None


async def test_without_dedup_the_same_event_creates_two_entries(redis, keys):
    # given a publisher with the event_id dedup window off (the default)
    event = tick()
    async with Publisher(redis, keys=keys) as pub:
        # when the same event is published twice
        first = await pub.publish(event)
        second = await pub.publish(event)
    # then both are written and no dedup mark exists
    assert first is not None and second is not None and first != second
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    assert await redis.xlen(stream) == 2
    assert not await redis.exists(keys.dedup(stream, event.event_id))


# ---- routing -----------------------------------------------------------------------------------------


async def test_topic_registry_lists_the_stream(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick())
    members = await redis.smembers(keys.topic_registry("tick"))
    assert members == {keys.stream("tick", Priority.NORMAL, "BTC-USD").encode()}


async def test_topic_registry_lists_every_stream_of_the_topic(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([tick("A"), tick("B")])
        await pub.publish(tick("A"), priority="high")
    members = await redis.smembers(keys.topic_registry("tick"))
    assert members == {
        keys.stream("tick", Priority.NORMAL, "A").encode(),
        keys.stream("tick", Priority.NORMAL, "B").encode(),
        keys.stream("tick", Priority.HIGH, "A").encode(),
    }


async def test_events_go_to_per_symbol_streams(redis, keys):
    # when ticks of two symbols are published
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([tick("A"), tick("B"), tick("A")])
    # then each symbol has its own stream
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "A")) == 2
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "B")) == 1


async def test_priorities_go_to_per_priority_streams(redis, keys):
    # when the same kind of event is published at three priorities
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick(), priority=Priority.LOW)
        await pub.publish(tick(), priority="critical")
        await pub.publish(tick())
    # then each priority has its own stream
    for p in (Priority.LOW, Priority.NORMAL, Priority.CRITICAL):
        assert await redis.xlen(keys.stream("tick", p, "BTC-USD")) == 1
    assert not await redis.exists(keys.stream("tick", Priority.HIGH, "BTC-USD"))


async def test_event_default_priority_and_topic_are_used(redis, keys):
    order = Order(symbol="A", order_id="o1", side=Side.BUY, quantity=1.0)
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(order)
    assert await redis.xlen(keys.stream("order", Priority.HIGH, "A")) == 1


async def test_event_without_symbol_goes_to_the_topic_tagged_stream(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(Alert(severity=Severity.WARNING, message="m"))
    assert await redis.xlen(keys.stream("alert", Priority.HIGH, None)) == 1


async def test_topic_argument_overrides_the_default_topic(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick(), topic="quotes")
    assert await redis.xlen(keys.stream("quotes", Priority.NORMAL, "BTC-USD")) == 1


async def test_invalid_topic_raises_publish_error_before_writing(redis, keys):
    async with Publisher(redis, keys=keys) as pub:
        with pytest.raises(PublishError, match="invalid topic"):
            await pub.publish(tick(), topic="bad topic")
    assert await redis.keys(f"{keys.ns}:*") == []


# ---- backpressure and limits -------------------------------------------------------------------------


async def test_backpressure_completes_every_concurrent_publish(redis, keys):
    # given a publisher whose buffer holds only 2 events
    events = [tick() for _ in range(200)]
    async with Publisher(redis, PublisherConfig(max_batch=2, max_buffer=2), keys=keys) as pub:
        # when 200 publishes run at once
        ids = await asyncio.gather(*(pub.publish(e) for e in events))
    # then every one completed with its own entry and nothing was dropped
    assert None not in ids
    assert len(set(ids)) == 200
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    stored = {decode_fields(f).event_id for _, f in await entries(redis, stream)}
    assert stored == {e.event_id for e in events}


async def test_backpressure_completes_concurrent_publish_many_calls(redis, keys):
    batches = [[tick() for _ in range(7)] for _ in range(20)]
    async with Publisher(redis, PublisherConfig(max_batch=3, max_buffer=5), keys=keys) as pub:
        results = await asyncio.gather(*(pub.publish_many(b) for b in batches))
    assert all(None not in r and len(r) == 7 for r in results)
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 140


async def test_calls_beyond_the_buffer_are_encoded_as_room_frees_not_before_the_first_send(redis, keys, monkeypatch):
    # given a publisher whose buffer holds two calls of 4 events, and a record of encodes and sends
    order: list[str] = []
    prepare, command = Publisher._prepare, Publisher._command  # (a batch's script call: each slot's on a cluster)
    monkeypatch.setattr(Publisher, "_prepare", lambda self, *a: order.append("encode") or prepare(self, *a))
    monkeypatch.setattr(Publisher, "_command", lambda self, items: order.append("send") or command(self, items))
    async with Publisher(redis, PublisherConfig(max_batch=4, max_buffer=8), keys=keys) as pub:
        # when 10 such calls are made at once (one of them given a generator)
        calls = [[tick() for _ in range(4)] for _ in range(10)]
        results = await asyncio.gather(*(pub.publish_many(iter(c) if i == 5 else c) for i, c in enumerate(calls)))
    # then the first batch went out after two encodes, not after all ten, and every event landed
    assert order.index("send") == 2 and order.count("encode") == 10
    assert all(None not in r and len(r) == 4 for r in results)
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 40


@pytest.mark.parametrize("when", ["waiting", "woken"])
async def test_close_lets_a_call_waiting_for_room_finish(redis, keys, when):
    # given a full buffer and a second call waiting for room in it
    pub = Publisher(redis, PublisherConfig(max_batch=4, max_buffer=4), keys=keys)
    first = asyncio.create_task(pub.publish_many([tick() for _ in range(4)]))
    await asyncio.sleep(0)  # (one loop pass: the first call buffers its events and starts the sender)
    second = asyncio.create_task(pub.publish_many([tick() for _ in range(4)]))
    await asyncio.sleep(0)  # (the sender is still connecting: nothing can be confirmed yet)
    assert pub._buffered == 4 and pub._waiting_room == 1
    if when == "woken":  # the first batch confirmed, the second call woken for room but not run yet
        while pub._buffered:
            await asyncio.sleep(0)
        assert pub._waiting_room == 1
    # when the publisher is closed
    await pub.close()
    # then both calls completed (the second one hung before: close stopped the sender under it) and all 8 landed
    async with asyncio.timeout(15):  # against a hang only
        results = [await first, await second]
    assert all(None not in r and len(r) == 4 for r in results)
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 8


async def test_event_too_large_is_raised_before_anything_is_written(redis, keys):
    # given a publisher with a small payload limit, and a batch whose last event exceeds it
    events = [tick(), tick(), tick(exchange="x" * 1000)]
    async with Publisher(redis, PublisherConfig(max_payload_bytes=500), keys=keys) as pub:
        # when the batch is published
        with pytest.raises(EventTooLarge):
            await pub.publish_many(events)
    # then nothing at all was written
    assert await redis.keys(f"{keys.ns}:*") == []


async def test_publisher_is_usable_after_event_too_large(redis, keys):
    async with Publisher(redis, PublisherConfig(max_payload_bytes=500), keys=keys) as pub:
        with pytest.raises(EventTooLarge):
            await pub.publish(tick(exchange="x" * 1000))
        assert await pub.publish(tick()) is not None


# ---- a reader in another language ---------------------------------------------------------------------


def _as_field_map(raw: object) -> dict[bytes, bytes]:
    """Fields as a map, whether the client paired them up or left RESP's flat list."""
    if isinstance(raw, dict):
        return raw
    flat = list(raw)  # type: ignore[call-overload]
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def test_plain_redis_and_generic_msgpack_reader_sees_the_documented_fields(redis, keys):
    # given a published Tick
    event = Tick(symbol="ETH-USD", bid=2000.25, ask=2000.5, bid_size=1.5, ask_size=2.0, exchange="X")
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(event)
    # when a reader uses only XRANGE and a schema-less msgpack decode
    stream = f"{keys.ns}:s:tick:normal:{{ETH-USD}}"
    [(entry_id, raw)] = await redis.execute_command("XRANGE", stream, "-", "+")
    fields = _as_field_map(raw)
    data = msgspec.msgpack.decode(fields[b"data"])
    # then it finds the documented envelope and the event as a plain map
    assert ENTRY_ID.match(entry_id.decode())
    assert (fields[b"type"], fields[b"v"], fields[b"enc"]) == (b"Tick", b"1", b"msgpack")
    assert isinstance(data, dict)
    assert data["type"] == "Tick"
    assert data["event_id"] == event.event_id and re.fullmatch(r"[0-9a-f]{32}", data["event_id"])
    assert data["ts_ns"] == event.ts_ns
    assert (data["symbol"], data["bid"], data["ask"]) == ("ETH-USD", 2000.25, 2000.5)
    assert (data["bid_size"], data["ask_size"], data["exchange"]) == (1.5, 2.0, "X")
    assert {"correlation_id", "causation_id", "producer", "schema_version"} <= data.keys()


async def test_generic_reader_sees_enums_as_strings_and_missing_options_as_nil(redis, keys):
    # given a published Alert (no symbol) and an Order (enum side, no limit price)
    alert = Alert(severity=Severity.WARNING, message="m")
    order = Order(symbol="A", order_id="o1", side=Side.SELL, quantity=2.0)
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(alert)
        await pub.publish(order)
    # when both are read with XRANGE and a schema-less msgpack decode
    decoded = []
    for stream in (keys.stream("alert", Priority.HIGH, None), keys.stream("order", Priority.HIGH, "A")):
        [(_, raw)] = await redis.execute_command("XRANGE", stream, "-", "+")
        decoded.append(msgspec.msgpack.decode(_as_field_map(raw)[b"data"]))
    alert_data, order_data = decoded
    # then enums are their string values and absent optional values are nil
    assert (alert_data["symbol"], alert_data["severity"]) == (None, "WARNING")
    assert (order_data["side"], order_data["order_type"], order_data["price"]) == ("SELL", "MARKET", None)


# ---- Redis errors (real server only) -----------------------------------------------------------------


@pytest.mark.real_only
async def test_unreachable_redis_raises_redis_unavailable_saying_how_to_fix():
    # given a client for a port nothing listens on
    client = connect("redis://127.0.0.1:1/0")
    try:
        async with Publisher(client, PublisherConfig(dedup_window_ms=0, retries=0)) as pub:
            # when an event is published
            with pytest.raises(RedisUnavailable) as info:
                await pub.publish(tick())
    finally:
        await client.aclose()
    # then the error says what to check and how to point fabric elsewhere
    message = str(info.value)
    assert "is redis-server running?" in message
    assert "FABRIC_REDIS_URL" in message


@pytest.mark.real_only
async def test_wrong_password_raises_authentication_failed(redis, redis_url, keys):
    # given an ACL user with a password
    user = f"u_{uuid.uuid4().hex[:12]}"
    await on_every_node(redis, "ACL", "SETUSER", user, "on", ">secret", "~*", "+@all")
    client = connect(with_user(redis_url, user, "wrong"))
    try:
        async with Publisher(client, keys=keys) as pub:
            # when it publishes with the wrong password
            with pytest.raises(AuthenticationFailed) as info:
                await pub.publish(tick())
    finally:
        await client.aclose()
        await on_every_node(redis, "ACL", "DELUSER", user)
    # then the error says where the password goes
    assert "password" in str(info.value)


@pytest.mark.real_only
async def test_right_password_publishes(redis, redis_url, keys):
    user = f"u_{uuid.uuid4().hex[:12]}"
    await on_every_node(redis, "ACL", "SETUSER", user, "on", ">secret", "~*", "+@all")
    client = connect(with_user(redis_url, user, "secret"))
    try:
        async with Publisher(client, keys=keys) as pub:
            assert await pub.publish(tick()) is not None
    finally:
        await client.aclose()
        await on_every_node(redis, "ACL", "DELUSER", user)


@pytest.fixture
def small_server(tmp_path):
    """A redis-server of its own, so filling its memory leaves the session server alone."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.mark.real_only
async def test_out_of_memory_is_reported_and_publisher_recovers_after_flush(small_server, keys):
    # given a server that refuses writes past its memory limit (noeviction). The limit is set relative to
    # the empty server's own usage (about 1 MB above it), so the test does not depend on the build's baseline
    client = connect(small_server.url)
    try:
        used = (await client.info("memory"))["used_memory"]
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", str(used + (1 << 20)))
        async with Publisher(client, keys=keys) as pub:
            # when events are published until Redis refuses one
            error = None
            for _ in range(2_000):  # 2000 x 16 KiB is far past the limit
                try:
                    await pub.publish(tick(exchange="x" * 16_384))
                except RedisOutOfMemory as exc:
                    error = exc
                    break
            # then the caller got RedisOutOfMemory, saying what to do
            assert error is not None, "publishing 32 MiB never hit maxmemory"
            assert "maxmemory" in str(error)
            # and once memory is freed the same publisher works again
            await client.flushall()
            assert await pub.publish(tick()) is not None
    finally:
        await client.aclose()


# ---- round trips ---------------------------------------------------------------------------------------


async def _calls(redis, command: str) -> int:
    return await command_calls(redis, command)


@pytest.mark.real_only
async def test_a_batch_costs_one_script_call_and_a_new_stream_one_registration(redis, keys):
    # given a publisher with batches of 500, its script loaded (as after its first call), 1,000 events, 4 symbols
    await redis.script_load(scripts.PUBLISH.source)
    events = [tick(symbol=f"S{i % 4}") for i in range(1000)]
    before = (await _calls(redis, "evalsha"), await _calls(redis, "sadd"))
    # when they are published
    async with Publisher(redis, PublisherConfig(max_batch=500), keys=keys) as pub:
        await pub.publish_many(events)
    # then Redis saw two script calls (one per batch; on a cluster, one per batch and slot) and one SADD per new
    # stream, nothing per event
    after = (await _calls(redis, "evalsha"), await _calls(redis, "sadd"))
    slots = len({slot_of(keys.stream("tick", Priority.NORMAL, f"S{i}")) for i in range(4)}) if is_cluster(redis) else 1
    assert (after[0] - before[0], after[1] - before[1]) == (2 * slots, 4)


# ---- resends: exactly once per producer session --------------------------------------------------------


def _script_args(session: str, first_seq: int, n: int) -> list[object]:
    args: list[object] = [session, 1, 0, 60_000, "msgpack", 1, first_seq, n]  # one stream: its first number, count
    for i in range(n):
        args += ("Tick", msgspec.msgpack.encode(tick(bid_size=float(i))))
    return args


async def test_a_resent_batch_that_had_landed_writes_nothing(redis, keys):
    # given a batch of 3 events of session S, numbered 1..3, that landed
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    ks = [stream, keys.producers(stream)]
    first = await scripts.PUBLISH(redis, ks, _script_args("0" * 20, 1, 3))
    # when the same batch arrives again (its reply was lost and the publisher resent it)
    second = await scripts.PUBLISH(redis, ks, _script_args("0" * 20, 1, 3))
    # then the resend reports every event as already written and the stream holds each once
    assert all(first) and second == [None, None, None]
    assert await redis.xlen(stream) == 3


async def test_a_batch_that_would_leave_a_hole_is_refused_whole(redis, keys):
    # given session S has written events 1..2 of a stream
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    ks = [stream, keys.producers(stream)]
    await scripts.PUBLISH(redis, ks, _script_args("0" * 20, 1, 2))
    # when a batch numbered from 4 arrives (batch 3 never landed)
    with pytest.raises(Exception, match="GAP") as info:
        await scripts.PUBLISH(redis, ks, _script_args("0" * 20, 4, 2))
    # then it is refused with GAP and writes nothing
    assert "GAP" in str(info.value)
    assert await redis.xlen(stream) == 2


async def test_publisher_resends_a_batch_whose_reply_was_lost_without_duplicating(redis, keys, monkeypatch):
    # given a publisher whose connection drops right after Redis has answered its first batch
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick())  # connects
        conn = pub._conn
        assert conn is not None or is_cluster(redis)
        kind = type(conn) if conn is not None else RedisConnection  # on a cluster: the nodes' connections
        real_read = kind.read_response
        dropped = []

        async def lose_first_reply(self, *args, **kwargs):
            reply = await real_read(self, *args, **kwargs)
            if not dropped:
                dropped.append(reply)
                await self.disconnect(nowait=True)
                raise ConnectionError("reply lost")
            return reply

        monkeypatch.setattr(kind, "read_response", lose_first_reply)
        # when a batch of 10 is published: it lands, its reply is lost, the publisher resends it
        ids = await pub.publish_many([tick(bid_size=float(i)) for i in range(10)])
    # then the batch did land once: 11 entries in all, and the resend wrote nothing (ids None: already written)
    assert dropped, "the reply was never dropped"
    assert await redis.xlen(keys.stream("tick", Priority.NORMAL, "BTC-USD")) == 11
    assert ids == [None] * 10


async def test_publisher_renews_its_session_when_redis_lost_its_sequence_numbers(redis, keys):
    # given a publisher that has written to a stream
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([tick() for _ in range(5)])
        # when Redis loses the session's numbers (restart without persistence of that key, or a FLUSHDB)
        await redis.delete(keys.producers(stream))
        # then the next publish still lands (a GAP, a new session, a resend), once
        ids = await pub.publish_many([tick() for _ in range(5)])
    assert all(ids)
    assert await redis.xlen(stream) == 10


@pytest.mark.real_only
async def test_publisher_reconnects_after_its_connection_is_killed(redis, keys):
    # given a publisher whose connection Redis has closed
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick())
        await on_every_node(redis, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        # when it publishes again
        ids = await pub.publish_many([tick() for _ in range(20)])
    # then every event lands once
    assert all(ids)
    assert await redis.xlen(stream) == 21


# ---- review of the pipelined publisher: order, sessions, refusals, connections --------------------------

HANG_S = 5.0
"""How long a call that should return at once may take before the test calls it hung."""


@pytest.fixture
async def private_redis(request, backend, tmp_path):
    """A Redis no other test shares (a redis-server of its own, or a fresh fakeredis): FLUSHALL, SCRIPT FLUSH
    and restarts here touch nobody else's keys."""
    if backend == "fake":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield client
        await client.aclose()
        return
    request.getfixturevalue("redis_server")  # skips without redis-server (fails under CI), like the shared one
    server = RedisServer(tmp_path)
    client = connect(server.url)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


def _caller_events(caller: int, symbols: list[str], n: int) -> list[Tick]:
    """n ticks of one caller spread over the symbols; ``exchange`` names the caller, ``bid_size`` the rank."""
    return [
        Tick(symbol=symbols[(i * 7 + caller) % len(symbols)], bid=1.0, ask=2.0, bid_size=float(i),
             exchange=f"c{caller}")
        for i in range(n)
    ]


async def _assert_each_callers_order_per_stream(redis, keys, symbols: list[str], sent: list[list[Tick]]) -> None:
    """Every stream holds every caller's events for it exactly once, in the order that caller published them."""
    for symbol in symbols:
        stored = [decode_fields(f) for _, f in await redis.xrange(keys.stream("tick", Priority.NORMAL, symbol))]
        assert len(stored) == sum(1 for events in sent for e in events if e.symbol == symbol)
        for caller, events in enumerate(sent):
            mine = [e.event_id for e in stored if e.exchange == f"c{caller}"]
            assert mine == [e.event_id for e in events if e.symbol == symbol], (symbol, caller)


async def _publish_in_calls(pub: Publisher, events: list[Tick], per_call: int) -> list[str | None]:
    ids: list[str | None] = []
    for i in range(0, len(events), per_call):
        ids += await pub.publish_many(events[i : i + per_call])
    return ids


async def test_concurrent_publish_many_calls_over_20_symbols_keep_each_callers_order_per_stream(redis, keys):
    # given 8 callers, each with 100 ticks over 20 symbols, and a publisher with small batches: each call is
    # split into several, queued behind the batches on the wire
    symbols = [f"S{i}" for i in range(20)]
    sent = [_caller_events(c, symbols, 100) for c in range(8)]
    async with Publisher(redis, PublisherConfig(max_batch=8), keys=keys) as pub:
        # when they all publish at once, each in successive publish_many calls of 50
        results = await asyncio.gather(*(_publish_in_calls(pub, events, 50) for events in sent))
    # then every event got an entry id, and each stream holds each caller's events once, in its order
    assert all(len(ids) == 100 and None not in ids for ids in results)
    await _assert_each_callers_order_per_stream(redis, keys, symbols, sent)


async def test_sequence_gaps_with_batches_in_flight_lose_and_double_nothing(redis, keys):
    # given 8 callers publishing over 20 symbols, and Redis losing every stream's producer numbers over and over
    # meanwhile (each loss makes the next batch of that stream a GAP: refused, session renewed, resent in order)
    symbols = [f"S{i}" for i in range(20)]
    producers = [keys.producers(keys.stream("tick", Priority.NORMAL, s)) for s in symbols]
    sent = [_caller_events(c, symbols, 100) for c in range(8)]
    done = asyncio.Event()

    async def lose_sequences() -> int:
        lost = 0
        while not done.is_set():
            lost += await redis.delete(*producers)
            await asyncio.sleep(0)
        return lost

    loser = asyncio.create_task(lose_sequences())
    try:
        async with Publisher(redis, PublisherConfig(max_batch=16, max_buffer=48), keys=keys) as pub:
            # when they all publish at once
            results = await asyncio.gather(*(_publish_in_calls(pub, events, 20) for events in sent))
    finally:
        done.set()
        lost = await loser
    # then the numbers were lost mid-stream, yet every event landed once, in each caller's order per stream
    assert lost > 0
    assert all(len(ids) == 100 and None not in ids for ids in results)
    await _assert_each_callers_order_per_stream(redis, keys, symbols, sent)


async def test_closing_a_publisher_that_never_published_does_not_connect():
    # given a publisher on a client for a port nothing listens on
    client = connect("redis://127.0.0.1:1/0")
    try:
        pub = Publisher(client)
        # when it is closed without having published, then it returns at once, without an error
        await asyncio.wait_for(pub.close(), HANG_S)
        async with Publisher(client):
            pass
    finally:
        await client.aclose()


async def test_closing_a_publisher_that_never_published_opens_no_connection():
    # given a publisher on a client for a listening socket that counts who connects
    accepted: list[bool] = []

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0")
    try:
        # when a publisher is opened and closed without publishing
        async with Publisher(client):
            pass
        # then nothing connected (a connection would be counted on the next pass of the loop, so give it a few)
        for _ in range(10):
            await asyncio.sleep(0)
        assert accepted == []
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_publishing_after_flushall_writes_each_event_once(private_redis, keys):
    # given a publisher that has written to three streams
    redis = private_redis
    symbols = ["A", "B", "C"]
    async with Publisher(redis, PublisherConfig(max_batch=4), keys=keys) as pub:
        await pub.publish_many([tick(s) for s in symbols * 3])
        # when Redis loses everything (FLUSHALL: the streams and the session's numbers), and it publishes again
        await redis.flushall()
        later = [tick(s, bid_size=float(i)) for i in range(5) for s in symbols]
        ids = await asyncio.wait_for(pub.publish_many(later), HANG_S)
    # then every new event has an entry, and each stream holds exactly the new events, once, in order
    assert None not in ids
    for s in symbols:
        stored = [decode_fields(f).event_id for _, f in await redis.xrange(keys.stream("tick", Priority.NORMAL, s))]
        assert stored == [e.event_id for e in later if e.symbol == s]


async def test_publishing_after_script_flush_writes_each_event_once(private_redis, keys):
    # given a publisher that has published (its script is loaded)
    redis = private_redis
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    async with Publisher(redis, keys=keys) as pub:
        first = [tick() for _ in range(5)]
        await pub.publish_many(first)
        # when Redis forgets its scripts between two batches (SCRIPT FLUSH)
        await redis.script_flush()
        later = [tick() for _ in range(5)]
        ids = await asyncio.wait_for(pub.publish_many(later), HANG_S)
    # then the later batch still lands, once, after the first
    assert None not in ids
    stored = [decode_fields(f).event_id for _, f in await redis.xrange(stream)]
    assert stored == [e.event_id for e in first + later]


@pytest.mark.real_only
async def test_publisher_carries_on_after_redis_restarts_with_nothing_kept(tmp_path, keys, monkeypatch, request):
    # given a publisher that has written to a Redis of its own, which keeps nothing across a restart
    request.getfixturevalue("redis_server")  # skips without redis-server (fails under CI)
    server = RedisServer(tmp_path)
    client = connect(server.url)
    stream = keys.stream("tick", Priority.NORMAL, "BTC-USD")
    try:
        async with Publisher(client, keys=keys) as pub:
            await pub.publish_many([tick() for _ in range(5)])
            # when Redis restarts on the same port (its connection cut, its streams and numbers gone)
            server.stop()
            monkeypatch.setattr(conftest, "_free_port", lambda: server.port)
            server = RedisServer(tmp_path)
            # and it publishes again
            later = [tick() for _ in range(5)]
            ids = await asyncio.wait_for(pub.publish_many(later), HANG_S)
        # then the new events land, each once, in order (read on a fresh client: the pool's went with the restart)
        assert None not in ids
        reader = connect(server.url)
        try:
            stored = [decode_fields(f).event_id for _, f in await reader.xrange(stream)]
        finally:
            await reader.aclose()
        assert stored == [e.event_id for e in later]
    finally:
        await client.aclose()
        server.stop()



async def _cut_publisher_connections(redis) -> int:
    """Close every connection whose last command was a publish batch (the publishers' own); return how many."""
    return await kill_clients(redis, lambda c: c.get("cmd") == "evalsha")


@pytest.mark.real_only
async def test_connections_cut_again_and_again_mid_stream_lose_and_double_nothing(redis, redis_url, keys):
    # given 8 callers publishing over 20 symbols through a publisher of its own client, and Redis cutting that
    # publisher's connection five times meanwhile, each time after more events landed (batches on the wire are
    # resent on a new connection; what had landed is recognised by its sequence number and not written again)
    symbols = [f"S{i}" for i in range(20)]
    streams = [keys.stream("tick", Priority.NORMAL, s) for s in symbols]
    sent = [_caller_events(c, symbols, 100) for c in range(8)]
    done = asyncio.Event()

    async def landed() -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            return sum(await pipe.execute())

    async def cut_five_times() -> int:
        cuts, last = 0, 0
        while cuts < 5 and not done.is_set():
            now = await landed()
            if now >= last + 50:
                cuts += await _cut_publisher_connections(redis)
                last = now
            await asyncio.sleep(0)
        return cuts

    client = connect(redis_url)
    cutter = asyncio.create_task(cut_five_times())
    try:
        async with Publisher(client, PublisherConfig(max_batch=8), keys=keys) as pub:
            # when they all publish at once
            results = await asyncio.gather(*(_publish_in_calls(pub, events, 50) for events in sent))
    finally:
        done.set()
        cuts = await cutter
        await client.aclose()
    # then the connection was cut, yet every event landed once, in each caller's order per stream
    assert cuts > 0
    assert all(len(ids) == 100 for ids in results)
    await _assert_each_callers_order_per_stream(redis, keys, symbols, sent)


@pytest.mark.real_only
async def test_close_returns_after_a_refused_reconnect_failed_the_unconfirmed_batch(redis, redis_url, keys):
    # given a publisher of an ACL user that has published once
    user = f"u_{uuid.uuid4().hex[:12]}"
    await on_every_node(redis, "ACL", "SETUSER", user, "on", ">secret", "~*", "+@all")
    client = connect(with_user(redis_url, user, "secret"))
    pub = Publisher(client, keys=keys)
    closing: asyncio.Task[None] | None = None
    try:
        await pub.publish(tick())
        # when its password changes and its connections are cut, so that the next batch is resent on a new
        # connection, which Redis refuses
        await on_every_node(redis, "ACL", "SETUSER", user, "resetpass", ">changed")
        await on_every_node(redis, "CLIENT", "KILL", "USER", user)
        with pytest.raises(AuthenticationFailed):
            await asyncio.wait_for(pub.publish(tick()), HANG_S)
        # then the publisher still closes
        closing = asyncio.create_task(pub.close())
        await asyncio.wait({closing}, timeout=HANG_S)
        assert closing.done(), "Publisher.close() hangs with nothing buffered"
    finally:
        if closing is not None and not closing.done():  # leave no task or socket behind for the next test
            closing.cancel()
            await asyncio.gather(closing, return_exceptions=True)
            if pub._task is not None:
                pub._task.cancel()
                await asyncio.gather(pub._task, return_exceptions=True)
            if pub._conn is not None:
                await pub._conn.disconnect()
        await client.aclose()
        await on_every_node(redis, "ACL", "DELUSER", user)


@pytest.mark.real_only
async def test_a_batch_no_replica_confirmed_in_time_is_still_written_and_counted_under_replicated(redis, keys):
    # given a publisher that asks one replica to confirm each batch, on servers that have none
    events = [Tick(symbol=f"R{i}", bid=1.0, ask=2.0) for i in range(12)]
    async with Publisher(redis, PublisherConfig(wait_replicas=1, wait_timeout_ms=5), keys=keys) as pub:
        # when it publishes
        ids = await pub.publish_many(events)
        # then every event is written and confirmed, and counted as not replicated in time
        assert None not in ids
        assert pub.under_replicated == len(events)
    for e in events:
        assert await redis.xlen(keys.stream("tick", Priority.NORMAL, e.symbol)) == 1


@pytest.mark.real_only
async def test_a_batch_over_many_slots_waits_for_replicas_once_per_node(redis, backend, keys):
    # given a batch over 30 symbols (30 slots: on a cluster, every node has several)
    events = [Tick(symbol=f"W{i}", bid=1.0, ask=2.0) for i in range(30)]
    async with Publisher(redis, PublisherConfig(wait_replicas=1, wait_timeout_ms=5), keys=keys) as pub:
        await pub.publish_many(events[:1])  # (connected, the script loaded)
        before = await command_calls(redis, "wait")
        # when it is published
        await pub.publish_many(events)
        # then each node was asked to WAIT once (a WAIT covers every write before it on its connection)
        nodes = len(await on_every_node(redis, "PING"))
        assert await command_calls(redis, "wait") - before == nodes


class _RedirectingLine:
    """A cluster line on which the first part was redirected and written again after its node's WAIT."""

    def __init__(self) -> None:
        self.waits_at: list[str] = []

    async def node_for(self, key: str) -> Any:
        return type("Node", (), {"name": "n1"})()

    async def call_many(self, commands: list[Any], keys: list[Any], resent: list[int]) -> list[Any]:
        resent.append(0)
        return [[b"1-0"], [b"2-0"], 1]  # the two parts written; the node's WAIT saw its replica

    async def call_at(self, key: str, *args: Any) -> Any:
        self.waits_at.append(key)
        return 0  # where the redirected part landed, no replica had it in time


async def test_a_part_written_again_after_a_redirect_waits_for_replicas_on_its_own():
    # given a publisher asking one replica, whose first part was redirected (its write came after the WAIT)
    pub = Publisher(fakeredis.FakeAsyncRedis(), PublisherConfig(wait_replicas=1, wait_timeout_ms=5))
    parts = [_Part(("EVALSHA", "sha", 1, key), [i], [], [], "s") for i, key in enumerate(["{a}k", "{b}k"])]
    line = _RedirectingLine()
    # when the parts are sent
    replies = await pub._call_parts(line, parts)  # type: ignore[arg-type]
    # then the redirected part got a WAIT of its own, whose answer counts (not the first node's)
    assert replies == [[b"1-0"], [b"2-0"]]
    assert line.waits_at == ["{a}k"]
    assert pub.under_replicated == 1
