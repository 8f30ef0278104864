"""Inspection: what ``fabric.inspection`` reports about streams, groups, consumers and pending entries, and when
a namespace is healthy, checked against Redis's own answers."""

from __future__ import annotations

from typing import Any

import pytest

from fabric import Publisher, connect, inspection
from fabric.errors import NotFound
from fabric.events import Tick
from fabric.keys import Keys, Priority
from tests.waiting import eventually

GROUP = "g"


async def publish(redis: Any, keys: Keys, *events: tuple[str, str, str]) -> list[str]:
    """Publish a Tick per (topic, priority, symbol); return the entry ids."""
    async with Publisher(redis, keys=keys) as pub:
        return [await pub.publish(Tick(symbol=symbol, bid=1.0, ask=2.0), topic=topic, priority=priority) or ""
                for topic, priority, symbol in events]


async def read(redis: Any, stream: str, consumer: str, count: int, group: str = GROUP) -> list[bytes]:
    """Deliver up to ``count`` new entries of ``stream`` to ``consumer``; return their ids."""
    reply = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def ms_of(entry_id: str | bytes) -> int:
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])


# ---- topics and streams ----------------------------------------------------------------------------------


async def test_topics_are_the_registries_of_the_namespace_only(redis, keys):
    # given two topics in this namespace and one in another
    await publish(redis, keys, ("tick", "normal", "A"), ("bar", "normal", "A"))
    await publish(redis, Keys(keys.ns + "x"), ("other", "normal", "A"))
    # when the topics are listed
    found = await inspection.topics(redis, keys)
    # then exactly this namespace's are, sorted
    assert found == ["bar", "tick"]


def test_a_registry_key_gives_back_its_topic(keys):
    assert keys.topic_of_registry(keys.topic_registry("tick").encode()) == "tick"
    with pytest.raises(ValueError, match="not a topic registry"):
        keys.topic_of_registry(keys.stream("tick", Priority.NORMAL, "A"))


async def test_streams_report_length_and_first_and_last_entry_times(redis, keys):
    # given three ticks in one stream
    ids = await publish(redis, keys, *[("tick", "normal", "A")] * 3)
    # when the streams are listed
    [row] = await inspection.streams(redis, keys)
    # then the row names the stream and its entries' times
    assert (row.key, row.topic, row.priority, row.symbol) == (
        keys.stream("tick", Priority.NORMAL, "A"), "tick", "normal", "A")
    assert (row.exists, row.length, row.first_ms, row.last_ms) == (True, 3, ms_of(ids[0]), ms_of(ids[-1]))
    assert (row.groups, row.pending, row.lag) == ([], 0, 0)


async def test_streams_are_ordered_by_topic_then_highest_priority_then_symbol(redis, keys):
    await publish(redis, keys, ("tick", "low", "B"), ("tick", "critical", "B"), ("bar", "normal", "A"),
                  ("tick", "low", "A"))
    rows = await inspection.streams(redis, keys)
    assert [(r.topic, r.priority, r.symbol) for r in rows] == [
        ("bar", "normal", "A"), ("tick", "critical", "B"), ("tick", "low", "A"), ("tick", "low", "B")]


async def test_streams_filter_by_topic_symbol_and_priority(redis, keys):
    # given streams of two topics, two symbols and two priorities
    await publish(redis, keys, ("tick", "high", "A"), ("tick", "normal", "A"), ("tick", "high", "B"),
                  ("bar", "high", "A"))
    # when filtered by each
    by_topic = await inspection.streams(redis, keys, topics=["bar"])
    by_symbol = await inspection.streams(redis, keys, topics=["tick"], symbol="B")
    by_priority = await inspection.streams(redis, keys, priority=Priority.HIGH, symbol="A")
    # then only the matching streams are listed
    assert [(r.topic, r.priority, r.symbol) for r in by_topic] == [("bar", "high", "A")]
    assert [(r.topic, r.priority, r.symbol) for r in by_symbol] == [("tick", "high", "B")]
    assert [(r.topic, r.priority, r.symbol) for r in by_priority] == [("bar", "high", "A"), ("tick", "high", "A")]


async def test_a_symbol_with_no_stream_lists_nothing(redis, keys):
    await publish(redis, keys, ("tick", "normal", "A"))
    assert await inspection.streams(redis, keys, symbol="ZZZ") == []


async def test_a_topic_that_does_not_exist_is_not_found(redis, keys):
    # given a namespace with topic tick only
    await publish(redis, keys, ("tick", "normal", "A"))
    # when streams of topic nope are asked for, then the error names it and how to list the topics
    with pytest.raises(NotFound, match="topic 'nope' does not exist.*fabric streams"):
        await inspection.streams(redis, keys, topics=["tick", "nope"])


async def test_a_registered_stream_that_was_deleted_is_listed_as_gone_with_length_0(redis, keys):
    # given a stream named by its topic's registry, then deleted
    await publish(redis, keys, ("tick", "normal", "A"), ("tick", "normal", "B"))
    await redis.delete(keys.stream("tick", Priority.NORMAL, "B"))
    # when the streams are listed
    rows = await inspection.streams(redis, keys)
    # then it is there, marked gone, with nothing in it
    gone = [r for r in rows if r.symbol == "B"]
    assert [(r.exists, r.length, r.first_ms, r.last_ms, r.groups) for r in gone] == [(False, 0, None, None, [])]


async def test_an_emptied_stream_has_no_first_or_last_entry(redis, keys):
    [entry_id] = await publish(redis, keys, ("tick", "normal", "A"))
    await redis.xdel(keys.stream("tick", Priority.NORMAL, "A"), entry_id)
    [row] = await inspection.streams(redis, keys)
    assert (row.exists, row.length, row.first_ms, row.last_ms) == (True, 0, None, None)


async def test_streams_report_each_groups_pending_and_lag(redis, keys):
    # given five entries; group g has read two (pending), group h none
    ids = await publish(redis, keys, *[("tick", "normal", "A")] * 5)
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xgroup_create(stream, "h", id="0")
    await read(redis, stream, "c1", 2)
    # when the streams are listed
    [row] = await inspection.streams(redis, keys)
    # then each group's figures are Redis's, and the stream's are their sums
    g, h = row.groups
    assert (g.group, g.consumers, g.pending, g.lag, g.last_delivered_id, g.last_delivered_ms) == (
        GROUP, 1, 2, 3, ids[1], ms_of(ids[1]))
    assert (h.group, h.consumers, h.pending, h.lag, h.last_delivered_id, h.last_delivered_ms) == (
        "h", 0, 0, 5, "0-0", None)
    assert (row.pending, row.lag) == (2, 8)


async def test_lag_is_unknown_when_redis_cannot_tell(redis, keys):
    # given a group that has read nothing on a stream with a deleted entry (Redis reports its lag as nil)
    ids = await publish(redis, keys, *[("tick", "normal", "A")] * 3)
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xdel(stream, ids[1])
    # when the streams are listed, then the lag is None, and so is the stream's sum
    [row] = await inspection.streams(redis, keys)
    assert [g.lag for g in row.groups] == [None]
    assert row.lag is None


# ---- groups and consumers --------------------------------------------------------------------------------


async def given_group_on_two_symbols(redis: Any, keys: Keys) -> tuple[str, str]:
    """Group g on tick A (3 entries; c1 read 2) and tick B (2 entries; c1 read 1, c2 read 1)."""
    await publish(redis, keys, *[("tick", "normal", "A")] * 3, *[("tick", "normal", "B")] * 2)
    a, b = keys.stream("tick", Priority.NORMAL, "A"), keys.stream("tick", Priority.NORMAL, "B")
    for stream in (a, b):
        await redis.xgroup_create(stream, GROUP, id="0")
    await read(redis, a, "c1", 2)
    await read(redis, b, "c1", 1)
    await read(redis, b, "c2", 1)
    return a, b


async def test_groups_sum_over_the_streams_of_a_topic(redis, keys):
    # given group g on two streams of tick with consumers c1 (on both) and c2
    a, b = await given_group_on_two_symbols(redis, keys)
    # when the groups are listed
    [row] = await inspection.groups(redis, keys)
    # then one row for (g, tick): two streams, two distinct consumers, the sums, the newest delivery
    replies = [g for s in (a, b) for g in await redis.xinfo_groups(s)]
    newest = max(ms_of(g["last-delivered-id"]) for g in replies)
    assert (row.group, row.topic, row.streams, row.consumers, row.pending, row.lag, row.last_delivered_ms) == (
        GROUP, "tick", 2, 2, 4, 1, newest)


async def test_groups_have_one_row_per_topic(redis, keys):
    await publish(redis, keys, ("tick", "normal", "A"), ("bar", "normal", "A"))
    for topic in ("tick", "bar"):
        await redis.xgroup_create(keys.stream(topic, Priority.NORMAL, "A"), GROUP, id="0")
    rows = await inspection.groups(redis, keys)
    assert [(r.group, r.topic, r.streams, r.consumers, r.lag) for r in rows] == [
        (GROUP, "bar", 1, 0, 1), (GROUP, "tick", 1, 0, 1)]


async def test_groups_filter_by_group(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    await redis.xgroup_create(keys.stream("tick", Priority.NORMAL, "A"), "other", id="$")
    assert [r.group for r in await inspection.groups(redis, keys, groups=["other"])] == ["other"]


async def test_a_group_that_exists_nowhere_is_not_found(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    with pytest.raises(NotFound, match="group 'nope' does not exist on any stream of topic 'tick'"):
        await inspection.groups(redis, keys, topics=["tick"], groups=["nope"])


async def test_consumers_sum_pending_and_take_the_least_idle_over_streams(redis, keys):
    # given c1 holding 2 entries on A and 1 on B, c2 holding 1 on B
    a, b = await given_group_on_two_symbols(redis, keys)
    # when the consumers are listed
    rows = await inspection.consumers(redis, keys, groups=[GROUP])
    # then one row per consumer with its pending summed over the streams
    assert [(r.group, r.consumer, r.topics, r.streams, r.pending) for r in rows] == [
        (GROUP, "c1", ["tick"], 2, 3), (GROUP, "c2", ["tick"], 1, 1)]
    # and c1's idle time is at most its idle time on either stream asked afterwards (idle only grows)
    c1 = rows[0]
    later = [int(c["idle"]) for s in (a, b) for c in await redis.xinfo_consumers(s, GROUP) if c["name"] == b"c1"]
    assert 0 <= c1.idle_ms <= min(later)
    assert c1.last_seen_ms <= await redis_ms(redis)


async def test_consumers_report_inactive_only_where_redis_does(redis, keys):
    # given a consumer that has read an entry
    a, _ = await given_group_on_two_symbols(redis, keys)
    raw = (await redis.xinfo_consumers(a, GROUP))[0]
    # when the consumers are listed
    c1 = (await inspection.consumers(redis, keys))[0]
    # then "inactive" (Redis 7.2+) is reported when XINFO CONSUMERS has it, and None, not a guess, when not
    if "inactive" in raw:
        assert c1.inactive_ms is not None and c1.last_delivery_ms is not None
    else:
        assert (c1.inactive_ms, c1.last_delivery_ms) == (None, None)


async def test_a_group_with_no_consumers_lists_no_consumer_rows(redis, keys):
    await publish(redis, keys, ("tick", "normal", "A"))
    await redis.xgroup_create(keys.stream("tick", Priority.NORMAL, "A"), GROUP, id="0")
    assert await inspection.consumers(redis, keys, groups=[GROUP]) == []


# ---- pending ---------------------------------------------------------------------------------------------


async def test_pending_lists_the_oldest_entries_over_all_streams_oldest_first(redis, keys):
    # given 4 entries pending on A (c1 holds 2) and B (c1 and c2 hold one each)
    a, b = await given_group_on_two_symbols(redis, keys)
    # when the 3 oldest pending entries are asked for
    rows = await inspection.pending(redis, keys, limit=3)
    # then they are the 3 oldest of all 4 by entry id, with Redis's delivery facts
    everything = [(s, e["message_id"].decode(), e["consumer"].decode())
                  for s in (a, b) for e in await redis.xpending_range(s, GROUP, "-", "+", 10)]
    everything.sort(key=lambda x: tuple(int(p) for p in x[1].split("-")))
    assert [(r.stream, r.entry_id, r.consumer) for r in rows] == everything[:3]
    assert all((r.group, r.topic, r.deliveries) == (GROUP, "tick", 1) for r in rows)


async def test_pending_filters_by_consumer(redis, keys):
    a, b = await given_group_on_two_symbols(redis, keys)
    rows = await inspection.pending(redis, keys, groups=[GROUP], consumer="c2")
    assert [(r.stream, r.consumer) for r in rows] == [(b, "c2")]


async def test_pending_of_an_unknown_consumer_is_not_found(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    with pytest.raises(NotFound, match="consumer 'nobody'"):
        await inspection.pending(redis, keys, consumer="nobody")


async def test_pending_of_a_group_with_nothing_pending_is_empty(redis, keys):
    await publish(redis, keys, ("tick", "normal", "A"))
    await redis.xgroup_create(keys.stream("tick", Priority.NORMAL, "A"), GROUP, id="0")
    assert await inspection.pending(redis, keys, groups=[GROUP]) == []


async def test_pending_age_is_measured_on_redis_clock_from_the_entry_id(redis, keys):
    # given an entry added with an id from 1970 (the Unix ms 1000), delivered to c1
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xadd(stream, {"x": "1"}, id="1000-0")
    await redis.sadd(keys.topic_registry("tick"), stream)
    await redis.xgroup_create(stream, GROUP, id="0")
    await read(redis, stream, "c1", 1)
    # when its age is reported
    before = await redis_ms(redis)
    [row] = await inspection.pending(redis, keys)
    after = await redis_ms(redis)
    # then it is Redis's time then minus 1000 ms
    assert before - 1000 <= row.age_ms <= after - 1000
    assert (row.entry_id, row.consumer, row.deliveries) == ("1000-0", "c1", 1)


async def test_thousands_of_streams_are_read_in_chunked_pipelines(redis, keys, monkeypatch):
    # given 30 streams and pipelines of 4 commands, so one listing takes many chunks
    await publish(redis, keys, *[("tick", "normal", f"S{i:02d}") for i in range(30)])
    whole = await inspection.streams(redis, keys)
    monkeypatch.setattr(inspection, "PIPELINE_CHUNK", 4)
    # when listed again, then the answer is the same
    assert await inspection.streams(redis, keys) == whole
    assert len(whole) == 30


# ---- health ----------------------------------------------------------------------------------------------


async def test_health_is_ok_with_a_consumer_that_just_read(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    report = await inspection.health(redis, keys, groups=[GROUP], topics=["tick"])
    assert (report.ok, report.problems) == (True, [])
    [g] = report.groups
    assert (g.group, g.topics, g.streams, g.consumers, g.live_consumers, g.pending) == (GROUP, ["tick"], 2, 2, 2, 4)


async def test_health_without_groups_is_ok_and_lists_the_groups(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    report = await inspection.health(redis, keys)
    assert report.ok and [g.group for g in report.groups] == [GROUP]


async def test_health_fails_for_a_missing_group(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    report = await inspection.health(redis, keys, groups=[GROUP, "absent"])
    assert not report.ok
    assert len(report.problems) == 1 and "group 'absent' does not exist" in report.problems[0]
    assert [(g.group, g.streams, g.consumers) for g in report.groups] == [(GROUP, 2, 2), ("absent", 0, 0)]


async def test_health_fails_for_a_group_without_consumers(redis, keys):
    await publish(redis, keys, ("tick", "normal", "A"))
    await redis.xgroup_create(keys.stream("tick", Priority.NORMAL, "A"), GROUP, id="0")
    report = await inspection.health(redis, keys, groups=[GROUP])
    assert not report.ok and "has no consumers" in report.problems[0]


async def test_health_fails_for_a_group_on_another_topic_only(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    await publish(redis, keys, ("bar", "normal", "A"))
    report = await inspection.health(redis, keys, groups=[GROUP], topics=["bar"])
    assert not report.ok and "does not exist on any stream of topic 'bar'" in report.problems[0]


async def test_health_fails_for_a_missing_topic(redis, keys):
    await given_group_on_two_symbols(redis, keys)
    report = await inspection.health(redis, keys, groups=[GROUP], topics=["nope"])
    assert not report.ok and "topic 'nope' does not exist" in report.problems[0]


@pytest.mark.real_only
async def test_health_fails_when_every_consumer_is_idle_too_long(redis, keys):
    # given a group whose only consumer read once
    await publish(redis, keys, ("tick", "normal", "A"))
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xgroup_create(stream, GROUP, id="0")
    await read(redis, stream, "c1", 1)

    # when Redis shows it idle for longer than the limit
    async def idle_past_limit() -> bool:
        return all(int(c["idle"]) > 20 for c in await redis.xinfo_consumers(stream, GROUP))

    await eventually(idle_past_limit, what="c1 idle for more than 20 ms")
    report = await inspection.health(redis, keys, groups=[GROUP], max_idle_ms=20)
    # then the group is not healthy, and the problem says why
    assert not report.ok
    assert "no consumer active in the last 20 ms" in report.problems[0]
    assert [(g.consumers, g.live_consumers) for g in report.groups] == [(1, 0)]


@pytest.mark.real_only
async def test_health_of_an_unreachable_redis_is_a_problem_not_an_error(keys):
    url = "redis://127.0.0.1:1/0"
    client = connect(url)
    try:
        report = await inspection.health(client, keys, groups=[GROUP], url=url)
    finally:
        await client.aclose()
    assert (report.ok, report.groups) == (False, [])
    assert len(report.problems) == 1 and "cannot reach Redis at redis://127.0.0.1:1/0" in report.problems[0]
