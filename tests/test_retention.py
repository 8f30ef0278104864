"""Retention: trimming by count and age never removes what a group still needs; only the hard cap does,
and it counts what it drops."""

from __future__ import annotations

from typing import Any

from fabric import Priority, Retention
from fabric.keys import Keys
from fabric.retention import plan_stream, trim_stream, trim_topic

GROUP = "g"


def stream_of(keys: Keys, symbol: str = "A") -> str:
    return keys.stream("tick", Priority.NORMAL, symbol)


async def fill(redis: Any, stream: str, n: int) -> list[bytes]:
    return [await redis.xadd(stream, {"i": str(i)}) for i in range(n)]


async def ids(redis: Any, stream: str) -> list[bytes]:
    return [entry_id for entry_id, _ in await redis.xrange(stream)]


async def read(redis: Any, stream: str, n: int, group: str = GROUP) -> list[bytes]:
    reply = await redis.xreadgroup(group, "c", {stream: ">"}, count=n)
    return [entry_id for entry_id, _ in reply[0][1]]


async def test_max_len_trims_acknowledged_entries(redis, keys):
    # given ten entries a group has read and acknowledged
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 10)
    await redis.xgroup_create(stream, GROUP, id="0")
    assert await redis.xack(stream, GROUP, *await read(redis, stream, 10)) == 10
    # when trimmed to three
    result = await trim_stream(redis, keys, stream, Retention(max_len=3))
    # then the newest three remain and nothing counted as dropped
    assert result == (7, 0)
    assert await ids(redis, stream) == all_ids[7:]
    assert await redis.hgetall(keys.counters()) == {}


async def test_max_len_without_groups_trims_to_length(redis, keys):
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 10)
    assert await trim_stream(redis, keys, stream, Retention(max_len=4)) == (6, 0)
    assert await ids(redis, stream) == all_ids[6:]


async def test_max_len_keeps_pending_and_undelivered_entries(redis, keys):
    # given ten entries: a group acknowledged the first two, holds 3-5 pending, and has not read 6-10
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 10)
    await redis.xgroup_create(stream, GROUP, id="0")
    delivered = await read(redis, stream, 5)
    await redis.xack(stream, GROUP, *delivered[:2])
    # when trimmed to two, far below what the group still needs
    result = await trim_stream(redis, keys, stream, Retention(max_len=2))
    # then only the acknowledged entries went
    assert result == (2, 0)
    assert await ids(redis, stream) == all_ids[2:]
    assert int((await redis.xpending(stream, GROUP))["pending"]) == 3


async def test_max_len_keeps_what_the_slowest_group_has_not_read(redis, keys):
    # given a group that acknowledged everything and another that has read nothing
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 10)
    await redis.xgroup_create(stream, "fast", id="0")
    await redis.xgroup_create(stream, "slow", id="0")
    await redis.xack(stream, "fast", *await read(redis, stream, 10, "fast"))
    # when trimmed to one
    result = await trim_stream(redis, keys, stream, Retention(max_len=1))
    # then nothing went: the slow group has not seen any of it
    assert result == (0, 0)
    assert await ids(redis, stream) == all_ids


async def old_and_new(redis: Any, stream: str, age_ms: int) -> tuple[list[bytes], list[bytes]]:
    """Five entries ``age_ms`` old (explicit ids in the server's past), then three new ones."""
    seconds, micros = await redis.time()
    past = seconds * 1000 + micros // 1000 - age_ms
    old = [await redis.xadd(stream, {"i": str(i)}, id=f"{past}-{i}") for i in range(5)]
    new = await fill(redis, stream, 3)
    return old, new


async def test_max_age_trims_old_acknowledged_entries(redis, keys):
    # given five entries 100 s old and three new ones, all acknowledged
    stream = stream_of(keys)
    _, new = await old_and_new(redis, stream, 100_000)
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xack(stream, GROUP, *await read(redis, stream, 8))
    # when entries older than 50 s are trimmed
    result = await trim_stream(redis, keys, stream, Retention(max_age_ms=50_000))
    # then the old ones went and the new ones stay
    assert result == (5, 0)
    assert await ids(redis, stream) == new


async def test_max_age_keeps_old_entries_still_pending(redis, keys):
    # given old entries the group holds pending (the first acknowledged)
    stream = stream_of(keys)
    old, new = await old_and_new(redis, stream, 100_000)
    await redis.xgroup_create(stream, GROUP, id="0")
    delivered = await read(redis, stream, 3)
    await redis.xack(stream, GROUP, delivered[0])
    # when entries older than 50 s are trimmed
    result = await trim_stream(redis, keys, stream, Retention(max_age_ms=50_000))
    # then only the acknowledged one went
    assert result == (1, 0)
    assert await ids(redis, stream) == old[1:] + new


async def test_hard_max_len_drops_unacknowledged_entries_and_counts_them(redis, keys):
    # given ten entries: two acknowledged, three pending, five never delivered
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 10)
    await redis.xgroup_create(stream, GROUP, id="0")
    delivered = await read(redis, stream, 5)
    await redis.xack(stream, GROUP, *delivered[:2])
    # when a hard cap of four applies
    result = await trim_stream(redis, keys, stream, Retention(max_len=2, hard_max_len=4))
    # then four remain; of the six removed, the four the group had not acknowledged are counted
    assert result == (6, 4)
    assert await ids(redis, stream) == all_ids[6:]
    assert await redis.hget(keys.counters(), f"dropped_by_cap:{stream}") == b"4"


async def test_hard_max_len_within_limit_drops_nothing(redis, keys):
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 5)
    await redis.xgroup_create(stream, GROUP, id="0")
    await read(redis, stream, 5)
    assert await trim_stream(redis, keys, stream, Retention(hard_max_len=5)) == (0, 0)
    assert await ids(redis, stream) == all_ids
    assert await redis.hgetall(keys.counters()) == {}


async def test_trim_topic_applies_to_every_registered_stream(redis, keys):
    # given two registered streams of one topic, with no groups
    streams = [stream_of(keys, "A"), stream_of(keys, "B")]
    for s in streams:
        await fill(redis, s, 5)
        await redis.sadd(keys.topic_registry("tick"), s)
    # when the topic is trimmed to two per stream
    result = await trim_topic(redis, keys, "tick", Retention(max_len=2))
    # then each stream was trimmed
    assert result == (6, 0)
    for s in streams:
        assert await redis.xlen(s) == 2


async def test_empty_or_missing_stream_is_left_alone(redis, keys):
    assert await trim_stream(redis, keys, stream_of(keys), Retention(max_len=1, hard_max_len=1)) == (0, 0)


async def test_hard_max_len_counts_each_dropped_entry_once_however_many_groups_missed_it(redis, keys):
    # given ten entries that two groups have both not acknowledged (one holds five pending, one read none)
    stream = stream_of(keys)
    await fill(redis, stream, 10)
    await redis.xgroup_create(stream, "g1", id="0")
    await redis.xgroup_create(stream, "g2", id="0")
    await read(redis, stream, 5, "g1")
    # when a hard cap of four drops six of them
    result = await trim_stream(redis, keys, stream, Retention(hard_max_len=4))
    # then six entries are counted as dropped, not one per group that missed each
    assert result == (6, 6)
    assert await redis.hget(keys.counters(), f"dropped_by_cap:{stream}") == b"6"


async def test_an_age_limit_longer_than_the_epoch_keeps_everything(redis, keys):
    # given entries and an age limit reaching before 1970
    stream = stream_of(keys)
    all_ids = await fill(redis, stream, 5)
    retention = Retention(max_age_ms=99_999_999_999_999)
    # when planned and trimmed, then nothing is too old, and nothing fails
    assert (await plan_stream(redis, stream, retention)).remove == 0
    assert await trim_stream(redis, keys, stream, retention) == (0, 0)
    assert await ids(redis, stream) == all_ids


async def test_the_plan_of_a_deleted_stream_is_empty(redis, keys):
    # given a stream deleted while its topic's registry still names it
    stream = stream_of(keys)
    await fill(redis, stream, 3)
    await redis.delete(stream)
    # when planned, then there is nothing to remove, and no error
    assert await plan_stream(redis, stream, Retention(max_len=1)) == (0, 0, 0, 0)
