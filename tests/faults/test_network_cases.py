"""Network faults as scored cases of the suite (``@case``: the short form here, the long form in
``python -m bench.faults``): ``fabric worker`` processes and producers whose connections go through the fault
proxy (``proxy.py``) in front of the run's redis-server, scored by the checker like every other case.

Latency spikes are judged here by what a peer reclaimed (its logged stats) as well as by the checker.
``test_network.py`` covers the cut and blackhole faults with in-process workers (their stats at hand) and what the
checker cannot score (a line that must never read a late reply, a publisher's error naming its timeout).
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from fabric import scripts
from fabric.client import connect
from tests.faults.checker import Score
from tests.faults.harness import WorkerProc, World, case, joined, rate, until
from tests.faults.proxy import Proxy

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 240
"""The short form's events per case (the long form passes more)."""
CUTS = 3
"""Publish calls cut in a run."""
SOCKET_TIMEOUT_S = 1.0
"""The socket timeout the blackhole case's worker URL sets."""
WORKER_BLOCK_S = 0.1
"""The harness's workers block their reads 100 ms (``--block-ms 100``)."""
DETECT_DEADLINE_S = 30.0
"""A deadline against a hang for noticing the blackhole, not a threshold: which timeout fired is read from the
worker's own warning (``_the_urls_timeout_fired``)."""


def _the_urls_timeout_fired(output: str, block_s: float) -> bool:
    """Whether the worker's timeout warnings name the URL's socket timeout (a read: plus its block), not the
    default one it would have used without it."""
    fired = {float(t) for t in re.findall(r"no reply within ([0-9.]+)s", output)}
    return bool(fired) and fired <= {SOCKET_TIMEOUT_S, SOCKET_TIMEOUT_S + block_s}


async def _true(value: bool) -> bool:
    return value


async def _either(cut: threading.Event, task: asyncio.Task[Any]) -> bool:
    return cut.is_set() or task.done()


@case("connection cut mid XREADGROUP reply", "no loss, no duplicates")
async def case_cut_read(w: World, events: int) -> Score:
    # Given a backlog, and a cut armed for the first read reply of a worker that reads through the proxy
    await w.create_streams()
    await w.publish(events)
    with Proxy("127.0.0.1", w.redis.port) as proxy:
        cut = proxy.cut(_read_of(w.stream("S0")))
        worker = w.spawn("w", redis_url=proxy.url())

        # When its read is cut in the middle of the entries Redis handed it (pending to it, unseen)
        await until(lambda: _true(cut.is_set()), what="the cut of a read reply")
        fault_end = time.time()

        # Then its reclaim takes them back: everything handled once, and it stops cleanly
        await w.settle()
        await worker.stopped_cleanly()
        w.notes["reclaimed"] = worker.stat("reclaimed")
    return await w.score(fault_end=fault_end)


def _read_of(stream: str) -> re.Pattern[bytes]:
    """An XREADGROUP command on ``stream`` (a worker's read: its startup check queues one on a stream of its own,
    in a MULTI it discards, to learn what the ACL allows)."""
    return re.compile(rb"\$10\r\nXREADGROUP\r\n[^*]*" + re.escape(stream.encode()))


async def _publish_cut(w: World, events: int, when: Literal["request", "reply"]) -> Score:
    # Given a worker on a direct connection, and a producer whose connection goes through the proxy
    await w.create_streams()
    (worker,) = await joined(w.spawn("w"))
    with Proxy("127.0.0.1", w.redis.port) as proxy:
        client = connect(proxy.url())
        try:
            producing = asyncio.create_task(w.publish(events, rate=rate(events), client=client))

            # When publish calls lose their connection mid-flight, one after another
            cuts = 0
            while cuts < CUTS and not producing.done():
                cut = proxy.cut(scripts.PUBLISH.sha.encode(), when=when)
                await until(functools.partial(_either, cut, producing), what="a publish call cut")
                cuts += cut.is_set()
            published = await producing
        finally:
            await client.aclose()
    fault_end = time.time()
    w.notes.update(cuts=cuts, failed=published.failed)

    # Then each call was resent on a new connection and written once: handled once, nothing lost
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


@case("publish cut before Redis (request lost)", "no loss, no duplicates")
async def case_publish_cut_request(w: World, events: int) -> Score:
    return await _publish_cut(w, events, "request")


@case("publish cut after Redis wrote it (reply lost)", "no loss, no duplicates")
async def case_publish_cut_reply(w: World, events: int) -> Score:
    return await _publish_cut(w, events, "reply")


@case("Redis blackholed (socket_timeout 1 s)", "no loss")
async def case_blackhole(w: World, events: int) -> Score:
    # Given a worker reading through the proxy with a socket timeout in its URL, under a producer's flow
    await w.create_streams()
    with Proxy("127.0.0.1", w.redis.port) as proxy:
        (worker,) = await joined(w.spawn("w", redis_url=proxy.url(query=f"socket_timeout={SOCKET_TIMEOUT_S}")))
        producing = asyncio.create_task(w.publish(events, rate=rate(events)))
        await until(lambda: _true(w.handled_by(worker.pid) >= events // 10), what="the worker under load")

        # When Redis goes silent for it (connections kept, nothing answered) while events keep coming
        proxy.blackhole()
        await until(lambda: _true("Timeout reading" in worker.output()), timeout_s=DETECT_DEADLINE_S,
                    what="the worker to notice the blackhole")
        assert _the_urls_timeout_fired(worker.output(), WORKER_BLOCK_S), worker.output()
        w.notes["detected"] = True

        # Then, once Redis answers again, it handles everything and stops cleanly
        proxy.heal()
        fault_end = time.time()
        await producing
        await w.settle()
        await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


SPIKE_RECLAIM_IDLE_MS = 1500
"""Heartbeats every 500 ms (a third of it). A held entry is touched again at most two heartbeat periods after its
last touch, and a period is the interval plus the heartbeat's own round trips: its idle time on the server stays
under 2 x (500 ms + RTT), so RTTs up to about 200 ms leave the peer nothing to reclaim."""
SPIKE_S = 0.04
"""Latency added each way during a spike (plus jitter up to a quarter of it): a round trip of 80-100 ms."""
SPIKES = 2
"""Spikes in a run, each longer than ``SPIKE_RECLAIM_IDLE_MS``, with half as long without latency after each."""


async def _latency_spikes(w: World, events: int, symbols: int) -> Score:
    # Given a worker through the proxy holding the whole backlog in handler calls that wait (for a gate file), and
    # a peer beside it on a direct connection, as slow, whose reclaim loop takes over whatever looks abandoned
    await w.create_streams(symbols)
    await w.publish(events, symbols=symbols)
    gate = w.tmp / "gate"

    def holding(consumer: str, redis_url: str | None = None) -> WorkerProc:
        return w.spawn(consumer, handler="gated", env={"FAULTS_GATE": str(gate)}, concurrency=events,
                       reclaim_idle_ms=SPIKE_RECLAIM_IDLE_MS, redis_url=redis_url)

    with Proxy("127.0.0.1", w.redis.port) as proxy:
        slow = holding("slow", proxy.url())
        await until(lambda: _held(w, "slow", events), what="the slow worker to hold the backlog")
        (peer,) = await joined(holding("peer"))

        # When the link to Redis slows down several times, each time for longer than reclaim_idle_ms
        each_s = SPIKE_RECLAIM_IDLE_MS / 1000 + 0.2
        for _ in range(SPIKES):
            proxy.delay_s, proxy.jitter_s = SPIKE_S, SPIKE_S / 4
            await asyncio.sleep(each_s)  # the fault's schedule, not a wait for a condition
            proxy.delay_s = proxy.jitter_s = 0.0
            await asyncio.sleep(each_s / 2)
        fault_end = time.time()
        w.notes["peer held"] = await w.pending("peer")
        gate.touch()

        # Then the peer reclaimed nothing from the live worker: everything handled once, by it
        await w.settle()
        await asyncio.gather(slow.stopped_cleanly(), peer.stopped_cleanly())
    w.notes["reclaimed"] = peer.stat("reclaimed")
    w.notes["handled by the peer"] = w.handled_by(peer.pid)
    return await w.score(fault_end=fault_end)


async def _held(w: World, consumer: str, n: int) -> bool:
    return await w.pending(consumer) == n


@case("latency spikes (RTT 80-100 ms), 1 stream", "no loss, no duplicates")
async def case_latency_spikes_one_stream(w: World, events: int) -> Score:
    return await _latency_spikes(w, events, 1)


# 12 streams: a worker holding entries of many streams (a regression case: the heartbeat once touched them a
# round trip each, and the last ones looked abandoned during a spike)
@case("latency spikes (RTT 80-100 ms), 12 streams", "no loss, no duplicates")
async def case_latency_spikes_twelve_streams(w: World, events: int) -> Score:
    return await _latency_spikes(w, events, 12)


# ---- the short form ------------------------------------------------------------------------------------


async def test_a_worker_whose_read_reply_is_cut_reclaims_it_and_loses_nothing(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_cut_read(w, EVENTS)
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()
    assert w.notes["reclaimed"] > 0, "the cut reply's entries came back by reclaim"


@pytest.mark.parametrize("when", ["request", "reply"])
async def test_publishes_cut_mid_flight_are_resent_and_written_once(tmp_path: Path,
                                                                    when: Literal["request", "reply"]) -> None:
    async with World.open(tmp_path) as w:
        s = await _publish_cut(w, EVENTS, when)
    assert w.notes == {"cuts": CUTS, "failed": 0}, w.notes
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()


async def test_a_blackholed_redis_is_noticed_within_the_socket_timeout_and_nothing_is_lost(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_blackhole(w, EVENTS)
    assert w.notes["detected"]
    assert (s.lost, s.unexpected) == (0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()


@pytest.mark.parametrize("symbols", [1, 12])
async def test_latency_spikes_do_not_make_a_live_workers_entries_look_abandoned(tmp_path: Path, symbols: int) -> None:
    async with World.open(tmp_path) as w:
        s = await _latency_spikes(w, EVENTS, symbols)
    assert w.notes == {"peer held": 0, "reclaimed": 0, "handled by the peer": 0}, w.notes
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()
