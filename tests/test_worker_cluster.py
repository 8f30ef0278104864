"""The unordered worker's outputs across cluster slots: an output whose stream is in another slot than its input
(another symbol, or a topic without a symbol) cannot be written in the script that acks the input.

The worker writes such outputs first (``outputs.lua``), each guarded by a mark in the output's slot named after
the input entry, then commits the input. These tests run on every backend (on one Redis every output is
written with the ack); the crash between the two steps is the cluster's own case.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import Priority, Publisher, Worker, WorkerConfig, scripts
from fabric.client import connect
from fabric.events import Alert, Bar, Event, Severity, Tick
from fabric.handler import as_handler
from fabric.keys import Keys
from fabric.nodes import slot_of
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.timeout(60)

GROUP = "g"


def config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig(**{"group": GROUP, "topics": ["tick"], "block_ms": 50, "reclaim_idle_ms": 300,
                           "reclaim_interval_ms": 50, "discover_interval_ms": 50, **overrides})


async def publish_tick(redis: Any, keys: Keys, symbol: str = "A") -> tuple[Tick, str]:
    tick = Tick(symbol=symbol, bid=1.0, ask=2.0)
    async with Publisher(redis, keys=keys) as pub:
        [entry_id] = await pub.publish_many([tick])
    assert entry_id is not None
    return tick, entry_id


def bar_for(tick: Tick, symbol: str) -> Bar:
    return Bar(symbol=symbol, timeframe="1s", start_ns=tick.ts_ns, open=tick.bid, high=tick.ask, low=tick.bid,
               close=tick.ask)


async def pending(redis: Any, stream: str) -> int:
    return int((await redis.xpending(stream, GROUP))["pending"])


def test_the_symbols_used_here_are_in_different_slots():
    # the other tests mean something only if A's and B's streams and a symbol-less topic's are in three slots
    keys = Keys("t")
    slots = {slot_of(keys.stream("tick", Priority.NORMAL, "A")), slot_of(keys.stream("bar", Priority.NORMAL, "B")),
             slot_of(keys.stream("alert", Priority.HIGH, None))}
    assert len(slots) == 3


async def test_outputs_in_other_slots_are_written_once_and_the_input_acked(redis, keys):
    # given a tick of symbol A and a handler that returns a bar of symbol B, one of A, and a symbol-less alert
    tick, _ = await publish_tick(redis, keys)

    async def handle(event: Tick) -> list[Event]:
        return [bar_for(event, "B"), bar_for(event, "A"), Alert(severity=Severity.INFO, message="seen")]

    worker = Worker(redis, as_handler(handle), config(), keys=keys)
    # when the worker handles it
    async with running(worker):
        await eventually(lambda: asyncio.sleep(0, result=worker.stats.handled == 1), what="the commit")
    # then each output is in its stream once, with its lineage, and the input is acked
    for stream in (keys.stream("bar", Priority.NORMAL, "B"), keys.stream("bar", Priority.NORMAL, "A"),
                   keys.stream("alert", Priority.HIGH, None)):
        assert await redis.xlen(stream) == 1, stream
    assert await pending(redis, keys.stream("tick", Priority.NORMAL, "A")) == 0
    assert worker.published == {keys.stream("bar", Priority.NORMAL, "B"): 1,
                                keys.stream("bar", Priority.NORMAL, "A"): 1,
                                keys.stream("alert", Priority.HIGH, None): 1}


@pytest.fixture
async def cluster(redis_cluster: Any) -> AsyncIterator[Any]:
    """A client on the session's cluster (the crash below has no counterpart on one Redis: there every output
    is written with the ack)."""
    client = connect(redis_cluster.url)
    yield client
    await client.aclose()


async def test_a_crash_between_other_slot_outputs_and_the_ack_does_not_double_them(cluster, keys):
    redis = cluster
    # given a worker that dies after writing a tick's output to another slot, before the ack
    tick, entry_id = await publish_tick(redis, keys)
    out = keys.stream("bar", Priority.NORMAL, "B")
    mark = keys.dedup(out, f"out/{GROUP}/tick/normal/A/{entry_id}/0")
    calls: list[str] = []

    async def handle(event: Tick) -> Bar:
        calls.append(event.event_id)
        return bar_for(event, "B")

    first = Worker(redis, as_handler(handle), config(consumer="first"), keys=keys)
    at_ack = asyncio.Event()
    real_per_slot = first._per_slot

    async def per_slot(line: Any, script: scripts.Script, calls_: list[Any]) -> list[Any]:
        if script is scripts.COMMIT:
            at_ack.set()
            await asyncio.Event().wait()  # the crash: the ack never goes out
        return await real_per_slot(line, script, calls_)

    first._per_slot = per_slot  # type: ignore[method-assign]
    run = asyncio.create_task(first.run())
    await asyncio.wait_for(at_ack.wait(), 15)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    assert await redis.xlen(out) == 1
    assert await redis.exists(mark) == 1
    assert await pending(redis, keys.stream("tick", Priority.NORMAL, "A")) == 1

    # when another worker reclaims the entry and handles it again
    second = Worker(redis, as_handler(handle), config(consumer="second"), keys=keys)
    async with running(second):
        await eventually(lambda: asyncio.sleep(0, result=second.stats.handled == 1), what="the second commit")
    # then the handler ran twice, the output is there once, the input is acked and the mark is gone
    assert calls == [tick.event_id, tick.event_id]
    assert await redis.xlen(out) == 1
    assert await pending(redis, keys.stream("tick", Priority.NORMAL, "A")) == 0
    assert await redis.exists(mark) == 0


async def test_a_batch_over_nodes_one_of_which_lacks_the_publish_script_gets_every_entry_id(cluster, keys):
    # given a cluster whose nodes forgot their scripts, then one node that learnt publish.lua again (symbol A's)
    await cluster.initialize()  # a fresh client knows no nodes yet
    assert len(cluster.get_primaries()) == 3
    for node in cluster.get_primaries():
        await cluster.execute_command("SCRIPT", "FLUSH", target_nodes=node)
    await publish_tick(cluster, keys, "A")
    other = next(s for s in ("B", "C", "D", "E", "F") if cluster.get_node_from_key(f"{{{s}}}").name
                 != cluster.get_node_from_key("{A}").name)
    # when one batch goes to A's node and another
    async with Publisher(cluster, keys=keys) as pub:
        ids = await pub.publish_many([Tick(symbol=s, bid=1.0, ask=2.0) for s in ("A", other)])
    # then every event has its entry id
    assert None not in ids
