"""Reclaimers racing for the same entries: each entry goes to one of them, once, and its delivery count stays exact."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from fabric import Worker
from fabric.config import WorkerConfig
from fabric.events import Event
from fabric.handler import Context
from tests.faults.checker import Score, read_journals
from tests.faults.harness import GROUP, TOPIC, World, case, joined, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 240
IDLE_MS = 200


@case("two reclaimers racing for a dead worker's entries", "no loss, no duplicates")
async def case_reclaim_race(w: World, events: int) -> Score:
    # Given a worker that read as much of the backlog as it may hold and died before handling any of it
    await w.create_streams()
    (victim,) = await joined(w.spawn("victim", sleep_ms=3_600_000))
    await w.publish(events)
    await until(lambda: _holding(w, min(events, READ_AHEAD)), what="the victim holding what it could read")
    held = await _pending_to(w, "victim")
    victim.send(signal.SIGKILL)
    await victim.exit_code()
    fault_end = time.time()

    # When two workers start together and both reclaim its entries (and read the rest)
    first, second = w.spawn("first"), w.spawn("second")

    # Then each entry is handled once, the victim's on their second delivery
    await w.settle()
    await first.stopped_cleanly()
    await second.stopped_cleanly()
    _, handlings = read_journals(w.journal_dir)
    deliveries = {(h.stream, h.entry_id): h.delivery for h in handlings}
    assert {deliveries[e] for e in held} == {2}, Counter(deliveries[e] for e in held)
    return await w.score(fault_end=fault_end)


READ_AHEAD = 1000
"""Entries a worker with the default prefetch holds at least, once there are that many to read."""


async def _holding(w: World, n: int) -> bool:
    return await w.pending("victim") >= n


async def _pending_to(w: World, consumer: str) -> set[tuple[str, str]]:
    out = set()
    for stream in await w.streams():
        rows = await w.client.xpending_range(stream, GROUP, "-", "+", 100_000, consumername=consumer)
        out |= {(stream, r["message_id"].decode()) for r in rows}
    return out


async def test_two_workers_reclaiming_a_dead_workers_entries_handle_each_once(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_reclaim_race(w, EVENTS)
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS


async def _never(event: Event, ctx: Context) -> None:
    raise AssertionError("not called: only reclaim() runs")


async def test_four_reclaimers_racing_split_the_entries_and_count_one_delivery_each(tmp_path: Path) -> None:
    # Given 240 entries delivered once to a consumer that went away
    async with World.open(tmp_path) as w:
        await w.create_streams()
        await w.publish(EVENTS)
        for stream in await w.streams():
            await w.client.xreadgroup(GROUP, "dead", {stream: ">"})
        await asyncio.sleep(IDLE_MS / 1000)  # the idle time under test: past it, the entries are reclaimable

        # When four workers reclaim at the same moment, round after round
        config = WorkerConfig(group=GROUP, topics=[TOPIC], reclaim_idle_ms=IDLE_MS, prefetch=100)
        workers = [Worker(w.client, _never, config, keys=w.keys) for _ in range(4)]
        for worker in workers:
            await worker.discover()
        claimed = []
        for _ in range(20):
            claimed += await asyncio.gather(*(worker.reclaim() for worker in workers))
            if sum(claimed) >= EVENTS:
                break

        # Then every entry went to exactly one of them, and Redis counts two deliveries for each
        held = [(stream, entry) for worker in workers for stream, ids in worker._held.items() for entry in ids]
        assert len(held) == len(set(held)) == EVENTS == sum(claimed)
        rows = []
        for stream in await w.streams():
            rows += await w.client.xpending_range(stream, GROUP, "-", "+", 1000)
        assert len(rows) == EVENTS
        assert Counter(r["times_delivered"] for r in rows) == {2: EVENTS}
        owners = Counter(r["consumer"].decode() for r in rows)
        assert set(owners) <= {worker.consumer for worker in workers} and "dead" not in owners
