"""The worker's contract: what a group of workers promises about the entries of its streams.

Each test runs real ``Worker`` objects in-process against the ``redis`` fixture (a real redis-server and
fakeredis); behaviour that depends on blocking reads or idle times is ``real_only``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.exceptions as rex

from fabric import Priority, Publisher, Reject, Retry, Worker, WorkerConfig
from fabric import worker as worker_module
from fabric.codec import decode_fields
from fabric.deadletter import list_dead_letters, replay
from fabric.events import Bar, Event, Tick
from fabric.handler import Context, as_handler
from fabric.keys import Keys
from fabric.logs import log_context
from fabric.metrics import HandlerTallies, measured
from tests.waiting import eventually
from tests.workers import running, stopped

GROUP = "g"

FAST = {
    "block_ms": 50,
    "reclaim_idle_ms": 300,
    "reclaim_interval_ms": 50,
    "discover_interval_ms": 50,
    "backoff_base_ms": 20,
    "backoff_max_ms": 100,
}


def config(**overrides: Any) -> WorkerConfig:
    """A worker config of group ``g`` on topic ``tick`` with test-sized timings."""
    return WorkerConfig(**{"group": GROUP, "topics": ["tick"], **FAST, **overrides})


def make_worker(
    redis: Any, keys: Keys, fn: Callable[..., Awaitable[Any]], *, name: str = "test-handler", **overrides: Any
) -> Worker:
    return Worker(redis, as_handler(fn, name), config(**overrides), keys=keys, handler_name=name)


def ticks(n: int, symbol: str = "A") -> list[Tick]:
    return [Tick(symbol=symbol, bid=100.0 + i, ask=100.5 + i) for i in range(n)]


async def publish(redis: Any, keys: Keys, events: list[Tick], priority: Priority | None = None) -> list[str]:
    async with Publisher(redis, keys=keys) as pub:
        ids = await pub.publish_many(events, priority=priority)
    assert None not in ids
    return [i for i in ids if i is not None]


def stream_of(keys: Keys, symbol: str = "A", priority: Priority = Priority.NORMAL, topic: str = "tick") -> str:
    return keys.stream(topic, priority, symbol)


async def pending(redis: Any, stream: str, group: str = GROUP) -> int:
    return int((await redis.xpending(stream, group))["pending"])


async def pending_of(redis: Any, stream: str, entry_id: bytes | str, group: str = GROUP) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await redis.xpending_range(stream, group, entry_id, entry_id, 1)
    return rows


def at_least(n: int, value: Callable[[], int]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return value() >= n

    return check


def is_zero(value: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await value() == 0

    return check


# ---- 1, 2: handled once, acked ---------------------------------------------------------------------


async def test_published_event_is_handled_once_and_acked(redis, keys):
    # given ten published ticks
    events = ticks(10)
    await publish(redis, keys, events)
    seen: Counter[str] = Counter()

    async def handle(event: Event) -> None:
        seen[event.event_id] += 1

    worker = make_worker(redis, keys, handle)
    # when a worker runs until all are committed
    async with running(worker):
        await eventually(at_least(10, lambda: worker.stats.handled), what="10 commits")
        await eventually(is_zero(lambda: pending(redis, stream_of(keys))), what="nothing pending")
    # then each was handled exactly once and the group has nothing pending
    assert seen == Counter({e.event_id: 1 for e in events})
    assert worker.stats.handled == 10
    assert await pending(redis, stream_of(keys)) == 0


async def test_batch_of_500_across_5_symbols_handled_exactly_once(redis, keys):
    # given 500 events over 5 symbols published in one batch
    symbols = ["S0", "S1", "S2", "S3", "S4"]
    events = [e for s in symbols for e in ticks(100, s)]
    await publish(redis, keys, events)
    seen: Counter[str] = Counter()

    async def handle(event: Event) -> None:
        seen[event.event_id] += 1

    worker = make_worker(redis, keys, handle)
    # when a worker handles them
    async with running(worker):
        await eventually(at_least(500, lambda: worker.stats.handled), what="500 commits")
    # then every event was handled exactly once, on every symbol's stream, and nothing is pending
    assert seen == Counter({e.event_id: 1 for e in events})
    assert worker.streams == sorted(stream_of(keys, s) for s in symbols)
    for s in symbols:
        assert await pending(redis, stream_of(keys, s)) == 0


# ---- 3: outputs and ack together, refused when taken over ------------------------------------------


def bar_from(tick: Tick) -> Bar:
    return Bar(symbol=tick.symbol, timeframe="1s", start_ns=tick.ts_ns, open=tick.bid, high=tick.ask,
               low=tick.bid, close=tick.ask)


async def test_output_is_written_with_lineage_and_input_acked(redis, keys):
    # given a tick and a handler that turns it into a bar
    [tick] = ticks(1)
    await publish(redis, keys, [tick])

    async def handle(event: Tick) -> Bar:
        return bar_from(event)

    worker = make_worker(redis, keys, handle, name="bars")
    # when the worker handles it
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the commit")
    # then the bar is on the bar topic's stream with the tick as root and cause, and the tick is acked
    out = await redis.xrange(stream_of(keys, topic="bar"))
    assert len(out) == 1
    bar = decode_fields(out[0][1])
    assert isinstance(bar, Bar)
    assert bar.symbol == "A"
    assert bar.correlation_id == tick.event_id
    assert bar.causation_id == tick.event_id
    assert bar.producer == "bars"
    assert await pending(redis, stream_of(keys)) == 0


async def test_commit_is_refused_when_entry_was_taken_over(redis, keys):
    # given a handler that, while running, sees its entry taken over by consumer "other"
    await publish(redis, keys, ticks(1))
    calls = 0

    async def handle(event: Tick, ctx: Context) -> Bar:
        nonlocal calls
        calls += 1
        await redis.xclaim(ctx.stream, ctx.group, "other", 0, [ctx.entry_id])
        return bar_from(event)

    # (reclaim idle long: this worker must not take the entry back from "other" during the test)
    worker = make_worker(redis, keys, handle, reclaim_idle_ms=60_000)
    # when the handler returns an output
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.refused), what="the refused commit")
    # then nothing was written, the input is still pending for "other", and only the refusal was counted
    assert calls == 1
    assert await redis.xlen(stream_of(keys, topic="bar")) == 0
    [entry] = await redis.xrange(stream_of(keys))
    [row] = await pending_of(redis, stream_of(keys), entry[0])
    assert row["consumer"] == b"other"
    assert worker.stats.refused == 1
    assert worker.stats.handled == 0


# ---- 4: priority -----------------------------------------------------------------------------------


async def test_critical_entries_are_served_first_by_the_lane_weights(redis, keys):
    # given 50 low then 50 critical ticks waiting before any worker runs
    n = 50
    await publish(redis, keys, ticks(n), Priority.LOW)
    await publish(redis, keys, ticks(n), Priority.CRITICAL)
    order: list[str] = []

    async def handle(event: Event, ctx: Context) -> None:
        order.append(ctx.priority)

    worker = make_worker(redis, keys, handle, concurrency=1)
    # when one worker with one handler slot starts
    async with running(worker):
        await eventually(at_least(2 * n, lambda: worker.stats.handled), what="all 100 handled")
    # then the first is critical, and while both lanes wait, each critical costs only w_low/w_crit of a low
    # (smooth weighted round robin, lanes.py): all criticals are done within n + ceil(n * w_low / w_crit)
    weights = worker.config.priority_weights
    bound = n + math.ceil(n * weights[Priority.LOW] / weights[Priority.CRITICAL])
    assert len(order) == 2 * n
    assert order[0] == "critical"
    last_critical = max(i for i, p in enumerate(order) if p == "critical") + 1
    assert last_critical <= bound, order
    assert order[bound:] == ["low"] * (2 * n - bound)


async def test_low_priority_is_not_starved_by_continuous_critical_traffic(redis, keys):
    # given a worker handling a continuous stream of critical ticks
    lows: set[str] = set()
    criticals = 0

    async def handle(event: Event, ctx: Context) -> None:
        nonlocal criticals
        if ctx.priority == "low":
            lows.add(event.event_id)
        else:
            criticals += 1

    worker = make_worker(redis, keys, handle, concurrency=1)
    stop = asyncio.Event()

    async def flood() -> None:
        async with Publisher(redis, keys=keys) as pub:
            while not stop.is_set():
                await pub.publish_many(ticks(50, "A"), priority=Priority.CRITICAL)

    async with running(worker):
        flooder = asyncio.create_task(flood())
        try:
            await eventually(at_least(100, lambda: criticals), what="critical traffic flowing")
            # when low ticks are published once, while the flood goes on
            low = ticks(20, "A")
            await publish(redis, keys, low, Priority.LOW)
            before = criticals

            async def all_lows() -> bool:
                return lows == {e.event_id for e in low}

            # then every low one is handled, and critical ones kept being handled meanwhile
            await eventually(all_lows, what="every low tick handled under critical flood")
            assert criticals > before
            assert not flooder.done()
        finally:
            stop.set()
            await flooder


# ---- 5: discovery ----------------------------------------------------------------------------------


async def test_new_symbol_stream_is_joined_while_running(redis, keys):
    # given a running worker reading the only stream that exists
    await publish(redis, keys, ticks(1, "OLD"))
    seen: list[str | None] = []

    async def handle(event: Event) -> None:
        seen.append(event.symbol)

    worker = make_worker(redis, keys, handle)
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the first event")
        assert worker.streams == [stream_of(keys, "OLD")]
        # when an event of a new symbol is published
        await publish(redis, keys, ticks(1, "NEW"))
        # then the worker joins the new stream and handles it
        await eventually(at_least(2, lambda: worker.stats.handled), what="the new symbol's event")
    assert seen == ["OLD", "NEW"]
    assert stream_of(keys, "NEW") in worker.streams
    assert await pending(redis, stream_of(keys, "NEW")) == 0


# ---- 6, 7, 8: failures, dead letters, signals ------------------------------------------------------


async def test_failing_twice_then_succeeding_is_handled_once(redis, keys):
    # given a handler that fails on its first two deliveries
    await publish(redis, keys, ticks(1))
    deliveries: list[int] = []
    successes = 0

    async def handle(event: Event, ctx: Context) -> None:
        nonlocal successes
        deliveries.append(ctx.delivery_count)
        if len(deliveries) <= 2:
            raise ValueError("flaky")
        successes += 1

    worker = make_worker(redis, keys, handle, max_deliveries=5)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the commit")
    # then the third delivery succeeded and was committed once; no dead letter, no failure record left
    assert deliveries == [1, 2, 3]
    assert successes == 1
    assert worker.stats.failed == 2
    assert worker.stats.dead_lettered == 0
    assert await list_dead_letters(redis, keys) == []
    assert await pending(redis, stream_of(keys)) == 0
    assert await redis.hlen(keys.failures(stream_of(keys))) == 0


async def test_always_failing_becomes_one_dead_letter_after_max_deliveries(redis, keys):
    # given an event whose handler always fails
    [entry_id] = await publish(redis, keys, ticks(1))
    [(_, original)] = await redis.xrange(stream_of(keys))
    deliveries: list[int] = []

    async def handle(event: Event, ctx: Context) -> None:
        deliveries.append(ctx.delivery_count)
        raise ValueError("cannot price this tick")

    worker = make_worker(redis, keys, handle, name="pricer", max_deliveries=3)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
    # then exactly one dead letter holds the facts and the original fields, and the entry is acked
    assert deliveries == [1, 2, 3]
    [letter] = await list_dead_letters(redis, keys)
    assert letter.origin_stream == stream_of(keys)
    assert letter.origin_id == entry_id
    assert letter.group == GROUP
    assert letter.consumer == worker.consumer
    assert letter.handler == "pricer"
    assert letter.error_type == "ValueError"
    assert letter.error == "cannot price this tick"
    assert letter.deliveries == 3
    assert 0 < letter.first_failure_ms <= letter.last_failure_ms
    assert letter.fields == {k.decode(): v for k, v in original.items()}
    assert await pending(redis, stream_of(keys)) == 0
    assert await redis.hlen(keys.failures(stream_of(keys))) == 0


GARBAGE = [
    pytest.param({b"type": b"Tick", b"v": b"1", b"enc": b"msgpack", b"data": b"\xff\x00garbage"},
                 {"DecodeError"}, id="bad-payload"),
    pytest.param({b"type": b"Tick", b"v": b"1", b"enc": b"msgpack"}, {"DecodeError"}, id="missing-field"),
    pytest.param({b"type": b"Tick", b"v": b"2", b"enc": b"msgpack", b"data": b"\x80"},
                 {"DecodeError"}, id="newer-version"),
    pytest.param({b"type": b"NoSuchEvent", b"v": b"1", b"enc": b"msgpack", b"data": b"\x80"},
                 {"UnknownEventType"}, id="unknown-type"),
]


@pytest.mark.parametrize(("fields", "error_types"), GARBAGE)
async def test_undecodable_entry_is_dead_lettered_at_once_and_work_goes_on(redis, keys, fields, error_types):
    # given a stream the worker reads, holding a good event, an entry not written by fabric, then more events
    [before] = ticks(1)
    await publish(redis, keys, [before])
    garbage_id = await redis.xadd(stream_of(keys), fields)
    after = ticks(3)
    await publish(redis, keys, after)
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.event_id)

    worker = make_worker(redis, keys, handle)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
        await eventually(at_least(4, lambda: worker.stats.handled), what="the good events")
    # then the garbage is a dead letter on its first delivery with its bytes intact, and the good ones handled
    [letter] = await list_dead_letters(redis, keys)
    assert letter.origin_id == garbage_id.decode()
    assert letter.error_type in error_types
    assert letter.error
    assert letter.deliveries == 1
    assert letter.fields == {k.decode(): v for k, v in fields.items()}
    assert sorted(seen) == sorted([before.event_id, *(e.event_id for e in after)])
    assert worker.stats.failed == 0
    assert await pending(redis, stream_of(keys)) == 0


async def test_reject_dead_letters_at_once(redis, keys):
    # given a handler that rejects its input
    await publish(redis, keys, ticks(1))
    calls = 0

    async def handle(event: Event) -> None:
        nonlocal calls
        calls += 1
        raise Reject("negative spread")

    worker = make_worker(redis, keys, handle, max_deliveries=5)
    # when the worker handles it
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
    # then it is dead-lettered on the first delivery, with the reason, and acked
    assert calls == 1
    [letter] = await list_dead_letters(redis, keys)
    assert letter.error_type == "Reject"
    assert letter.error == "negative spread"
    assert letter.deliveries == 1
    assert await pending(redis, stream_of(keys)) == 0


async def test_a_replayed_dead_letter_is_handled_again_only_by_its_own_group(redis, keys):
    # given a tick handled by group "audit" and dead-lettered by group "g" (which rejected it)
    await publish(redis, keys, ticks(1))
    seen: Counter[str] = Counter()

    async def audit(event: Event) -> None:
        seen["audit"] += 1

    async def strict(event: Event) -> None:
        seen["g"] += 1
        if seen["g"] == 1:
            raise Reject("not yet")

    auditor = Worker(redis, as_handler(audit), config(group="audit"), keys=keys)
    worker = make_worker(redis, keys, strict)
    async with running(auditor, worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
        await eventually(at_least(1, lambda: auditor.stats.handled), what="the audit")
        # when the dead letter is replayed
        [letter] = await list_dead_letters(redis, keys)
        assert await replay(redis, letter) is not None
        # then group g handles it again, and the auditor acks the replay without handling it twice
        await eventually(at_least(1, lambda: worker.stats.handled), what="the replay handled by g")
        await eventually(at_least(2, lambda: auditor.stats.handled), what="the replay acked by audit")
    assert seen == Counter({"g": 2, "audit": 1})
    assert await pending(redis, stream_of(keys), group="audit") == 0


async def test_retry_redelivers_then_succeeds(redis, keys):
    # given a handler that asks for a retry on its first delivery
    await publish(redis, keys, ticks(1))
    deliveries: list[int] = []

    async def handle(event: Event, ctx: Context) -> None:
        deliveries.append(ctx.delivery_count)
        if ctx.delivery_count == 1:
            raise Retry(after_ms=50, reason="venue busy")

    worker = make_worker(redis, keys, handle, max_deliveries=5)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the commit")
    # then it was delivered again (count 2) and committed, with no dead letter
    assert deliveries == [1, 2]
    assert worker.stats.handled == 1
    assert await list_dead_letters(redis, keys) == []
    assert await pending(redis, stream_of(keys)) == 0


# ---- 9, 10, 11: live and dead consumers (idle times: real server only) -----------------------------


@pytest.mark.real_only
async def test_slow_handler_in_live_worker_is_not_reclaimed_by_another(redis, keys):
    # given two live workers of one group and a handler that takes three reclaim idle times
    await publish(redis, keys, ticks(1))
    idle_ms = FAST["reclaim_idle_ms"]
    calls: list[str] = []
    never = asyncio.Event()

    async def handle(event: Event, ctx: Context) -> None:
        calls.append(ctx.consumer)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(never.wait(), 3 * idle_ms / 1000)

    a = make_worker(redis, keys, handle, consumer="a")
    b = make_worker(redis, keys, handle, consumer="b")
    # when the event is handled
    async with running(a, b):
        await eventually(at_least(1, lambda: a.stats.handled + b.stats.handled), what="the commit")
    # then it was handled exactly once: the holder's heartbeat kept the other from reclaiming it
    assert len(calls) == 1
    assert a.stats.handled + b.stats.handled == 1
    assert a.stats.reclaimed == b.stats.reclaimed == 0
    assert a.stats.refused == b.stats.refused == 0
    assert await pending(redis, stream_of(keys)) == 0


@pytest.mark.real_only
async def test_entries_of_a_dead_consumer_are_reclaimed_and_handled(redis, keys):
    # given entries read by consumer "dead", which never acks them
    n = 5
    events = ticks(n)
    await publish(redis, keys, events)
    stream = stream_of(keys)
    await redis.xgroup_create(stream, GROUP, id="0")
    reply = await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=n)
    assert len(reply[0][1]) == n
    seen: dict[str, int] = {}

    async def handle(event: Event, ctx: Context) -> None:
        seen[event.event_id] = ctx.delivery_count

    worker = make_worker(redis, keys, handle)
    # when a live worker runs past reclaim_idle_ms
    async with running(worker):
        await eventually(at_least(n, lambda: worker.stats.handled), what="the reclaimed entries handled")
    # then it took them over (a second delivery each) and handled them
    assert seen == {e.event_id: 2 for e in events}
    assert worker.stats.reclaimed >= n
    assert await pending(redis, stream) == 0


@pytest.mark.real_only
async def test_pending_entry_trimmed_from_stream_is_counted(redis, keys):
    # given an entry pending for consumer "dead" and then deleted from its stream
    [entry_id] = await publish(redis, keys, ticks(1))
    stream = stream_of(keys)
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=1)
    assert await redis.xdel(stream, entry_id) == 1
    calls = 0

    async def handle(event: Event) -> None:
        nonlocal calls
        calls += 1

    worker = make_worker(redis, keys, handle)
    field = f"trimmed_pending:{stream}"

    async def counted() -> bytes | None:
        value: bytes | None = await redis.hget(keys.counters(), field)
        return value

    # when a live worker's reclaim finds it
    async with running(worker):
        await eventually(counted, what="the trimmed_pending counter")
    # then it is counted once, in the stats and in the counters hash, and nothing was handled
    assert worker.stats.trimmed_pending == 1
    assert await redis.hget(keys.counters(), field) == b"1"
    assert calls == 0
    assert await pending(redis, stream) == 0


async def left_by_dead(redis: Any, keys: Keys, counts: dict[str, int]) -> dict[str, str]:
    """Entries of the given symbols, read by consumer "dead", which never acks them; symbol -> stream."""
    streams = {}
    for symbol, n in counts.items():
        await publish(redis, keys, ticks(n, symbol))
        streams[symbol] = stream = stream_of(keys, symbol)
        await redis.xgroup_create(stream, GROUP, id="0")
        assert len((await redis.xreadgroup(GROUP, "dead", {stream: ">"}, count=n))[0][1]) == n
    return streams


async def idle_for(redis: Any, streams: dict[str, str], ms: int) -> None:
    """Wait until every pending entry of the streams has been idle for ``ms``."""
    async def all_idle() -> bool:
        for stream in streams.values():
            total = await pending(redis, stream)
            if len(await redis.xpending_range(stream, GROUP, "-", "+", total, idle=ms)) < total:
                return False
        return True

    await eventually(all_idle, what=f"the pending entries idle for {ms} ms")


async def reclaiming(redis: Any, keys: Keys, counts: dict[str, int], **overrides: Any) -> tuple[Worker, dict[str, str]]:
    """A dead consumer's entries (``left_by_dead``), idle past the reclaim time of a worker joined to their streams
    (not running: the test calls its ``reclaim``)."""
    streams = await left_by_dead(redis, keys, counts)
    worker = make_worker(redis, keys, _nothing, reclaim_idle_ms=30, **overrides)
    await worker.discover()
    await idle_for(redis, streams, 30)
    return worker, streams


async def mine(redis: Any, stream: str, consumer: str) -> int:
    return len(await redis.xpending_range(stream, GROUP, "-", "+", 10_000, consumername=consumer))


@pytest.mark.real_only
async def test_one_reclaim_pass_takes_all_a_dead_consumer_left_while_the_lanes_have_room(redis, keys):
    # given a dead consumer's entries: 250 on one stream (more than one call claims) and 10 on each of two others
    counts = {"A": 250, "B": 10, "C": 10}
    worker, streams = await reclaiming(redis, keys, counts)

    # when one reclaim pass runs (the lanes take 1,024 a priority)
    taken = await worker.reclaim()

    # then it took every one, each once: the stream that filled its share was asked again while there was room
    assert taken == worker.stats.reclaimed == 270
    assert {s: await mine(redis, stream, worker.consumer) for s, stream in streams.items()} == counts
    assert sum([await mine(redis, stream, "dead") for stream in streams.values()]) == 0


@pytest.mark.real_only
async def test_a_reclaim_pass_takes_no_more_than_the_lanes_have_room_for(redis, keys):
    # given a dead consumer's 90 entries over three streams, and a worker whose lanes take 50 each
    worker, streams = await reclaiming(redis, keys, {"A": 30, "B": 30, "C": 30}, prefetch=50)

    # when a reclaim pass runs, and another while nothing has been handled
    first = await worker.reclaim()
    second = await worker.reclaim()

    # then the first filled the lane and the second took nothing: the rest stays the dead consumer's for later
    assert (first, second) == (50, 0)
    assert sum([await mine(redis, stream, "dead") for stream in streams.values()]) == 40


@pytest.mark.real_only
async def test_a_stream_whose_reclaim_fails_does_not_keep_the_others_from_theirs(redis, keys):
    # given a dead consumer's entries on two streams, and the group gone from the stream the worker asks first
    worker, _ = await reclaiming(redis, keys, {"A": 5, "B": 5})
    first, other = worker._streams  # (the order a pass asks them in)
    await redis.xgroup_destroy(first, GROUP)

    # when a reclaim pass runs, then it fails with that stream's error
    with pytest.raises(rex.ResponseError, match="NOGROUP"):
        await worker.reclaim()

    # and the other stream's entries were taken all the same
    assert worker.stats.reclaimed == 5
    assert await mine(redis, other, worker.consumer) == 5


@pytest.mark.real_only
async def test_a_reclaim_pass_ends_at_the_round_the_worker_stops_in(redis, keys):
    # given a dead consumer's 250 entries on one stream (three rounds of 100 at most), and a worker that is told
    # to stop as its first round ends
    worker, streams = await reclaiming(redis, keys, {"A": 250})
    first_round = worker._reclaim_round

    async def then_stop(asking: Any) -> Any:
        result = await first_round(asking)
        worker.stop()
        return result

    worker._reclaim_round = then_stop  # type: ignore[method-assign]

    # when a reclaim pass runs
    taken = await worker.reclaim()

    # then it took the first round's entries only: the rest stays the dead consumer's, for a live worker
    assert taken == worker.stats.reclaimed == 100
    assert await mine(redis, streams["A"], "dead") == 150


@pytest.mark.real_only
async def test_a_rounds_entries_are_held_before_a_trimmed_pending_count_can_fail(redis, keys):
    # given a dead consumer's entries on two streams, those of the stream asked first deleted from it; and the
    # count of trimmed entries failing (Redis refusing the write, a connection lost)
    worker, _ = await reclaiming(redis, keys, {"A": 5, "B": 5})
    first, other = worker._streams  # (the order a pass asks them in)
    assert await redis.xdel(first, *[entry_id for entry_id, _ in await redis.xrange(first)]) == 5

    async def fails(stream: str, ids: list[bytes]) -> None:
        raise rex.ConnectionError("lost")

    worker._trimmed_pending = fails  # type: ignore[method-assign]

    # when a reclaim pass runs, then it fails with that error
    with pytest.raises(rex.ConnectionError):
        await worker.reclaim()

    # and the other stream's entries, claimed in the same round trip, are queued, held (touched by the heartbeat,
    # handed back on a stop) and counted
    assert len(worker._held[other]) == 5 and len(worker._lanes) == 5
    assert worker.stats.reclaimed == 5


@pytest.mark.real_only
async def test_a_lane_with_less_room_than_streams_reclaims_them_in_turn(redis, keys):
    # given a dead consumer's entry on each of three streams, and a worker whose lanes take 2
    worker, streams = await reclaiming(redis, keys, {"A": 1, "B": 1, "C": 1}, prefetch=2)

    # when a pass fills the lane, its two entries are handled (taken out of the lane), and another pass runs
    first = await worker.reclaim()
    taken = [worker._lanes.get_nowait() for _ in range(first)]
    second = await worker.reclaim()

    # then the second pass started one stream further on and reached the third stream
    assert (first, second, len(taken)) == (2, 1, 2)
    assert {s: await mine(redis, stream, worker.consumer) for s, stream in streams.items()} == {"A": 1, "B": 1, "C": 1}


async def _nothing(event: Event) -> None:
    pass


# ---- 12: graceful stop -----------------------------------------------------------------------------


async def test_stop_under_load_loses_nothing_and_leaks_no_task(redis, keys):
    # given many events and a slow-ish handler
    n = 2000
    events = ticks(n)
    await publish(redis, keys, events)
    stream = stream_of(keys)
    done: Counter[str] = Counter()

    async def handle(event: Event) -> None:
        await asyncio.sleep(0.005)
        done[event.event_id] += 1

    worker = make_worker(redis, keys, handle, concurrency=8)
    before = asyncio.all_tasks()
    task = asyncio.create_task(worker.run())
    await eventually(at_least(50, lambda: worker.stats.handled), what="work under way")
    # when the worker is stopped mid-run
    worker.stop()
    await stopped([task])  # then run returns without error
    # and every entry is acked (handled once), still pending, or not yet delivered: nothing is lost
    assert all(c == 1 for c in done.values())
    assert worker.stats.handled == len(done)
    assert worker.stats.handled < n
    groups = await redis.xinfo_groups(stream)
    [group] = [g for g in groups if g["name"] == GROUP.encode()]
    undelivered = len(await redis.xrange(stream, f"({group['last-delivered-id'].decode()}", "+"))
    assert worker.stats.handled + await pending(redis, stream) + undelivered == n
    # and every task the worker created is done
    assert {t for t in asyncio.all_tasks() if t not in before} == set()


async def test_stop_returns_even_if_a_step_swallows_its_cancellation(redis, keys):
    # given a running worker whose reclaim step, once, swallows the cancellation that ends it: what Python
    # 3.11's asyncio.wait_for does when the cancel lands as the inner call completes (redis-py wraps every
    # send in wait_for when socket_timeout is set)
    worker = make_worker(redis, keys, lambda_none)
    original = worker.reclaim
    swallowing = asyncio.Event()

    async def reclaim() -> int:
        if swallowing.is_set():
            return await original()
        swallowing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return 0

    worker.reclaim = reclaim  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    await eventually(lambda: _is_set(swallowing), what="the reclaim step under way")
    # when the worker is stopped
    worker.stop()
    # then run() still returns
    await stopped([task])


async def lambda_none(event: Event) -> None:
    return None


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


# ---- acks held back at a low rate (ACK_LINGER_S), never entries with outputs ---------------------------


@pytest.fixture
def long_ack_linger(monkeypatch):
    """Acks alone wait a minute for company: long past any deadline of these tests."""
    monkeypatch.setattr(worker_module, "ACK_LINGER_S", 60.0)


async def test_lone_acks_linger_and_the_stop_sends_them(redis, keys, long_ack_linger):
    # given a worker whose acks alone linger, handling one tick, then another published after it
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.event_id)

    worker = make_worker(redis, keys, handle)
    task = asyncio.create_task(worker.run())
    try:
        await publish(redis, keys, ticks(1))
        await eventually(at_least(1, lambda: len(seen)), what="the first handled")
        await publish(redis, keys, ticks(1))
        await eventually(at_least(2, lambda: len(seen)), what="the second handled")
        # when both handlers have run, both entries are still pending: their acks wait for more
        assert await pending(redis, stream_of(keys)) == 2 and worker.stats.handled == 0
    finally:
        # then the stop sends the acks at once: acked, not left for a redelivery
        worker.stop()
        await stopped([task])
    assert worker.stats.handled == 2
    assert await pending(redis, stream_of(keys)) == 0


async def test_an_entry_with_outputs_is_committed_without_the_ack_linger(redis, keys, long_ack_linger):
    # given a tick, a handler that turns it into a bar, and acks alone lingering a minute
    await publish(redis, keys, ticks(1))

    async def handle(event: Tick) -> Bar:
        return bar_from(event)

    worker = make_worker(redis, keys, handle, name="bars")
    async with running(worker):
        # then the commit goes without waiting: the bar is written and the tick acked within the test's deadline
        await eventually(at_least(1, lambda: worker.stats.handled), what="the commit")
        assert await pending(redis, stream_of(keys)) == 0
        assert len(await redis.xrange(stream_of(keys, topic="bar"))) == 1


async def test_a_batch_filled_while_lingering_goes_without_the_rest_of_the_linger(redis, keys, long_ack_linger):
    # given acks alone lingering a minute, a commit batch of 8, and 4 ticks handled, their acks held back
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.event_id)

    worker = make_worker(redis, keys, handle, commit_batch=8)
    async with running(worker):
        await publish(redis, keys, ticks(4))
        await eventually(at_least(4, lambda: len(seen)), what="the first 4 handled")
        assert await pending(redis, stream_of(keys)) == 4
        # when 4 more fill the batch
        await publish(redis, keys, ticks(4))
        # then all 8 are acked without waiting out the linger
        await eventually(at_least(8, lambda: worker.stats.handled), what="8 acks")
        assert await pending(redis, stream_of(keys)) == 0


async def test_with_a_small_prefetch_a_batch_is_full_at_half_the_held_entries(redis, keys, long_ack_linger):
    # given acks alone lingering a minute, and a cap on held entries (4 lanes x prefetch 4 + 2 handler slots = 18)
    # far below commit_batch (512): a batch of 512 acks would never fill while the reader waits at the cap
    await publish(redis, keys, ticks(200))

    async def handle(event: Event) -> None:
        return None

    worker = make_worker(redis, keys, handle, prefetch=4, concurrency=2)
    async with running(worker):
        # then every 9 acks (half the cap) go without lingering: all but the last few are acked
        await eventually(at_least(200 - 9, lambda: worker.stats.handled), what="all but the last 9 acked")
    assert worker.stats.handled == 200  # and the stop sends the rest


# ---- the group's world changing under a running worker -------------------------------------------------


async def test_a_bad_key_in_a_topic_registry_is_skipped_not_fatal(redis, keys):
    # given a topic registry holding a key that is no fabric stream, next to a real stream
    await redis.sadd(keys.topic_registry("tick"), f"{keys.ns}:s:tick:urgent:{{X}}", "not-a-stream")
    await publish(redis, keys, ticks(3))
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.event_id)

    worker = make_worker(redis, keys, handle)
    # when a worker starts on the topic
    async with running(worker):
        await eventually(at_least(3, lambda: worker.stats.handled), what="the real stream handled")
    # then it handled the real stream and joined nothing else
    assert len(seen) == 3
    assert worker.streams == [stream_of(keys)]


@pytest.mark.real_only
async def test_a_stream_deleted_under_a_running_worker_is_rejoined(redis, keys):
    # given a worker that has handled one event of a stream
    await publish(redis, keys, ticks(1))
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.event_id)

    worker = make_worker(redis, keys, handle)
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the first event")
        # when the stream key is deleted (its group with it) and a new event is published to it
        await redis.delete(stream_of(keys))
        [later] = ticks(1)
        await publish(redis, keys, [later])
        # then the worker rejoins and handles it
        await eventually(lambda: asyncio.sleep(0, result=later.event_id in seen), what="the later event")
    assert await pending(redis, stream_of(keys)) == 0


# ---- review of the hot-path rewrite: handler timeouts under a worker ----------------------------------
# (fabric.handler.timeout on its own is in tests/test_handler_timeout.py)


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered_as_a_timeout(redis, keys):
    # given an event whose handler hangs on every delivery, under a 0.2 s handler timeout
    [entry_id] = await publish(redis, keys, ticks(1))
    stream = stream_of(keys)
    never = asyncio.Event()
    deliveries: list[int] = []
    records: list[bytes | None] = []

    async def handle(event: Event, ctx: Context) -> None:
        deliveries.append(ctx.delivery_count)
        if ctx.delivery_count > 1:  # the failure record the previous delivery left
            records.append(await redis.hget(keys.failures(stream), f"{GROUP}/{ctx.entry_id}"))
        await never.wait()

    worker = make_worker(redis, keys, handle, name="hangs", handler_timeout_s=0.2, max_deliveries=3)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
    # then each delivery failed as a timeout, was recorded as one and retried, and the third became a dead letter
    assert deliveries == [1, 2, 3]
    assert worker.stats.failed == 3
    assert len(records) == 2
    assert all(r is not None and b"|hangs|TimeoutError|" in r for r in records), records
    [letter] = await list_dead_letters(redis, keys)
    assert letter.origin_id == entry_id
    assert letter.error_type == "TimeoutError"
    assert "0.2 s timeout" in letter.error
    assert letter.deliveries == 3
    assert await pending(redis, stream) == 0
    assert await redis.hlen(keys.failures(stream)) == 0


@pytest.mark.parametrize("theirs", [False, True], ids=["fabrics-own", "with-theirs"])
async def test_a_hung_handler_times_out_under_fabrics_metrics_and_log_context(redis, keys, theirs):
    # given a handler that hangs, measured and logged as `fabric worker --metrics-port` runs it (middleware blind to
    # timeouts: the worker times the calls itself, no timed layer), and in one case a middleware of the user's too
    await publish(redis, keys, ticks(1))
    never = asyncio.Event()
    seen: list[str] = []

    def theirs_(inner: Any) -> Any:
        async def handle(event: Event, ctx: Context) -> Any:
            try:
                return await inner(event, ctx)
            except BaseException as exc:
                seen.append(type(exc).__name__)
                raise

        return handle

    async def hangs(event: Event) -> None:
        await never.wait()

    tallies = HandlerTallies()
    chain = [measured(tallies), log_context, *([theirs_] if theirs else [])]
    worker = Worker(redis, as_handler(hangs, "hangs"), config(handler_timeout_s=0.2, max_deliveries=1), keys=keys,
                    handler_name="hangs", middleware=chain)
    # when the worker runs
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the dead letter")
    # then the call failed as a timeout and was measured; the user's middleware (only then a timed layer) saw the
    # TimeoutError
    [letter] = await list_dead_letters(redis, keys)
    assert letter.error_type == "TimeoutError"
    assert tallies.duration.count == 1 and tallies.latency.count == 0
    assert worker._times_calls is not theirs
    assert seen == (["TimeoutError"] if theirs else [])


async def test_handlers_that_finish_in_time_are_untouched_by_the_timeout(redis, keys):
    # given events whose handler yields to the loop and returns a bar, under a handler timeout
    events = ticks(20)
    await publish(redis, keys, events)

    async def handle(event: Tick) -> Bar:
        await asyncio.sleep(0)
        return bar_from(event)

    worker = make_worker(redis, keys, handle, handler_timeout_s=30)
    # when the worker handles them
    async with running(worker):
        await eventually(at_least(20, lambda: worker.stats.handled), what="20 commits")
    # then every one was committed with its output, and nothing failed
    assert worker.stats.failed == 0
    assert await redis.xlen(stream_of(keys, topic="bar")) == 20
    assert await pending(redis, stream_of(keys)) == 0
    assert await list_dead_letters(redis, keys) == []


async def test_a_handler_that_swallows_its_timeout_and_returns_is_committed(redis, keys):
    # given a handler that catches the timeout's cancellation and returns a bar anyway
    [tick] = ticks(1)
    await publish(redis, keys, [tick])
    never = asyncio.Event()
    interrupted: list[int] = []

    async def handle(event: Tick, ctx: Context) -> Bar:
        try:
            await never.wait()
        except asyncio.CancelledError:
            interrupted.append(ctx.delivery_count)
        return bar_from(event)

    worker = make_worker(redis, keys, handle, handler_timeout_s=0.2)
    # when its call runs past the timeout
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.handled), what="the commit")
    # then it was interrupted once, and its result stands: committed with its output, no failure
    assert interrupted == [1]
    assert worker.stats.failed == 0
    [(_, fields)] = await redis.xrange(stream_of(keys, topic="bar"))
    assert decode_fields(fields).causation_id == tick.event_id
    assert await pending(redis, stream_of(keys)) == 0
    assert await list_dead_letters(redis, keys) == []


async def test_after_a_timeout_the_same_dispatcher_handles_the_next_entry_normally(redis, keys):
    # given one dispatcher, and two events: the first one's handler hangs, the second's does not
    first, second = ticks(2)
    await publish(redis, keys, [first, second])
    never = asyncio.Event()
    cancelling: list[int] = []

    async def handle(event: Event) -> None:
        if event.event_id == first.event_id:
            await never.wait()
        task = asyncio.current_task()
        assert task is not None
        cancelling.append(task.cancelling())
        async with asyncio.timeout(30):  # a handler's own timeout must work after the worker's fired
            await asyncio.sleep(0)

    worker = make_worker(redis, keys, handle, concurrency=1, handler_timeout_s=0.2, max_deliveries=1)
    # when the first times out (and is dead-lettered: one delivery allowed)
    async with running(worker):
        await eventually(at_least(1, lambda: worker.stats.dead_lettered), what="the timed-out first event")
        await eventually(at_least(1, lambda: worker.stats.handled), what="the second event")
    # then the dispatcher was not left cancelling, and the second was handled and committed
    assert cancelling == [0]
    [letter] = await list_dead_letters(redis, keys)
    assert letter.error_type == "TimeoutError"
    assert decode_fields({k.encode(): v for k, v in letter.fields.items()}).event_id == first.event_id
    assert await pending(redis, stream_of(keys)) == 0


# ---- review of the hot-path rewrite: dispatchers taking turns, priority under a backlog ----------------


async def test_handlers_waiting_on_io_do_not_hold_up_the_other_dispatchers(redis, keys):
    # given four dispatchers and four events whose handler waits on a gate (I/O that has not answered yet)
    await publish(redis, keys, ticks(4))
    gate = asyncio.Event()
    in_flight = 0
    peak = 0

    async def handle(event: Event) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1

    worker = make_worker(redis, keys, handle, concurrency=4)
    async with running(worker):
        # when the handlers start, then all four are in flight at once
        await eventually(lambda: asyncio.sleep(0, result=in_flight == 4), what="4 handlers in flight at once")
        gate.set()
        await eventually(at_least(4, lambda: worker.stats.handled), what="4 commits")
    assert peak == 4
    assert await pending(redis, stream_of(keys)) == 0


async def _delivered(redis: Any, stream: str, n: int) -> bool:
    """True once ``n`` entries of ``stream`` are pending for the group (read by a worker, not yet acked)."""
    if not await redis.exists(stream):
        return False
    try:
        return await pending(redis, stream) == n
    except rex.ResponseError:  # the worker has not joined the stream yet: no group
        return False


async def test_critical_entries_arriving_under_a_low_backlog_overtake_it(redis, keys):
    # given one dispatcher holding a whole backlog of low entries, stuck on the first one's handler
    backlog, urgent = 200, 5
    await publish(redis, keys, ticks(backlog), Priority.LOW)
    gate = asyncio.Event()
    started = asyncio.Event()
    order: list[str] = []

    async def handle(event: Event, ctx: Context) -> None:
        if not started.is_set():
            started.set()
            await gate.wait()
        order.append(ctx.priority)

    worker = make_worker(redis, keys, handle, concurrency=1)
    async with running(worker):
        await eventually(lambda: asyncio.sleep(0, result=started.is_set()), what="the first low handler")
        await eventually(lambda: _delivered(redis, stream_of(keys, priority=Priority.LOW), backlog),
                         what="the whole low backlog read by the worker")
        # when critical entries are published and read by the worker, and the stuck handler then finishes
        await publish(redis, keys, ticks(urgent), Priority.CRITICAL)
        await eventually(lambda: _delivered(redis, stream_of(keys, priority=Priority.CRITICAL), urgent),
                         what="the critical entries read by the worker")
        gate.set()
        await eventually(at_least(backlog + urgent, lambda: worker.stats.handled), what="everything handled")
    # then the first critical one was handled before the low backlog was done
    assert sorted(set(order)) == ["critical", "low"] and len(order) == backlog + urgent
    lows_before_first_critical = order.index("critical")
    assert lows_before_first_critical < backlog, order


# ---- review of the hot-path rewrite: a handler's own CancelledError ------------------------------------


async def test_a_handler_raising_cancelled_error_is_a_failure_and_the_worker_goes_on(redis, keys):
    # given one dispatcher and two events; the first one's handler awaits a future that someone else cancelled
    # (a request shared with another caller, who gave up on it): CancelledError, though nobody cancelled the worker
    first, second = ticks(2)
    await publish(redis, keys, [first, second])
    shared = asyncio.get_running_loop().create_future()
    shared.cancel()
    handled: list[str] = []

    async def handle(event: Event) -> None:
        if event.event_id == first.event_id:
            await shared
        handled.append(event.event_id)

    worker = make_worker(redis, keys, handle, concurrency=1, max_deliveries=1)
    async with running(worker) as [task]:
        # when the worker runs
        await eventually(lambda: asyncio.sleep(0, result=task.done() or worker.stats.handled >= 1),
                         what="the second event handled, or the worker gone")
        # then it is still running: the first event failed (a dead letter, one delivery allowed), the second handled
        assert not task.done(), "Worker.run() returned although nobody stopped it"
    assert handled == [second.event_id]
    [letter] = await list_dead_letters(redis, keys)
    assert letter.error_type == "CancelledError"


# ---- review of the hot-path rewrite: Redis errors while committing -------------------------------------


async def test_a_connection_error_while_registering_an_output_stream_is_retried(redis, keys, monkeypatch):
    # given a handler whose output goes to a stream not registered yet, and a connection that drops the first
    # time anyone registers that stream (the pool's connection was stale: Redis restarted, or a proxy cut it)
    [tick] = ticks(1)
    await publish(redis, keys, [tick])
    registry = keys.topic_registry("bar")
    dropped: list[bool] = []
    real_pipeline = redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute, real_sadd = pipe.execute, pipe.sadd
        registers: list[bool] = []

        def sadd(name: Any, *values: Any) -> Any:  # the cluster's pipeline keeps its queue elsewhere: watch here
            registers.append(name == registry)
            return real_sadd(name, *values)

        async def execute(*a: Any, **k: Any) -> Any:
            if any(registers) and not dropped:
                dropped.append(True)
                raise rex.ConnectionError("Connection closed by server.")
            return await real_execute(*a, **k)

        pipe.execute, pipe.sadd = execute, sadd
        return pipe

    monkeypatch.setattr(redis, "pipeline", pipeline)

    async def handle(event: Tick) -> Bar:
        return bar_from(event)

    worker = make_worker(redis, keys, handle)
    async with running(worker) as [task]:
        # when the worker commits the handler's output
        await eventually(lambda: asyncio.sleep(0, result=task.done() or worker.stats.handled >= 1),
                         what="the commit, or the worker gone")
        # then the dropped registration is retried like any other write: the worker runs on, the commit lands
        assert dropped == [True]
        assert not task.done(), "Worker.run() ended on a connection error while committing"
    assert worker.stats.handled == 1
    assert await redis.xlen(stream_of(keys, topic="bar")) == 1
    assert await redis.smembers(registry) == {stream_of(keys, topic="bar").encode()}
