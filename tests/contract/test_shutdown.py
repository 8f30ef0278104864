"""What a graceful stop hands back to the group, and at what delivery count."""

import asyncio

import pytest

from fabric import Priority, Publisher, Worker, WorkerConfig
from fabric.events import Tick
from fabric.handler import as_handler
from tests.waiting import eventually
from tests.workers import running


async def taken_over(redis, keys, n: int) -> dict[str, int]:
    """Run a second worker, whose reclaim time is long (it takes over only what was handed back), until it has
    handled ``n`` events; their delivery counts by event id."""
    counts: dict[str, int] = {}

    async def record(event: Tick, ctx) -> None:
        counts[event.event_id] = ctx.delivery_count

    second = Worker(redis, as_handler(record), WorkerConfig(group="g", topics=["tick"], block_ms=50,
                                                            reclaim_idle_ms=600_000, reclaim_interval_ms=50,
                                                            consumer="second"), keys=keys)
    async with running(second):
        await eventually(lambda: asyncio.sleep(0, result=len(counts) == n), what=f"all {n} taken over")
    return counts


@pytest.mark.real_only
async def test_entries_read_ahead_but_never_started_go_back_with_their_delivery_count(redis, keys):
    # given a worker holding one entry in its handler and 19 read ahead, never started
    gate = asyncio.Event()
    started: list[str] = []

    async def stuck(event: Tick) -> None:
        started.append(event.event_id)
        await gate.wait()

    first = Worker(redis, as_handler(stuck), WorkerConfig(group="g", topics=["tick"], block_ms=50, concurrency=1,
                                                          grace_s=0.05, consumer="first"), keys=keys)
    async with Publisher(redis, keys=keys) as pub:
        ids = [e.event_id for e in [Tick(symbol="A", bid=1, ask=2) for _ in range(20)]]
        await pub.publish_many([Tick(symbol="A", bid=1, ask=2, event_id=i) for i in ids])
    run = asyncio.create_task(first.run())
    await eventually(lambda: asyncio.sleep(0, result=len(started) == 1), what="one entry in the handler")

    # when it stops gracefully (the stuck handler outlives the grace period)
    first.stop()
    await run

    # then a second worker with a long reclaim time takes all 20 over at once, the 19 unstarted at delivery 1
    counts = await taken_over(redis, keys, 20)
    assert counts[started[0]] == 2
    assert all(counts[i] == 1 for i in ids if i != started[0])


async def _never_unblock(reads: object) -> None:
    return None


@pytest.mark.real_only  # blocking reads
@pytest.mark.single_redis  # a cluster's reader polls its slots: it sends no read ahead
async def test_a_read_sent_ahead_hands_its_entries_back_at_the_stop(redis, keys):
    # given a worker whose one handler slot is stuck on a low tick, with more low ticks waiting in its lanes: its
    # critical reader, which takes one entry at a time, keeps its next read sent ahead
    gate = asyncio.Event()
    lows_started: list[str] = []

    async def stuck_on_lows(event: Tick, ctx) -> None:
        if ctx.priority == "low":
            lows_started.append(event.event_id)
            await gate.wait()

    first = Worker(redis, as_handler(stuck_on_lows), WorkerConfig(
        group="g", topics=["tick"], block_ms=2_000, concurrency=1, grace_s=0.05, consumer="first"), keys=keys)
    # (its blocked reads run on past the stop, as for a Redis user refused CLIENT UNBLOCK, or for entries that land
    # before the stop's unblock does: the reads in flight then deliver them during the drain)
    first._unblock = _never_unblock  # type: ignore[method-assign]
    crit = keys.stream("tick", Priority.CRITICAL, "A")
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([Tick(symbol="A", bid=1, ask=2) for _ in range(20)], priority=Priority.LOW)
        run = asyncio.create_task(first.run())
        await eventually(lambda: asyncio.sleep(0, result=len(lows_started) == 1), what="a low tick in the handler")
        criticals = [Tick(symbol="A", bid=1, ask=2) for _ in range(3)]
        for i, event in enumerate(criticals):  # one at a time, each taken before the next is published
            if i == 1:
                first.stop()  # when the worker stops with reads in flight, and two more critical ticks come
            delivered = first.stats.delivered
            await pub.publish_many([event], priority=Priority.CRITICAL)
            await eventually(lambda d=delivered: asyncio.sleep(0, result=first.stats.delivered > d),
                             what="the critical tick read")
    await run

    # then the last came with the read sent ahead (the one in flight took the one before): all three were
    # delivered to "first", none was left unread, and they went back to the group, their delivery undone
    pending = await redis.xpending_range(crit, "g", "-", "+", 10)
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"first", 0)] * 3
    counts = await taken_over(redis, keys, 23)
    assert all(counts[e.event_id] == 1 for e in criticals)
