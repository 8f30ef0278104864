"""New streams are announced (``fabric.registry``): a producer or a worker's outputs that add a stream to a topic's
registry publish the topic on ``Keys.new_streams_channel``, and workers of the topic join the stream then.

The workers here discover only every minute (``SLOW``), far past the deadline of any wait below: a stream they
join in time was joined on its announcement."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import Publisher
from fabric.events import Action, Event, Signal, Tick
from fabric.handler import Context
from fabric.keys import Keys, Priority
from tests.backends import on_every_node
from tests.contract.test_worker import make_worker, publish, ticks
from tests.waiting import eventually
from tests.workers import running

SLOW = {"discover_interval_ms": 60_000}
END = b"--end--"


@contextlib.asynccontextmanager
async def announcements(redis: Any, keys: Keys) -> AsyncIterator[list[bytes]]:
    """The topics announced on the namespace's channel while the block runs (after it, all of them: the block's
    end is marked by an announcement of its own, awaited and left out)."""
    got: list[bytes] = []
    channel = keys.new_streams_channel()
    await redis.ping()  # (a cluster client finds its nodes on its first command; its pub/sub needs them)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)

    async def listen() -> None:
        async for message in pubsub.listen():
            got.append(message["data"])

    listener = asyncio.create_task(listen())
    try:
        yield got
        await redis.publish(channel, END)
        await eventually(lambda: _has(got, END), what="the end of the announcements")
        got.remove(END)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()


async def test_a_stream_new_to_redis_is_announced_once_with_its_topic(redis, keys: Keys) -> None:
    # given a listener on the channel
    async with announcements(redis, keys) as got:
        # when one session publishes to a new tick stream, another session to the same stream, then one to a new
        # stream of another topic
        await publish(redis, keys, ticks(2, "A"))
        await publish(redis, keys, ticks(1, "A"))
        async with Publisher(redis, keys=keys) as pub:
            await pub.publish(Tick(symbol="B", bid=1.0, ask=2.0), topic="quote")
    # then each new stream's topic came once, and the second session's stream, known already, not again
    assert sorted(got) == [b"quote", b"tick"]


@contextlib.asynccontextmanager
async def worker_on_a(redis: Any, keys: Keys, **overrides: Any) -> AsyncIterator[list[str]]:
    """A worker (``SLOW`` discovery) running on symbol A's stream, its first tick handled and the new streams'
    channel followed; yields the symbols of the ticks it handles, in order."""
    seen: list[str] = []

    async def record(tick: Tick) -> None:
        seen.append(tick.symbol)

    await publish(redis, keys, ticks(1, "A"))
    async with running(make_worker(redis, keys, record, **{**SLOW, **overrides})):
        await eventually(lambda: _has(seen, "A"), what="A's tick")
        await eventually(lambda: _subscribed(redis, keys, 1), what="the worker following the channel")
        yield seen


async def test_a_worker_joins_a_new_symbols_stream_when_it_is_announced(redis, keys: Keys) -> None:
    async with worker_on_a(redis, keys) as seen:
        # when a new symbol's first ticks are published, at another priority too
        await publish(redis, keys, ticks(2, "NEW"))
        await publish(redis, keys, ticks(1, "HOT"), priority=Priority.CRITICAL)
        # then the worker handles them long before its next discovery
        await eventually(lambda: _has(seen, "NEW", 2), what="the new symbol's ticks")
        await eventually(lambda: _has(seen, "HOT"), what="the new critical stream's tick")


@pytest.mark.real_only
@pytest.mark.single_redis
async def test_a_lane_waiting_on_its_streams_reads_a_new_one_at_once(redis, keys: Keys) -> None:
    """Its reads block for 10 s; the new stream's tick is handled in less than half that: joining it ended the
    lane's blocked read (CLIENT UNBLOCK), so the next read includes it."""
    async with worker_on_a(redis, keys, block_ms=10_000) as seen:
        await publish(redis, keys, ticks(1, "NEW"))
        await eventually(lambda: _has(seen, "NEW"), timeout_s=5, what="the new stream's tick")


@pytest.mark.real_only  # (CLIENT KILL)
async def test_a_worker_whose_subscription_is_cut_follows_the_channel_again(redis, keys: Keys) -> None:
    async with worker_on_a(redis, keys) as seen:
        # when Redis drops every pub/sub connection
        await on_every_node(redis, "CLIENT", "KILL", "TYPE", "pubsub")
        # then the worker subscribes again, and a new symbol's stream is joined when it is announced
        await eventually(lambda: _subscribed(redis, keys, 1), what="the worker following the channel again")
        await publish(redis, keys, ticks(1, "NEW"))
        await eventually(lambda: _has(seen, "NEW"), what="the new stream's tick")


async def test_an_ordered_worker_owns_a_new_symbols_stream_when_it_is_announced(redis, keys: Keys) -> None:
    async with worker_on_a(redis, keys, ordered=True, lease_ms=600) as seen:
        await publish(redis, keys, ticks(3, "NEW"))
        await eventually(lambda: _has(seen, "NEW", 3), what="the new symbol's ticks")


async def test_a_workers_outputs_on_a_new_stream_are_announced_to_the_next_stage(redis, keys: Keys) -> None:
    # given a stage that turns ticks into signals, and a next stage on the signal topic that knows no stream yet
    signals: list[str] = []

    async def signal(tick: Tick, ctx: Context) -> Event:
        return Signal(symbol=tick.symbol, strategy="s", action=Action.BUY, strength=1.0)

    async def record(event: Signal) -> None:
        signals.append(event.symbol)

    first = make_worker(redis, keys, signal, name="first", **SLOW)
    second = make_worker(redis, keys, record, name="second", group="next", topics=["signal"], **SLOW)
    async with running(first, second):
        await eventually(lambda: _subscribed(redis, keys, 2), what="both stages following the channel")
        # when a tick of a new symbol is handled by the first stage
        await publish(redis, keys, ticks(1, "NEW"))
        # then the second stage joins the signal stream the first one created, and handles the signal
        await eventually(lambda: _has(signals, "NEW"), what="the new stream's signal")


async def _subscribed(redis: Any, keys: Keys, n: int) -> bool:
    """At least ``n`` subscribers to the new streams' channel (on a cluster, over its nodes: each counts its own)."""
    replies = await on_every_node(redis, "PUBSUB", "NUMSUB", keys.new_streams_channel())
    return sum(int(reply[1]) for reply in replies) >= n


async def _has(seen: list[Any], item: Any, n: int = 1) -> bool:
    return seen.count(item) >= n
