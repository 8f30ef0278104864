"""Network faults between fabric and Redis, through the fault proxy (``proxy.py``), scored by the checker.

Workers and producers run in this process (so their stats can be read: a reclaim shows there) on clients whose
URL goes through a proxy in front of the session's redis-server; whatever is not under test (the producer of
a worker case, the worker of a producer case, the bookkeeping) talks to Redis directly. Every publish's outcome
and every handler call goes to journals, and ``checker.score`` says what was lost, duplicated or unexpected.

Cases: a connection cut in the middle of an XREADGROUP reply; cut in the middle of a publish's reply, or before
the publish reaches Redis (retried idempotently: no duplicate entries); a blackholed Redis detected within the
URL's socket timeout, then recovery. Latency spikes (a live worker's entries must not look abandoned) are scored
cases of the suite, in ``test_network_cases.py``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.client import Line, connect
from fabric.config import PublisherConfig, WorkerConfig
from fabric.errors import FabricError, PublishError, RedisUnavailable
from fabric.events import Event, Tick
from fabric.handler import Context
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from fabric.worker import Worker
from tests.conftest import RedisServer
from tests.faults.checker import Journal, Outcome, Score, read_dead_letters, read_journals, score
from tests.faults.proxy import Proxy
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.timeout(60)

TOPIC = "tick"
GROUP = "g"
RECLAIM_IDLE_MS = 600
"""Reclaims come quickly after a cut read (heartbeats every 200 ms)."""
SOCKET_TIMEOUT_S = 1.0
"""The socket timeout the blackhole case's worker URL sets."""
DETECT_DEADLINE_S = 30.0
"""A deadline against a hang for noticing the blackhole, not a threshold: which timeout fired (the URL's, not the
default ``fabric.client.SOCKET_TIMEOUT_S``) is read from the worker's own warning."""
SETTLE_S = 30.0
"""A deadline for the backlog to drain after a fault: far above what it takes, not a threshold under test."""


@dataclass
class Run:
    """One case: its namespace, its journals, the direct client, and the clients it made through the proxy."""

    keys: Keys
    journal_dir: Path
    direct: Redis
    redis_url: str
    handled: Journal = field(init=False)
    clients: list[Redis] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handled = Journal(self.journal_dir / "handled.inproc.log")

    def client(self, url: str) -> Redis:
        c = connect(url)
        self.clients.append(c)
        return c

    async def record(self, event: Event, ctx: Context) -> None:
        """The handler: journal the call."""
        self.handled.handled(event.event_id, ctx.stream, ctx.entry_id, ctx.delivery_count)

    def worker(self, client: Redis, name: str, handler: Callable[..., Any] | None = None, *,
               reclaim_idle_ms: int = RECLAIM_IDLE_MS) -> Worker:
        config = WorkerConfig(group=GROUP, topics=[TOPIC], consumer=name, block_ms=100, concurrency=8,
                              reclaim_idle_ms=reclaim_idle_ms, reclaim_interval_ms=200, grace_s=5.0)
        return Worker(client, handler or self.record, config, keys=self.keys)

    async def publish(self, pub: Publisher, n: int, *, symbols: int = 4, batch: int = 20,
                      before: Callable[[int], None] | None = None) -> int:
        """Publish ``n`` ticks, ``batch`` per call, journaling each call's outcome; ``before(k)`` runs before
        call ``k``. Returns how many calls failed."""
        journal = Journal(self.journal_dir / f"publish.{uuid.uuid4().hex[:8]}.log")
        failed = 0
        try:
            for k, i in enumerate(range(0, n, batch)):
                if before is not None:
                    before(k)
                events = [Tick(symbol=f"S{j % symbols}", bid=1.0, ask=2.0, seq=j) for j in range(i, min(n, i + batch))]
                outcome: Outcome = "ack"
                try:
                    await pub.publish_many(events)
                except FabricError as exc:
                    failed += 1
                    outcome = "refused" if isinstance(exc, PublishError) and "refused" in str(exc) else "indeterminate"
                for e in events:
                    journal.published(outcome, [e.event_id], self.keys.stream(TOPIC, Priority.NORMAL, e.symbol))
        finally:
            journal.close()
        return failed

    async def score(self, *, fault_end: float | None = None) -> Score:
        publishes, handlings = read_journals(self.journal_dir)
        return score(publishes, handlings, await read_dead_letters(self.direct, self.keys), fault_end=fault_end)

    async def settled(self, *, fault_end: float | None = None) -> Score:
        """Wait until every acknowledged event is handled (or dead-lettered); its score."""
        async def accounted() -> Score | None:
            s = await self.score(fault_end=fault_end)
            return s if s.lost == 0 else None

        return await eventually(accounted, timeout_s=SETTLE_S, what="every acknowledged event handled")

    async def entries(self) -> int:
        """Entries in the topic's streams (a duplicate publish would be one more)."""
        streams = await self.direct.smembers(self.keys.topic_registry(TOPIC))
        return sum([await self.direct.xlen(s) for s in streams])


@pytest.fixture
async def run(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Run]:
    direct = connect(redis_server.url)
    r = Run(Keys(f"n{uuid.uuid4().hex[:10]}"), tmp_path / "journal", direct, redis_server.url)
    try:
        yield r
    finally:
        r.handled.close()
        for c in [*r.clients, direct]:
            await c.aclose()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[Proxy]:
    with Proxy("127.0.0.1", redis_server.port) as p:
        yield p


def _report(name: str, s: Score) -> None:
    """The case's figures on stdout (``pytest -s`` shows them; the README table is made from them)."""
    print(f"\n[faults] {name}: {s.describe()}")


async def _wait_set(event: Any, what: str) -> None:
    await eventually(lambda: _now(event.is_set()), what=what)


async def _now(value: bool) -> bool:
    return value


# ---- cut connections -------------------------------------------------------------------------------------


async def test_a_connection_cut_mid_read_reply_loses_nothing(run: Run, proxy: Proxy) -> None:
    # Given a backlog, and a cut armed for the first read reply the worker gets
    async with Publisher(run.direct, keys=run.keys) as pub:
        assert await run.publish(pub, 200) == 0
    cut = proxy.cut(b"XREADGROUP")
    worker = run.worker(run.client(proxy.url()), "w1")

    # When the worker's read is cut in the middle of the entries Redis handed it (they are pending to it, unseen)
    async with running(worker):
        await _wait_set(cut, "the cut of a read reply")
        fault_end = time.time()
        s = await run.settled(fault_end=fault_end)

    # Then its reclaim loop takes them back after reclaim_idle_ms: nothing lost, nothing handled twice
    _report("connection cut mid XREADGROUP reply", s)
    assert s.lost == 0 and s.unexpected == 0, s.describe()
    assert s.duplicated == 0, s.describe()
    assert worker.stats.reclaimed > 0, "the cut reply's entries came back by reclaim"


@pytest.mark.parametrize("when", ["reply", "request"])
async def test_publishes_cut_mid_flight_are_resent_and_written_once(run: Run, proxy: Proxy,
                                                                    when: Literal["reply", "request"]) -> None:
    # Given a worker on a direct connection, and a producer through the proxy
    worker = run.worker(run.direct, "w1")
    pub_client = run.client(proxy.url())
    cuts: list[Any] = []

    def cut_some(k: int) -> None:
        if k in (2, 5, 8):  # three of the fifteen calls lose their connection (before or after Redis wrote them)
            cuts.append(proxy.cut(scripts.PUBLISH.sha.encode(), when=when))

    # When publish calls are cut mid-flight
    async with running(worker):
        async with Publisher(pub_client, keys=run.keys) as pub:
            failed = await run.publish(pub, 300, before=cut_some)
        assert all(c.is_set() for c in cuts) and len(cuts) == 3
        s = await run.settled(fault_end=time.time())

    # Then every call succeeded on a resend, each event has one entry, and each was handled once
    _report(f"connection cut mid publish ({when})", s)
    assert failed == 0 and s.acknowledged == 300, s.describe()
    assert await run.entries() == 300, "a resend of a batch that had landed wrote nothing"
    assert s.lost == 0 and s.duplicated == 0 and s.unexpected == 0, s.describe()


# ---- a blackhole -------------------------------------------------------------------------------------------


async def test_a_blackholed_redis_is_detected_within_the_socket_timeout_and_the_worker_recovers(
        run: Run, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    # Given a worker whose URL sets a socket timeout, through the proxy
    worker = run.worker(run.client(proxy.url(query=f"socket_timeout={SOCKET_TIMEOUT_S}")), "w1")
    async with running(worker), Publisher(run.direct, keys=run.keys) as pub:
        assert await run.publish(pub, 40) == 0
        await run.settled()

        # When Redis goes silent (connections kept, nothing answered) while events keep coming
        with caplog.at_level(logging.WARNING, "fabric.worker"):
            proxy.blackhole()
            assert await run.publish(pub, 100) == 0

            # Then the worker notices (not ready, and a warning that says why), by the URL's socket timeout: the
            # read in flight times out one socket timeout after its block_ms, and the warning names that time,
            # where the default socket timeout would have named its own
            await eventually(lambda: _now(worker.readiness == "reads from Redis are failing"),
                             timeout_s=DETECT_DEADLINE_S, what="the worker to notice the blackhole")
        fired = {float(t) for t in re.findall(r"no reply within ([0-9.]+)s", caplog.text)}
        assert fired and fired <= {SOCKET_TIMEOUT_S, SOCKET_TIMEOUT_S + worker.config.block_ms / 1000}, caplog.text
        assert "Timeout reading" in caplog.text, caplog.text

        # And when Redis answers again, the worker recovers and handles everything
        proxy.heal()
        fault_end = time.time()
        s = await run.settled(fault_end=fault_end)
        await eventually(lambda: _now(worker.ready), what="the worker ready again")

    _report("Redis blackholed", s)
    assert s.lost == 0 and s.unexpected == 0, s.describe()


async def test_a_line_to_a_silent_redis_times_out_and_never_reads_a_late_reply(run: Run, proxy: Proxy) -> None:
    line = Line(run.client(proxy.url(query="socket_timeout=0.3")))
    try:
        assert await line.call("ECHO", "first") == b"first"
        proxy.blackhole()
        with pytest.raises(rex.TimeoutError):
            await line.call("ECHO", "late")  # redis-py's own read timeout would return None here, as a nil reply
        with pytest.raises(rex.TimeoutError):
            await line.call("ECHO", "again")  # the reconnect's handshake is bounded too
        proxy.heal()
        assert await line.call("ECHO", "next") == b"next", "the late replies died with their connection"
    finally:
        await line.close()


# A regression case: the publisher read replies with a constant 30 s timeout whose expiry redis-py returned as a
# None reply, so a blackholed Redis left its callers waiting forever.
async def test_a_publisher_detects_a_blackholed_redis_within_the_socket_timeout(run: Run, proxy: Proxy) -> None:
    client = run.client(proxy.url(query="socket_timeout=0.3"))
    async with Publisher(client, PublisherConfig(retries=0), run.keys) as pub:
        await pub.publish(Tick(symbol="S", bid=1.0, ask=2.0))  # connected
        proxy.blackhole()
        try:
            with pytest.raises(RedisUnavailable) as failed:
                async with asyncio.timeout(DETECT_DEADLINE_S):  # against a hang only
                    await pub.publish(Tick(symbol="S", bid=1.0, ask=2.0))
        finally:
            proxy.heal()
    assert "no reply within 0.3s" in str(failed.value), failed.value  # the URL's socket timeout fired
