"""Dead letters by filter: finding, naming, replaying many (once, paced) and purging many."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fabric import Priority, Publisher
from fabric.deadletter import (
    DeadLetter,
    DeadLetterFilter,
    find,
    get,
    original_event,
    purge_many,
    replay,
    replay_many,
    server_time_ms,
)
from fabric.errors import DecodeError, NotFound
from fabric.events import Bar, Event, Tick
from fabric.keys import Keys

GROUP = "g"
DAY_MS = 86_400_000


async def dead_letter(redis: Any, keys: Keys, event: Event, *, topic: str | None = None, group: str = GROUP,
                      error_type: str = "ValueError", error: str = "boom") -> DeadLetter:
    """Publish ``event``, deliver it to consumer ``c`` of ``group`` and dead-letter it; return the dead letter."""
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(event, topic=topic)
    stream = keys.stream(topic or event.default_topic, event.default_priority, event.symbol)
    return await dead_letter_next(redis, keys, stream, group=group, error_type=error_type, error=error)


async def dead_letter_next(redis: Any, keys: Keys, stream: str, *, group: str = GROUP, error_type: str = "ValueError",
                           error: str = "boom", delete_first: bool = False) -> DeadLetter:
    """Deliver the stream's next entry to ``group`` and dead-letter it (``delete_first``: after XDEL-ing it)."""
    groups = {g["name"].decode() for g in await redis.xinfo_groups(stream)}
    if group not in groups:
        await redis.xgroup_create(stream, group, id="0")
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(group, "c", {stream: ">"}, count=1)
    if delete_first:
        await redis.xdel(stream, entry_id)
    dead = await move_to_dlq(redis, keys, stream, entry_id, group, error_type, error)
    return await get(redis, keys, f"{Keys.tag_of(keys.dlq(stream))}/{dead.decode()}")


async def move_to_dlq(redis: Any, keys: Keys, stream: str, entry_id: bytes, group: str, error_type: str,
                      error: str) -> bytes:
    from fabric.deadletter import move

    dead = await move(redis, keys, stream, entry_id, group=group, consumer="c", handler="h",
                      error_type=error_type, error=error, deliveries=1)
    assert dead is not None
    return dead


def refs(letters: list[DeadLetter]) -> set[str]:
    return {letter.ref for letter in letters}


def tick(symbol: str = "A") -> Tick:
    return Tick(symbol=symbol, bid=1.0, ask=2.0)


# ---- find: each filter --------------------------------------------------------------------------------------


async def test_find_without_filter_returns_every_dead_letter(redis, keys):
    # given three dead letters over two dead-letter streams
    letters = [await dead_letter(redis, keys, tick(s)) for s in ("A", "A", "B")]
    # when all are asked for
    found = await find(redis, keys)
    # then each comes back once
    assert sorted(x.ref for x in found) == sorted(x.ref for x in letters)


async def test_find_by_topic_keeps_only_that_topics_dead_letters(redis, keys):
    # given a dead letter on topic "tick" and one on topic "quotes", same symbol (same dead-letter stream)
    on_tick = await dead_letter(redis, keys, tick())
    await dead_letter(redis, keys, tick(), topic="quotes")
    # when filtered by topic
    found = await find(redis, keys, DeadLetterFilter(topic="tick"))
    # then only the first matches
    assert refs(found) == {on_tick.ref}


async def test_find_by_stream_keeps_only_that_streams_dead_letters(redis, keys):
    # given dead letters of two symbols
    a = await dead_letter(redis, keys, tick("A"))
    await dead_letter(redis, keys, tick("B"))
    # when filtered by A's stream key
    found = await find(redis, keys, DeadLetterFilter(stream=a.origin_stream))
    # then only A's matches
    assert refs(found) == {a.ref}


async def test_find_by_stream_that_has_no_dead_letters_finds_none(redis, keys):
    await dead_letter(redis, keys, tick("A"))
    assert await find(redis, keys, DeadLetterFilter(stream=keys.stream("tick", Priority.NORMAL, "Z"))) == []
    assert await find(redis, keys, DeadLetterFilter(stream="not-a-stream-key")) == []


async def test_find_by_type_matches_the_original_entrys_type(redis, keys):
    # given a dead Tick and a dead Bar of the same symbol
    bar = await dead_letter(redis, keys, Bar(symbol="A", timeframe="1m", start_ns=0, open=1, high=2, low=0.5,
                                             close=1.5))
    await dead_letter(redis, keys, tick())
    # when filtered by type Bar
    found = await find(redis, keys, DeadLetterFilter(event_type="Bar"))
    # then only the Bar matches
    assert refs(found) == {bar.ref}
    assert found[0].event_type == "Bar"


async def test_find_by_error_matches_type_or_message_in_any_case(redis, keys):
    # given dead letters failing with a timeout (by type), a bad price (by message), and something else
    by_type = await dead_letter(redis, keys, tick(), error_type="TimeoutError", error="took too long")
    by_message = await dead_letter(redis, keys, tick(), error_type="Reject", error="Price is NEGATIVE")
    await dead_letter(redis, keys, tick(), error_type="KeyError", error="symbol")
    # when filtered by error text, in another case
    assert refs(await find(redis, keys, DeadLetterFilter(error="timeout"))) == {by_type.ref}
    assert refs(await find(redis, keys, DeadLetterFilter(error="negative"))) == {by_message.ref}
    assert await find(redis, keys, DeadLetterFilter(error="nothing like it")) == []


async def test_find_by_age_measures_from_the_given_now(redis, keys):
    # given two dead letters made now, and "now" taken a day later for one query
    letters = [await dead_letter(redis, keys, tick(s)) for s in ("A", "B")]
    later = await server_time_ms(redis) + DAY_MS
    # when asked for those at least an hour old, then a day later both are, and right now none is
    hour = 3_600_000
    assert refs(await find(redis, keys, DeadLetterFilter(min_age_ms=hour), now_ms=later)) == refs(letters)
    assert await find(redis, keys, DeadLetterFilter(min_age_ms=hour)) == []
    # and when asked for those at most an hour old, then right now both are, and a day later none is
    assert refs(await find(redis, keys, DeadLetterFilter(max_age_ms=hour))) == refs(letters)
    assert await find(redis, keys, DeadLetterFilter(max_age_ms=hour), now_ms=later) == []


async def test_find_by_group_keeps_only_that_groups_dead_letters(redis, keys):
    # given dead letters given up by two groups
    mine = await dead_letter(redis, keys, tick("A"), group="mine")
    await dead_letter(redis, keys, tick("B"), group="theirs")
    # when filtered by group
    found = await find(redis, keys, DeadLetterFilter(group="mine"))
    # then only that group's match
    assert refs(found) == {mine.ref}


async def test_filters_combine_with_and(redis, keys):
    # given dead letters of groups x and y with two errors
    wanted = await dead_letter(redis, keys, tick("A"), group="x", error="bad price")
    await dead_letter(redis, keys, tick("B"), group="x", error="other")
    await dead_letter(redis, keys, tick("C"), group="y", error="bad price")
    # when filtered by group and error, then only the one with both matches
    assert refs(await find(redis, keys, DeadLetterFilter(group="x", error="price"))) == {wanted.ref}


@pytest.mark.parametrize("kwargs", [{"min_age_ms": -1}, {"max_age_ms": -5}, {"min_age_ms": 10, "max_age_ms": 5}])
def test_filter_refuses_ages_that_match_nothing(kwargs):
    with pytest.raises(ValueError):
        DeadLetterFilter(**kwargs)


async def test_find_pages_through_streams_longer_than_a_page_and_stops_at_the_limit(redis, keys):
    # given five dead letters in one stream and two in another
    letters = [await dead_letter(redis, keys, tick(s)) for s in ("A",) * 5 + ("B",) * 2]
    # when read two entries at a time
    everything = await find(redis, keys, page=2)
    some = await find(redis, keys, page=2, limit=6)
    # then all seven come back in order (by stream, oldest first), and a limit cuts across streams
    assert [x.ref for x in everything] == [x.ref for x in letters]
    assert [x.ref for x in some] == [x.ref for x in letters][:6]


async def test_find_filters_each_page_without_losing_later_matches(redis, keys):
    # given a stream whose matching dead letters sit after several non-matching ones
    for _ in range(4):
        await dead_letter(redis, keys, tick(), error="other")
    wanted = [await dead_letter(redis, keys, tick(), error="wanted") for _ in range(2)]
    # when filtered, read a page of two at a time
    found = await find(redis, keys, DeadLetterFilter(error="wanted"), page=2, limit=2)
    # then both matches are found
    assert [x.ref for x in found] == [x.ref for x in wanted]


# ---- get: names -------------------------------------------------------------------------------------------


async def test_get_accepts_the_printed_id_and_the_whole_key(redis, keys):
    # given a dead letter of a symbol with a slash
    letter = await dead_letter(redis, keys, tick("BTC/USD"))
    # when fetched by TAG/ENTRY_ID and by DLQ_KEY/ENTRY_ID
    by_ref = await get(redis, keys, letter.ref)
    by_key = await get(redis, keys, f"{letter.dlq}/{letter.id}")
    # then both name it
    assert letter.ref == f"{{BTC/USD}}/{letter.id}"
    assert by_ref == by_key == letter


async def test_get_of_a_gone_dead_letter_raises_not_found(redis, keys):
    letter = await dead_letter(redis, keys, tick())
    await replay(redis, letter)
    with pytest.raises(NotFound, match="fabric dlq list"):
        await get(redis, keys, letter.ref)


@pytest.mark.parametrize("ref", ["nonsense", "{A}/not-an-id", "A/1-0", "{A}", "other:dlq:{A}/1-0"])
async def test_get_of_a_malformed_id_raises_value_error(redis, keys, ref):
    with pytest.raises(ValueError):
        await get(redis, keys, ref)


async def test_original_event_decodes_the_kept_fields(redis, keys):
    event = tick()
    letter = await dead_letter(redis, keys, event)
    assert original_event(letter) == event


async def test_original_event_of_garbage_says_why(redis, keys):
    # given a dead letter of an entry whose data is not msgpack
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xadd(stream, {"type": "Tick", "v": "1", "enc": "msgpack", "data": b"\xc1\xff"})
    letter = await dead_letter_next(redis, keys, stream)
    # when decoded, then the error keeps the reason
    with pytest.raises(DecodeError) as info:
        original_event(letter)
    assert "Tick" in info.value.reason


# ---- replay_many: once, paced, dry run ---------------------------------------------------------------------


async def test_replay_many_twice_publishes_each_dead_letter_once(redis, keys):
    # given three dead letters over two streams, found once
    letters = [await dead_letter(redis, keys, tick(s)) for s in ("A", "A", "B")]
    streams = {x.origin_stream for x in letters}
    before = {s: await redis.xlen(s) for s in streams}
    # when the same list is replayed twice (a rerun, or a retry after a lost reply)
    first = await replay_many(redis, letters)
    second = await replay_many(redis, letters)
    # then the first replays all three, the second finds them gone, and each origin got one entry per dead letter
    assert (first.matched, first.replayed, first.gone) == (3, 3, 0)
    assert (second.matched, second.replayed, second.gone) == (3, 0, 3)
    assert {s: await redis.xlen(s) - before[s] for s in streams} == {
        s: sum(1 for x in letters if x.origin_stream == s) for s in streams}
    assert await find(redis, keys) == []


async def test_racing_replays_publish_each_dead_letter_once(redis, keys):
    # given four dead letters
    letters = [await dead_letter(redis, keys, tick()) for _ in range(4)]
    stream = letters[0].origin_stream
    before = await redis.xlen(stream)
    # when two replays of the same list run at once
    a, b = await asyncio.gather(replay_many(redis, letters), replay_many(redis, letters))
    # then between them each was replayed exactly once
    assert a.replayed + b.replayed == 4
    assert a.gone + b.gone == 4
    assert await redis.xlen(stream) - before == 4
    replayed = [o.id for o in a.letters + b.letters if o.outcome == "replayed"]
    assert sorted(replayed) == sorted(x.ref for x in letters)


async def test_replayed_entry_carries_the_original_fields_and_its_group(redis, keys):
    # given a dead letter
    event = tick()
    letter = await dead_letter(redis, keys, event, group="mine")
    # when replayed
    report = await replay_many(redis, [letter])
    # then the new entry is the original event, addressed to the group that gave up on it
    [outcome] = report.letters
    [(_, fields)] = await redis.xrange(letter.origin_stream, min=outcome.new_entry_id, max=outcome.new_entry_id)
    assert fields[b"for_group"] == b"mine"
    assert {k.decode(): v for k, v in fields.items() if k != b"for_group"} == letter.fields


async def test_a_replay_dead_lettered_again_replays_with_one_for_group(redis, keys):
    # given a dead letter replayed, then dead-lettered again by its group
    letter = await dead_letter(redis, keys, tick())
    await replay_many(redis, [letter])
    again = await dead_letter_next(redis, keys, letter.origin_stream)
    assert again.fields["for_group"] == GROUP.encode()
    # when replayed a second time
    [outcome] = (await replay_many(redis, [again])).letters
    # then the new entry holds for_group once (as the worker reads it)
    raw = "return redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])"  # the field list as is, not a dict
    [(_, flat)] = await redis.eval(raw, 1, letter.origin_stream, outcome.new_entry_id)
    names = flat[::2]
    assert names.count(b"for_group") == 1


async def test_replay_many_with_a_rate_replays_everything(redis, keys):
    # given three dead letters
    letters = [await dead_letter(redis, keys, tick()) for _ in range(3)]
    advanced: list[int] = []
    # when replayed at most 1000 a second
    report = await replay_many(redis, letters, rate_per_s=1000, advance=advanced.append)
    # then all are replayed and progress was reported for each
    assert report.replayed == 3
    assert advanced == [1, 1, 1]


async def test_dry_run_changes_nothing(redis, keys):
    # given two dead letters
    letters = [await dead_letter(redis, keys, tick()) for _ in range(2)]
    length = await redis.xlen(letters[0].origin_stream)
    # when replayed as a dry run
    report = await replay_many(redis, letters, dry_run=True)
    # then each would be replayed, and nothing moved
    assert report.dry_run and report.replayed == 0
    assert [o.outcome for o in report.letters] == ["would_replay", "would_replay"]
    assert await redis.xlen(letters[0].origin_stream) == length
    assert refs(await find(redis, keys)) == refs(letters)


async def test_a_dead_letter_without_its_original_is_left_in_place(redis, keys):
    # given a dead letter of an entry deleted from its stream before it was dead-lettered
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish(tick())
    stream = keys.stream("tick", Priority.NORMAL, "A")
    letter = await dead_letter_next(redis, keys, stream, delete_first=True)
    assert letter.origin_missing and letter.fields == {}
    # when replayed
    report = await replay_many(redis, [letter])
    # then nothing is written and it stays, counted as having no original
    assert (report.replayed, report.no_original) == (0, 1)
    assert await redis.xlen(stream) == 0
    assert refs(await find(redis, keys)) == {letter.ref}


# ---- purge_many ---------------------------------------------------------------------------------------------


async def test_purge_many_deletes_and_counts_what_was_already_gone(redis, keys):
    # given three dead letters, one of which is replayed after they were found
    letters = [await dead_letter(redis, keys, tick(s)) for s in ("A", "B", "B")]
    await replay(redis, letters[0])
    # when the three are purged
    report = await purge_many(redis, letters)
    # then two are deleted, one was gone, none remains, and the dead-letter streams stay registered
    assert (report.matched, report.purged, report.gone) == (3, 2, 1)
    assert await find(redis, keys) == []
    assert await redis.scard(keys.dlq_registry()) == 2
