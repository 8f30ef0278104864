"""A topic's history as a library: time parsing, ranges merged across streams, tail, replay, and the trim plan
(which must say exactly what trim.lua then does)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import msgspec
import pytest

from fabric import Publisher, Retention
from fabric.codec import decode_fields, encode
from fabric.errors import NotFound, Reject, Retry
from fabric.events import Bar, Event, Indicator, Tick
from fabric.handler import Context, as_handler
from fabric.history import (
    Entry,
    Filters,
    TimeRange,
    derived_id,
    parse_time,
    read_range,
    replay_into,
    replay_to_handler,
    tail,
    trim_now,
    trim_plan,
)
from fabric.keys import Keys, Priority
from fabric.nodes import is_cluster
from fabric.retention import plan_stream, trim_stream
from tests.waiting import eventually

NOW_MS = 1_700_000_000_000
EVERYTHING = TimeRange("0-0", f"{2**63}-0")


def tick(symbol: str, bid: float = 1.0) -> Tick:
    return Tick(symbol=symbol, bid=bid, ask=bid + 1)


async def put(redis: Any, keys: Keys, event: Event, entry_id: str = "*", *, topic: str = "tick",
              priority: Priority = Priority.NORMAL) -> str:
    """XADD an event with a chosen entry id and register its stream, as a publisher would."""
    stream = keys.stream(topic, priority, event.symbol)
    enc = encode(event)
    new = await redis.xadd(stream, {"type": enc.type, "v": "1", "enc": enc.enc, "data": enc.data}, id=entry_id)
    await redis.sadd(keys.topic_registry(topic), stream)
    return str(new.decode())


async def collect(entries: Any, n: int | None = None) -> list[Entry]:
    got = []
    async with aclosing(entries) as it:
        async for entry in it:
            got.append(entry)
            if n is not None and len(got) >= n:
                break
    return got


async def events_of(redis: Any, keys: Keys, topic: str) -> list[tuple[str, Event]]:
    """(stream, event) of every entry of a topic, in stream-key then entry order."""
    out = []
    for stream in sorted(await redis.smembers(keys.topic_registry(topic))):
        out += [(stream.decode(), decode_fields(fields)) for _, fields in await redis.xrange(stream)]
    return out


# ---- positions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1700000000000-3", "1700000000000-3"),
    ("1700000000000", 1_700_000_000_000),
    ("10m", NOW_MS - 600_000),
    ("1h", NOW_MS - 3_600_000),
    ("1.5s", NOW_MS - 1_500),
    ("250ms", NOW_MS - 250),
    ("2d", NOW_MS - 2 * 86_400_000),
    ("2023-11-14T22:13:20+00:00", NOW_MS),
    ("2023-11-14T22:13:20.5Z", NOW_MS + 500),
])
def test_parse_time_reads_ids_ms_iso_and_ages(text: str, expected: int | str) -> None:
    assert parse_time(text, NOW_MS) == expected


@pytest.mark.parametrize("text", ["yesterday", "10 minutes", "-5m", "1700000000000-", ""])
def test_parse_time_refuses_what_it_cannot_read_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="entry id"):
        parse_time(text, NOW_MS)


def test_time_range_covers_whole_milliseconds_and_refuses_a_backward_range() -> None:
    assert TimeRange.of(5, 7) == TimeRange("5-0", f"7-{2**64 - 1}")
    assert TimeRange.of("5-3", 7).span_ms == 3
    assert TimeRange.of(5, 10_000).until(9) == TimeRange("5-0", f"9-{2**64 - 1}")
    with pytest.raises(ValueError, match="swap"):
        TimeRange.of("9-0", 8)


def test_derived_ids_are_stable_time_sortable_and_differ_by_target() -> None:
    original = tick("A").event_id
    assert derived_id(original, "x") == derived_id(original, "x") != derived_id(original, "y")
    assert derived_id(original, "x")[:12] == original[:12] and len(derived_id(original, "x")) == 32


# ---- read_range ----------------------------------------------------------------------------------------------


async def test_read_range_merges_every_stream_in_entry_id_order_within_bounds(redis, keys) -> None:
    # given entries of three streams (two symbols, two priorities) interleaved in time
    layout = [("A", "100-0"), ("B", "100-1"), ("A", "101-0"), ("C", "102-0"), ("B", "103-0"), ("A", "104-0")]
    for symbol, entry_id in layout:
        await put(redis, keys, tick(symbol), entry_id, priority=Priority.HIGH if symbol == "C" else Priority.NORMAL)
    # when the range 100-1 .. 103 is read, a page of two at a time
    got = await collect(read_range(redis, keys, "tick", TimeRange.of("100-1", 103), page=2))
    # then it comes in entry-id order across the streams, bounds included
    assert [(e.entry_id, e.stream.symbol) for e in got] == [("100-1", "B"), ("101-0", "A"), ("102-0", "C"),
                                                            ("103-0", "B")]
    assert got[2].stream.priority is Priority.HIGH
    assert all(isinstance(e.event, Tick) and e.event.symbol == e.stream.symbol for e in got)


async def test_read_range_keeps_only_the_types_symbols_and_priorities_asked_for(redis, keys) -> None:
    await put(redis, keys, tick("A"), "1-0")
    await put(redis, keys, Bar(symbol="A", timeframe="1m", start_ns=0, open=1, high=2, low=0, close=1), "2-0")
    await put(redis, keys, tick("B"), "3-0")
    await put(redis, keys, tick("A"), "4-0", priority=Priority.HIGH)
    only = Filters(types={"Tick"}, symbols={"A"}, priorities={Priority.NORMAL})
    got = await collect(read_range(redis, keys, "tick", EVERYTHING, filters=only))
    assert [e.entry_id for e in got] == ["1-0"]


async def test_read_range_yields_an_undecodable_entry_with_its_reason(redis, keys) -> None:
    # given a good entry, then one of garbage bytes
    await put(redis, keys, tick("A"), "1-0")
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xadd(stream, {"type": "Tick", "v": "1", "enc": "msgpack", "data": b"\xc1garbage"}, id="2-0")
    # when read
    got = await collect(read_range(redis, keys, "tick", EVERYTHING))
    # then the bad one is there, not decoded, saying why
    assert got[0].event is not None
    assert got[1].event is None and got[1].type == "Tick" and got[1].error


async def test_read_range_of_a_topic_without_streams_is_not_found(redis, keys) -> None:
    with pytest.raises(NotFound, match="no streams"):
        await collect(read_range(redis, keys, "nosuch", EVERYTHING))


# ---- tail ----------------------------------------------------------------------------------------------------


async def test_tail_from_a_time_yields_what_is_there_from_then_on(redis, keys) -> None:
    for symbol, entry_id in [("A", "10-0"), ("B", "20-0"), ("A", "30-0"), ("B", "30-5")]:
        await put(redis, keys, tick(symbol), entry_id)
    got = await collect(tail(redis, keys, "tick", start=20), 3)
    assert [e.entry_id for e in got] == ["20-0", "30-0", "30-5"]


async def test_tail_from_an_entry_id_includes_that_entry(redis, keys) -> None:
    for entry_id in ("10-0", "10-1", "10-2"):
        await put(redis, keys, tick("A"), entry_id)
    got = await collect(tail(redis, keys, "tick", start="10-1"), 2)
    assert [e.entry_id for e in got] == ["10-1", "10-2"]


async def test_tail_filters_by_type_and_symbol(redis, keys) -> None:
    await put(redis, keys, tick("A"), "1-0")
    await put(redis, keys, Bar(symbol="A", timeframe="1m", start_ns=0, open=1, high=2, low=0, close=1), "2-0")
    await put(redis, keys, tick("B"), "3-0")
    await put(redis, keys, tick("A"), "4-0")
    got = await collect(tail(redis, keys, "tick", start=0, filters=Filters(types={"Tick"}, symbols={"A"})), 2)
    assert [e.entry_id for e in got] == ["1-0", "4-0"]


async def test_tail_of_a_topic_without_streams_is_not_found(redis, keys) -> None:
    with pytest.raises(NotFound):
        await collect(tail(redis, keys, "nosuch"), 1)


async def xread_blocked(redis: Any) -> bool:
    if is_cluster(redis):  # the tail's connections are on the nodes serving its streams
        clients = [c for node in (await redis.client_list(target_nodes="all")).values() for c in node]
    else:
        clients = await redis.client_list()
    return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients)


@pytest.mark.real_only
async def test_tail_follows_new_entries_and_new_symbols_streams_from_their_start(redis, keys) -> None:
    # given a topic with old entries and a tail of only what is new
    await put(redis, keys, tick("A", 1.0))
    got: list[Entry] = []

    async def follow() -> None:
        got.extend(await collect(tail(redis, keys, "tick", discover_ms=50), 3))

    task = asyncio.create_task(follow())
    await eventually(lambda: xread_blocked(redis), what="the tail blocked in XREAD")
    # when an entry lands on the old stream, then a new symbol's stream appears with two entries
    await put(redis, keys, tick("A", 2.0))
    await put(redis, keys, tick("Z", 3.0))
    await put(redis, keys, tick("Z", 4.0))
    await asyncio.wait_for(task, 15)
    # then the tail saw the new entry and the new stream from its first entry, not the old entry
    assert [(e.stream.symbol, e.event.bid) for e in got if isinstance(e.event, Tick)] == [
        ("A", 2.0), ("Z", 3.0), ("Z", 4.0)]


@pytest.mark.real_only
async def test_tail_joins_no_group(redis, keys) -> None:
    stream_id = await put(redis, keys, tick("A"))
    await collect(tail(redis, keys, "tick", start=stream_id), 1)
    assert await redis.xinfo_groups(keys.stream("tick", Priority.NORMAL, "A")) == []


# ---- replay --------------------------------------------------------------------------------------------------


async def publish(redis: Any, keys: Keys, events: list[Event], priority: str | None = None) -> None:
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many(events, "tick", priority)


async def test_replay_into_copies_events_at_their_priority_under_derived_ids(redis, keys) -> None:
    # given ticks of two symbols, one of them at high priority
    normal, high = [tick("A", 1.0), tick("B", 2.0)], [tick("A", 3.0)]
    await publish(redis, keys, normal)
    await publish(redis, keys, high, "high")
    # when the whole range is replayed into another topic
    result = await replay_into(redis, keys, "tick", EVERYTHING, "copy")
    # then every event is there once, equal but for a derived id, in a stream of the same priority and symbol
    assert (result.read, result.done, result.published, result.duplicates) == (3, 3, 3, 0)
    copies = await events_of(redis, keys, "copy")
    originals = {e.event_id: e for e in normal + high}
    by_derived = {derived_id(i, "copy"): e for i, e in originals.items()}
    assert sorted(c.event_id for _, c in copies) == sorted(by_derived)
    for stream, copy in copies:
        original = by_derived[copy.event_id]
        assert msgspec.structs.replace(original, event_id=copy.event_id) == copy
        assert stream == keys.stream("copy", Priority.HIGH if original in high else Priority.NORMAL, copy.symbol)


async def test_replaying_the_same_range_twice_within_the_window_adds_nothing(redis, keys) -> None:
    await publish(redis, keys, [tick("A"), tick("B")])
    await replay_into(redis, keys, "tick", EVERYTHING, "copy")
    again = await replay_into(redis, keys, "tick", EVERYTHING, "copy")
    assert (again.published, again.duplicates) == (0, 2)
    assert len(await events_of(redis, keys, "copy")) == 2


async def test_replay_without_a_dedup_window_is_at_least_once(redis, keys) -> None:
    await publish(redis, keys, [tick("A")])
    await replay_into(redis, keys, "tick", EVERYTHING, "copy", dedup_window_ms=0)
    await replay_into(redis, keys, "tick", EVERYTHING, "copy", dedup_window_ms=0)
    assert len(await events_of(redis, keys, "copy")) == 2


async def test_replay_into_reports_progress_over_the_range(redis, keys) -> None:
    for entry_id in ("100-0", "150-0", "180-0"):
        await put(redis, keys, tick("A"), entry_id)
    seen: list[int] = []
    await replay_into(redis, keys, "tick", TimeRange.of(100, 200), "copy", advance=seen.append)
    assert sum(seen) == 80 and all(n > 0 for n in seen)


async def mid(event: Tick, ctx: Context) -> Indicator:
    return Indicator(symbol=event.symbol, name="mid", value=(event.bid + event.ask) / 2)


def handler(fn: Any, name: str = "tests.mid") -> tuple[str, Any]:
    return name, as_handler(fn, name)


async def test_replay_to_handler_publishes_its_outputs_as_a_worker_would(redis, keys) -> None:
    # given two ticks
    ticks = [tick("A", 1.0), tick("B", 3.0)]
    await publish(redis, keys, ticks)
    # when replayed through a handler that returns an indicator, into an output topic
    result = await replay_to_handler(redis, keys, "tick", EVERYTHING, handler(mid), output_topic="mids")
    # then each output is published, stamped with its cause, and the counts say so
    assert (result.read, result.done, result.published, result.stopped_at) == (2, 2, 2, None)
    outputs = {e.causation_id: e for _, e in await events_of(redis, keys, "mids")}
    for t in ticks:
        out = outputs[t.event_id]
        assert isinstance(out, Indicator) and out.value == t.bid + 0.5 and out.symbol == t.symbol
        assert out.correlation_id == t.event_id and out.producer == "tests.mid"


async def test_replay_to_handler_twice_publishes_each_output_once(redis, keys) -> None:
    await publish(redis, keys, [tick("A")])
    await replay_to_handler(redis, keys, "tick", EVERYTHING, handler(mid), output_topic="mids")
    again = await replay_to_handler(redis, keys, "tick", EVERYTHING, handler(mid), output_topic="mids")
    assert (again.published, again.duplicates) == (0, 1)


async def test_replay_to_handler_stops_at_a_failure_naming_the_entry(redis, keys) -> None:
    # given three ticks, the second of which the handler fails on
    for entry_id, bid in (("1-0", 1.0), ("2-0", -1.0), ("3-0", 2.0)):
        await put(redis, keys, tick("A", bid), entry_id)

    async def fragile(event: Tick) -> Indicator:
        if event.bid < 0:
            raise ZeroDivisionError("negative bid")
        return await mid(event, None)  # type: ignore[arg-type]

    # when replayed
    result = await replay_to_handler(redis, keys, "tick", EVERYTHING, handler(fragile), output_topic="mids")
    # then it stopped there, after publishing the first one's output, and says where and why
    assert result.stopped_at == f"{keys.stream('tick', Priority.NORMAL, 'A')} 2-0"
    assert result.error == "ZeroDivisionError: negative bid"
    assert (result.read, result.done, result.published) == (2, 1, 1)
    assert len(await events_of(redis, keys, "mids")) == 1


async def test_replay_to_handler_counts_rejects_and_honours_retry(redis, keys) -> None:
    for entry_id, bid in (("1-0", 1.0), ("2-0", -1.0)):
        await put(redis, keys, tick("A", bid), entry_id)
    calls: list[int] = []

    async def picky(event: Tick, ctx: Context) -> None:
        calls.append(ctx.delivery_count)
        if event.bid < 0:
            raise Reject("negative bid")
        if ctx.delivery_count == 1:
            raise Retry(0)

    result = await replay_to_handler(redis, keys, "tick", EVERYTHING, handler(picky))
    assert (result.done, result.rejected, result.stopped_at) == (2, 1, None)
    assert calls == [1, 2, 1]


# ---- trim plan -----------------------------------------------------------------------------------------------


async def fill(redis: Any, stream: str, ids: list[str]) -> None:
    for entry_id in ids:
        await redis.xadd(stream, {"i": entry_id}, id=entry_id)


async def group_state(redis: Any, stream: str, group: str, read: int, acked: int) -> None:
    """A group that has read ``read`` entries and acknowledged the first ``acked`` of them."""
    await redis.xgroup_create(stream, group, id="0")
    if read:
        reply = await redis.xreadgroup(group, "c", {stream: ">"}, count=read)
        ids = [i for i, _ in reply[0][1]][:acked]
        if ids:
            await redis.xack(stream, group, *ids)


def ids(n: int, ms: int = 1000) -> list[str]:
    return [f"{ms + i}-0" for i in range(n)]


TRIM_CASES = {
    "count, no groups": ([], Retention(max_len=4), (10, 6, 0, 0)),
    "count, a group acked 3 and holds 2": ([("g", 5, 3)], Retention(max_len=2), (10, 3, 5, 0)),
    "count, a group read nothing": ([("g", 0, 0)], Retention(max_len=2), (10, 0, 8, 0)),
    "count, the slowest of two groups": ([("fast", 10, 10), ("slow", 6, 6)], Retention(max_len=1), (10, 6, 3, 0)),
    "age, everything old": ([], Retention(max_age_ms=60_000), (10, 10, 0, 0)),
    "age, a group holds some": ([("g", 4, 2)], Retention(max_age_ms=60_000), (10, 2, 8, 0)),
    "hard cap over a group": ([("g", 4, 2)], Retention(max_len=2, hard_max_len=5), (10, 5, 3, 3)),
    "hard cap, pending and unread": ([("g", 6, 2), ("h", 10, 10)], Retention(hard_max_len=3), (10, 7, 0, 5)),
    "nothing to do": ([("g", 10, 10)], Retention(max_len=20), (10, 0, 0, 0)),
}


@pytest.mark.parametrize("case", list(TRIM_CASES))
async def test_plan_says_exactly_what_trim_then_removes(redis, keys, case: str) -> None:
    # given ten old entries (ids from 1970) and the case's groups
    groups, retention, expected = TRIM_CASES[case]
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await fill(redis, stream, ids(10))
    for name, read, acked in groups:
        await group_state(redis, stream, name, read, acked)
    # when planned, then trimmed
    plan = await plan_stream(redis, stream, retention)
    removed, dropped = await trim_stream(redis, keys, stream, retention)
    # then the plan has the expected figures and trim did just that
    assert tuple(plan) == expected
    assert (removed, dropped) == (plan.remove, plan.drop)
    assert await redis.xlen(stream) == plan.length - plan.remove


async def test_trim_plan_covers_every_stream_of_each_topic_and_changes_nothing(redis, keys) -> None:
    for symbol in ("A", "B"):
        await put(redis, keys, tick(symbol), "1-0")
        await put(redis, keys, tick(symbol), "2-0")
    plan = await trim_plan(redis, keys, {"tick": Retention(max_len=1)})
    assert [(r.stream, r.length, r.remove, r.removed) for r in plan] == [
        (keys.stream("tick", Priority.NORMAL, s), 2, 1, None) for s in ("A", "B")]
    assert [await redis.xlen(r.stream) for r in plan] == [2, 2]


async def test_trim_plan_of_an_unknown_topic_is_not_found_unless_missing_is_ok(redis, keys) -> None:
    with pytest.raises(NotFound):
        await trim_plan(redis, keys, {"nosuch": Retention(max_len=1)})
    assert await trim_plan(redis, keys, {"nosuch": Retention(max_len=1)}, missing_ok=True) == []


async def test_trim_now_applies_the_plan_and_reports_what_went(redis, keys) -> None:
    await put(redis, keys, tick("A"), "1-0")
    await put(redis, keys, tick("A"), "2-0")
    rules = {"tick": Retention(max_len=1)}
    plan = await trim_plan(redis, keys, rules)
    steps: list[int] = []
    done = await trim_now(redis, keys, plan, rules, advance=steps.append)
    assert [(r.remove, r.removed, r.dropped) for r in done] == [(1, 1, 0)]
    assert steps == [1]
    assert [i for i, _ in await redis.xrange(plan[0].stream)] == [b"2-0"]
