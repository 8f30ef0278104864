"""Redis Sentinel: fabric on a Sentinel-managed primary (``redis+sentinel://``), and through a failover.

Real processes, started and stopped by this file's fixture: a primary, one replica (``--replicaof``) and three
sentinels monitoring them as ``fabric`` (quorum 2, down after 1 s, failover timeout 5 s), all on loopback.
Marked ``single_redis``: Sentinel watches one primary and its replicas, there is no cluster case; ``real_only``:
processes die.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from fabric import Publisher, Worker, WorkerConfig
from fabric.client import connect, own_connection, read_reply, read_timeout_s, translated
from fabric.errors import ConfigError, FabricError, RedisUnavailable
from fabric.events import Event, Tick
from fabric.handler import as_handler
from fabric.keys import Keys
from tests.waiting import eventually
from tests.workers import running

pytestmark = [pytest.mark.real_only, pytest.mark.single_redis, pytest.mark.timeout(120), pytest.mark.anyio]

SERVICE = "fabric"
SYMBOLS = ("A", "B", "C", "D")
START_DEADLINE_S = 30.0
"""A deadline for processes to answer and the sentinels to see each other (hello messages go every 2 s)."""
FAILOVER_DEADLINE_S = 60.0
"""A deadline for the sentinels to promote the replica: down after 1 s, then the vote and the promotion."""
FAST = {"block_ms": 50, "reclaim_idle_ms": 300, "reclaim_interval_ms": 50, "discover_interval_ms": 50,
        "backoff_base_ms": 20, "backoff_max_ms": 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(check: Any, what: str, timeout_s: float = START_DEADLINE_S) -> None:
    """Poll a synchronous ``check`` until it is truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class Node:
    """A redis-server (or a sentinel) on a free loopback port, logging to its directory."""

    def __init__(self, workdir: Path, argv: list[str]) -> None:
        workdir.mkdir(parents=True)
        self.port = _free_port()
        self.workdir = workdir
        self._log: IO[bytes] = (workdir / "log").open("wb")
        self.proc = subprocess.Popen([*argv[:1], *(a.replace("{port}", str(self.port)) for a in argv[1:])],
                                     stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL, cwd=workdir)
        _until(self._answers, f"{argv[0]} on port {self.port} to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"process on port {self.port} exited:\n{(self.workdir / 'log').read_text()}")
        try:
            with redis.Redis(port=self.port, socket_timeout=1) as r:
                return bool(r.ping())
        except redis.ConnectionError:
            return False

    def call(self, *args: Any) -> Any:
        with redis.Redis(port=self.port, socket_timeout=5, decode_responses=True) as r:
            return r.execute_command(*args)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class SentinelSet:
    """A primary, its replica and three sentinels monitoring them as ``fabric``."""

    def __init__(self, workdir: Path) -> None:
        self.nodes: list[Node] = []
        try:
            server = ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--repl-diskless-sync-delay", "0"]
            self.primary = self._start(workdir / "primary", server)
            self.replica = self._start(workdir / "replica", [*server, "--replicaof", "127.0.0.1",
                                                             str(self.primary.port)])
            self.sentinels = [self._sentinel(workdir / f"sentinel{i}") for i in range(3)]
            _until(self._ready, "the replica to sync and the sentinels to see it and each other")
        except BaseException:
            self.stop()
            raise
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _start(self, workdir: Path, argv: list[str]) -> Node:
        node = Node(workdir, argv)
        self.nodes.append(node)
        return node

    def _sentinel(self, workdir: Path) -> Node:
        workdir.mkdir(parents=True)
        conf = workdir / "sentinel.conf"  # a sentinel rewrites its file: one each, writable
        conf.write_text("\n".join([
            "bind 127.0.0.1",
            f"dir {workdir}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]) + "\n")
        return self._start(workdir / "run", ["redis-server", str(conf), "--sentinel", "--port", "{port}"])

    def _ready(self) -> bool:
        if self.replica.call("INFO", "replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            info = sentinel.call("SENTINEL", "MASTER", SERVICE)
            if info["num-slaves"] != "1" or info["num-other-sentinels"] != "2" or "down" in info["flags"]:
                return False
        return True

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel says."""
        return int(self.sentinels[0].call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A fresh primary, replica and three sentinels for each test (a failover test kills the primary)."""
    nodes = SentinelSet(tmp_path)
    yield nodes
    nodes.stop()


@pytest.fixture
async def sentinel_client(sentinel_set: SentinelSet) -> AsyncIterator[Any]:
    client = connect(sentinel_set.url)
    yield client
    await client.aclose()


def _round(n: int, base: int) -> list[Tick]:
    return [Tick(symbol=s, bid=100.0 + base + i, ask=100.5 + base + i) for i in range(n) for s in SYMBOLS]


def _worker(client: Any, keys: Keys, handled: Counter[str]) -> Worker:
    async def record(event: Event) -> None:
        handled[event.event_id] += 1

    config = WorkerConfig(group="g", topics=["tick"], **FAST)  # type: ignore[arg-type]
    return Worker(client, as_handler(record, "record"), config, keys=keys, handler_name="record")


# ---- the URL -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "redis+sentinel://127.0.0.1:26379",                  # no service name
    "redis+sentinel://127.0.0.1:26379/",                 # no service name
    "redis+sentinel://127.0.0.1/fabric",                 # no port
    "redis+sentinel://127.0.0.1:26379,nowhere/fabric",   # one of the sentinels has no port
    "redis+sentinel://127.0.0.1:26379/fabric/one",       # a database that is no number
])
def test_a_bad_sentinel_url_is_a_one_line_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        connect(url)

    message = str(caught.value)
    assert "\n" not in message
    assert "bad Redis Sentinel URL" in message
    assert "redis+sentinel://[:password@]host:port[,host:port...]/SERVICE_NAME[/DB]" in message


def test_the_password_is_kept_out_of_a_bad_url_error() -> None:
    with pytest.raises(ConfigError) as caught:
        connect("redis+sentinel://:hunter2@127.0.0.1:26379")

    assert "hunter2" not in str(caught.value)


async def test_a_service_the_sentinels_do_not_monitor_is_unavailable_with_the_fix(sentinel_set: SentinelSet) -> None:
    url = sentinel_set.url.replace(f"/{SERVICE}/", "/nosuchservice/")
    client = connect(url)
    try:
        with pytest.raises(RedisUnavailable) as caught, translated(url):
            await client.ping()
    finally:
        await client.aclose()

    message = str(caught.value)
    assert "\n" not in message
    assert "no primary for 'nosuchservice'" in message
    assert "SENTINEL MASTERS" in message
    assert f"127.0.0.1:{sentinel_set.sentinels[0].port}" in message


# ---- on the primary ----------------------------------------------------------------------------------------------


async def test_the_client_and_fabrics_own_connections_reach_the_primary(
        sentinel_set: SentinelSet, sentinel_client: Any) -> None:
    # Given a client from a redis+sentinel:// URL
    # When it and a connection of fabric's own (the publisher's and a Line's kind) ask who they talk to
    info = await sentinel_client.info("server")
    conn = own_connection(sentinel_client)
    try:
        await conn.connect()
        await conn.send_command("INFO", "replication")
        role = (await read_reply(conn, read_timeout_s(sentinel_client))).decode()
    finally:
        await conn.disconnect()

    # Then both are on the primary, with bytes replies
    assert info["tcp_port"] == sentinel_set.primary.port
    assert "role:master" in role
    assert await sentinel_client.echo("x") == b"x"


async def test_events_published_through_a_sentinel_url_are_handled(sentinel_client: Any, keys: Keys) -> None:
    # Given 200 ticks over four symbols published through the sentinels' primary
    events = _round(50, 0)
    async with Publisher(sentinel_client, keys=keys) as pub:
        ids = await pub.publish_many(events)
    assert None not in ids
    handled: Counter[str] = Counter()

    # When a worker on the same URL runs
    async with running(_worker(sentinel_client, keys, handled)):
        await eventually(_at_least(handled, len(events)), what="every tick handled")

    # Then each was handled once
    assert handled == Counter({e.event_id: 1 for e in events})


def _at_least(handled: Counter[str], n: int) -> Any:
    async def check() -> bool:
        return len(handled) >= n

    return check


# ---- through a failover ------------------------------------------------------------------------------------------


class Producer:
    """A Publisher publishing rounds of ticks until told to stop; remembers which events Redis confirmed."""

    def __init__(self, pub: Publisher, keys: Keys) -> None:
        self.pub, self.keys = pub, keys
        self.confirmed: dict[str, str] = {}
        """event id → its stream, for every event a publish call returned for."""
        self.after_failover: set[str] = set()
        """Confirmed in rounds started once the new primary was known: none of these may be lost."""
        self.failed_rounds = 0
        self.failover = asyncio.Event()
        self.stop = asyncio.Event()

    async def run(self) -> None:
        rounds = 0
        while not self.stop.is_set():
            after = self.failover.is_set()
            events = _round(5, rounds)
            rounds += 1
            try:
                await self.pub.publish_many(events)
            except FabricError:  # unconfirmed (the failover's window): may or may not have landed
                self.failed_rounds += 1
                continue
            for e in events:
                self.confirmed[e.event_id] = self.keys.stream("tick", e.default_priority, e.symbol)
            if after:
                self.after_failover.update(e.event_id for e in events)
            await asyncio.sleep(0.005)  # a steady flow, not a flood the worker could not keep up with

    def unaccounted(self, handled: Counter[str]) -> dict[str, int]:
        """Per stream: confirmed events neither handled nor counted lost by the publisher's audit."""
        missing = Counter(stream for event_id, stream in self.confirmed.items() if event_id not in handled)
        return {s: n - self.pub.lost.get(s, 0) for s, n in missing.items() if n > self.pub.lost.get(s, 0)}


async def test_a_failover_under_load_loses_nothing_unreported(sentinel_set: SentinelSet, keys: Keys) -> None:
    # Given a publisher and a worker on the sentinels' primary, each with its own client, under a steady flow
    pub_client, work_client = connect(sentinel_set.url), connect(sentinel_set.url)
    handled: Counter[str] = Counter()
    pub = Publisher(pub_client, keys=keys)
    producer = Producer(pub, keys)
    producing = asyncio.create_task(producer.run())
    try:
        async with running(_worker(work_client, keys, handled)):
            await eventually(_at_least(handled, 400), what="the flow under way")

            # When the primary is SIGKILLed and the sentinels promote the replica
            sentinel_set.primary.kill()

            async def promoted() -> bool:
                port = await asyncio.to_thread(sentinel_set.primary_port)
                return port == sentinel_set.replica.port

            await eventually(promoted, timeout_s=FAILOVER_DEADLINE_S, what="the replica promoted")
            producer.failover.set()

            # Then the publisher and the worker carry on by themselves on the new primary
            async def carried_on() -> bool:
                return len(producer.after_failover) >= 400 and producer.after_failover <= handled.keys()

            await eventually(carried_on, timeout_s=FAILOVER_DEADLINE_S, what="events after the failover handled")
            producer.stop.set()
            await producing
            await pub.close()

            # And every event Redis confirmed is handled, or counted lost by the publisher's audit
            async def accounted() -> bool:
                return not producer.unaccounted(handled)

            await eventually(accounted, timeout_s=FAILOVER_DEADLINE_S, what="every confirmed event accounted for")
    finally:
        producer.stop.set()
        await asyncio.gather(producing, return_exceptions=True)
        await pub.close()
        counters = await pub_client.hgetall(keys.counters())
        await pub_client.aclose()
        await work_client.aclose()

    lost = sum(pub.lost.values())
    recorded = {k.decode(): int(v) for k, v in counters.items() if k.startswith(b"lost_confirmed:")}
    assert sum(recorded.values()) == lost  # the audit's count is in ns:counters too, per stream
    assert {k.removeprefix("lost_confirmed:"): v for k, v in recorded.items()} == {
        s: n for s, n in pub.lost.items() if n}
    assert sentinel_set.primary_port() == sentinel_set.replica.port
    print(f"failover: {len(producer.confirmed)} events confirmed, {len(handled)} handled, {lost} confirmed and "
          f"lost (reported by the publisher), {producer.failed_rounds} rounds failed unconfirmed")
