"""Redis Cluster under change: a reshard of slots under load, and the SIGKILL of a master with a replica.

Each test has a cluster of its own (three masters, each with one replica), since it moves slots or kills nodes.
A producer publishes rounds of one tick per symbol over 30 symbols (spread over every master) while the cluster
changes; afterwards every event whose publish was confirmed is read back from the streams, and must be there
exactly once, or, after a failover, be counted by the publisher as lost (its audit compares what it confirmed
with what the promoted replica holds): the loss Redis replication allows is measured, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fabric import Publisher, PublisherConfig, connect
from fabric.codec import decode_fields
from fabric.events import Tick
from fabric.keys import Keys, Priority
from tests.conftest import RedisClusterServers, _need
from tests.waiting import eventually

pytestmark = [pytest.mark.timeout(180)]

SYMBOLS = [f"C{i:02d}" for i in range(30)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    _need("redis-server")
    _need("redis-cli")
    servers = RedisClusterServers(tmp_path, masters=3, replicas=1)
    yield servers
    servers.stop()


class Producer:
    """Publishes rounds (one tick per symbol, ``seq`` = the round) until stopped; keeps what was confirmed."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.confirmed: dict[str, str] = {}
        """event_id → stream, for every event whose publish returned an entry id."""
        self.failed = 0
        self.rounds = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.rounds += 1
            events = [Tick(symbol=s, bid=1.0, ask=2.0, seq=self.rounds) for s in SYMBOLS]
            try:
                await self.pub.publish_many(events)
            except Exception:  # the cluster was failing over: these may or may not have landed
                self.failed += len(events)
                continue
            for event in events:  # (an id of None: a resend found the event already written)
                self.confirmed[event.event_id] = stream_of(event.symbol or "")
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._stop.set()


KEYS = Keys("cf")


def stream_of(symbol: str) -> str:
    return KEYS.stream("tick", Priority.NORMAL, symbol)


@contextlib.asynccontextmanager
async def producing(url: str, config: PublisherConfig) -> AsyncIterator[Producer]:
    client = connect(url)
    pub = Publisher(client, config, keys=KEYS)
    producer = Producer(pub)
    task = asyncio.create_task(producer.run())
    try:
        await eventually(lambda: _true(producer.rounds >= 5), what="a few rounds published")
        yield producer
    finally:
        producer.stop()
        await task
        await pub.close()
        await client.aclose()


async def stored(url: str) -> dict[str, list[str]]:
    """event_id → the streams it is stored in (once each, if nothing was doubled)."""
    client = connect(url)
    found: dict[str, list[str]] = {}
    try:
        for symbol in SYMBOLS:
            for _, fields in await client.xrange(stream_of(symbol)):
                found.setdefault(decode_fields(fields).event_id, []).append(stream_of(symbol))
    finally:
        await client.aclose()
    return found


async def _true(value: bool) -> bool:
    return value


def _masters(cluster: RedisClusterServers) -> dict[int, tuple[str, int]]:
    """Live masters' port → (node id, slots served), as a live node sees them."""
    port = next(p for p, proc in cluster.procs.items() if proc.poll() is None)
    masters = {}
    for line in cluster.cli(port, "CLUSTER", "NODES").splitlines():
        node_id, addr, flags, *rest = line.split()
        if "master" in flags and "fail" not in flags:
            slots = 0
            for r in rest[5:]:
                if r[0].isdigit():
                    lo, _, hi = r.partition("-")
                    slots += int(hi or lo) - int(lo) + 1
            masters[int(addr.split("@")[0].rsplit(":", 1)[1])] = (node_id, slots)
    return masters


async def _agreed(cluster: RedisClusterServers) -> bool:
    check = await asyncio.create_subprocess_exec(
        "redis-cli", "--cluster", "check", f"127.0.0.1:{cluster.ports[0]}",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await check.communicate()
    return check.returncode == 0 and b"agree" in out and b"[ERR]" not in out


def _replicas_in_sync(cluster: RedisClusterServers) -> bool:
    """Every replica's link to its master is up (its first full sync done)."""
    links = []
    for port in cluster.ports:
        info = cluster.cli(port, "INFO", "replication")
        if "role:slave" in info:
            links.append("master_link_status:up" in info)
    return len(links) == len(cluster.ports) // 2 and all(links)


def node_ids(cluster: RedisClusterServers) -> dict[int, str]:
    """Live masters' port → node id (those serving slots: a node joining as a replica is a master without slots
    for a moment)."""
    return {port: node_id for port, (node_id, slots) in _masters(cluster).items() if slots}


async def test_a_reshard_under_load_loses_and_doubles_nothing(cluster: RedisClusterServers) -> None:
    # given a producer publishing over 30 symbols spread over three masters
    async with producing(cluster.url, PublisherConfig(max_batch=64)) as producer:
        # when 3,000 slots move from the first master to the second while it publishes (MOVED and ASK replies)
        await eventually(lambda: _agreed(cluster), what="every node agreeing on the configuration (redis-cli "
                         "refuses to reshard before)")
        ids = node_ids(cluster)
        ports = sorted(ids)
        served = _masters(cluster)[ports[1]][1]
        before = producer.rounds
        reshard = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "reshard", f"127.0.0.1:{ports[0]}", "--cluster-from", ids[ports[0]],
            "--cluster-to", ids[ports[1]], "--cluster-slots", "3000", "--cluster-yes",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        out, _ = await reshard.communicate()
        assert reshard.returncode == 0, out.decode()[-500:]
        await eventually(lambda: _true(producer.rounds >= before + 5), what="rounds after the reshard")
    # then the slots moved, and every confirmed event is stored exactly once, nothing failed
    assert _masters(cluster)[ports[1]][1] == served + 3000
    found = await stored(cluster.url)
    assert producer.failed == 0
    assert [e for e in producer.confirmed if e not in found] == []
    assert [e for e, streams in found.items() if len(streams) != 1] == []
    assert producer.pub.lost == {}


@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_a_killed_master_fails_over_and_what_replication_lost_is_counted(
        cluster: RedisClusterServers, wait_replicas: int) -> None:
    # given a producer publishing over three masters, each with a replica (with WAIT 1: each batch confirmed only
    # once its master's replica has it)
    config = PublisherConfig(max_batch=64, wait_replicas=wait_replicas, wait_timeout_ms=500, retries=20)
    # (a replica that never finished its first sync refuses to stand for election: wait for every link)
    await eventually(lambda: _true(_replicas_in_sync(cluster)), what="every replica in sync with its master")
    async with producing(cluster.url, config) as producer:
        # when one master is SIGKILLed mid-run
        victim = sorted(node_ids(cluster))[0]
        cluster.procs[victim].send_signal(signal.SIGKILL)
        before = producer.rounds
        # then its replica is promoted, and the producer carries on by itself
        await eventually(lambda: _true(victim not in node_ids(cluster) and len(node_ids(cluster)) == 3),
                         timeout_s=60, what="the replica promoted")
        await eventually(lambda: _true(producer.rounds >= before + 10), timeout_s=60,
                         what="rounds published after the failover")
    found = await stored(cluster.url)
    missing = [e for e in producer.confirmed if e not in found]
    counted = sum(producer.pub.lost.values())
    print(f"wait_replicas={wait_replicas}: {len(producer.confirmed)} confirmed, {len(missing)} missing after the "
          f"failover, {counted} counted lost by the publisher, {producer.failed} failed publishes, "
          f"{producer.pub.under_replicated} under-replicated")
    # and nothing is doubled; every confirmed event is stored or counted lost (never silently gone)
    assert [e for e, streams in found.items() if len(streams) != 1] == []
    assert len(missing) == counted
    if wait_replicas:
        assert missing == []  # what a replica had acknowledged survived its promotion

