"""Dead letters: listing, replaying (once) and purging."""

from __future__ import annotations

from typing import Any

from fabric import Priority, Publisher
from fabric.deadletter import DeadLetter, list_dead_letters, move, purge, replay
from fabric.events import Tick
from fabric.keys import Keys

GROUP = "g"


async def dead_letter(redis: Any, keys: Keys, symbol: str = "A", *, error: str = "boom") -> tuple[str, bytes, dict]:
    """Publish one tick, deliver it to consumer ``c`` and dead-letter it; return its stream, id and fields."""
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(Tick(symbol=symbol, bid=1.0, ask=2.0))
    stream = keys.stream("tick", Priority.NORMAL, symbol)
    await redis.xgroup_create(stream, GROUP, id="0")
    [[_, [(entry_id, fields)]]] = await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=1)
    moved = await move(redis, keys, stream, entry_id, group=GROUP, consumer="c", handler="h",
                       error_type="ValueError", error=error, deliveries=1)
    assert moved is not None
    return stream, entry_id, fields


async def test_list_shows_each_dead_letter_with_its_facts_and_original_fields(redis, keys):
    # given two dead letters of two symbols
    a = await dead_letter(redis, keys, "A", error="bad A")
    b = await dead_letter(redis, keys, "B", error="bad B")
    # when they are listed
    letters = await list_dead_letters(redis, keys)
    # then each carries its origin, the failure, and the original fields byte for byte
    by_origin = {letter.origin_stream: letter for letter in letters}
    assert len(letters) == 2
    for (stream, entry_id, fields), error in ((a, "bad A"), (b, "bad B")):
        letter = by_origin[stream]
        assert letter.dlq == keys.dlq(stream)
        assert letter.origin_id == entry_id.decode()
        assert (letter.group, letter.consumer, letter.handler) == (GROUP, "c", "h")
        assert (letter.error_type, letter.error, letter.deliveries) == ("ValueError", error, 1)
        assert 0 < letter.first_failure_ms <= letter.last_failure_ms
        assert letter.fields == {k.decode(): v for k, v in fields.items()}


async def test_list_respects_count(redis, keys):
    # given three dead letters over two dead-letter streams
    for symbol in ("A", "B"):
        await dead_letter(redis, keys, symbol)
    stream = keys.stream("tick", Priority.NORMAL, "A")
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(Tick(symbol="A", bid=1.0, ask=2.0))
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=1)
    await move(redis, keys, stream, entry_id, group=GROUP, consumer="c", handler="h", error_type="E", error="e",
               deliveries=1)
    # when at most two are asked for, then two come back; all three otherwise
    assert len(await list_dead_letters(redis, keys, count=2)) == 2
    assert len(await list_dead_letters(redis, keys)) == 3


async def test_move_refuses_an_entry_the_consumer_does_not_own(redis, keys):
    # given an entry pending for consumer "c"
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(Tick(symbol="A", bid=1.0, ask=2.0))
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xgroup_create(stream, GROUP, id="0")
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(GROUP, "c", {stream: ">"}, count=1)
    # when consumer "other" tries to dead-letter it
    moved = await move(redis, keys, stream, entry_id, group=GROUP, consumer="other", handler="h",
                       error_type="E", error="e", deliveries=1)
    # then nothing moves and the entry stays pending for "c"
    assert moved is None
    assert await list_dead_letters(redis, keys) == []
    [row] = await redis.xpending_range(stream, GROUP, entry_id, entry_id, 1)
    assert row["consumer"] == b"c"


async def test_replay_puts_original_fields_back_and_deletes_the_dead_letter(redis, keys):
    # given a dead letter
    stream, entry_id, fields = await dead_letter(redis, keys)
    [letter] = await list_dead_letters(redis, keys)
    # when it is replayed
    new_id = await replay(redis, letter)
    # then its origin stream has a new entry with the original fields, addressed to the dead letter's group,
    # and the dead letter is gone
    assert new_id is not None
    entries = await redis.xrange(stream)
    assert [e[0] for e in entries] == [entry_id, new_id.encode()]
    assert entries[1][1] == {**fields, b"for_group": GROUP.encode()}
    assert await list_dead_letters(redis, keys) == []
    assert await redis.xlen(letter.dlq) == 0


async def test_replaying_twice_does_not_duplicate(redis, keys):
    # given a dead letter replayed once
    stream, _, _ = await dead_letter(redis, keys)
    [letter] = await list_dead_letters(redis, keys)
    assert await replay(redis, letter) is not None
    # when it is replayed again
    again = await replay(redis, letter)
    # then nothing more is written
    assert again is None
    assert await redis.xlen(stream) == 2


async def test_purge_deletes_the_dead_letter_only(redis, keys):
    # given a dead letter
    stream, _, _ = await dead_letter(redis, keys)
    [letter] = await list_dead_letters(redis, keys)
    # when it is purged
    assert await purge(redis, letter) is True
    # then it is gone, nothing went back to the origin stream, and a second purge deletes nothing
    assert await list_dead_letters(redis, keys) == []
    assert await redis.xlen(stream) == 1
    assert await purge(redis, letter) is False
    assert await replay(redis, letter) is None


def test_parse_keeps_original_fields_as_bytes():
    raw = {b"origin_stream": b"ns:s:tick:normal:{A}", b"origin_id": b"1-0", b"deliveries": b"3",
           b"f:data": b"\xff\x00", b"f:type": b"Tick"}
    letter = DeadLetter.parse("ns:dlq:{A}", b"5-0", raw)
    assert letter.fields == {"data": b"\xff\x00", "type": b"Tick"}
    assert letter.deliveries == 3
    assert letter.error_type == ""
