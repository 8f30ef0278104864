"""The ordered mode on a Redis Cluster with real worker processes: two ``fabric worker --ordered`` split 40
symbols spread over the cluster's three masters and handle each symbol's ticks in publish order, exactly once.

The workers run ``tests.fixtures.ordered:checked`` (through ``checked_on_cluster`` below, which gives it a
cluster client): it checks every tick's ``seq`` against the last copy committed on its symbol's output stream.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.client import connect
from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.nodes import slot_of
from fabric.preflight import check_worker
from tests.conftest import ROOT, RedisClusterServers, fabric_cmd
from tests.contract.test_worker import config
from tests.fixtures import handlers
from tests.fixtures.handlers import subprocess_env
from tests.fixtures.ordered import OUTPUT_TOPIC, checked, violations_key
from tests.test_ordered_processes import balanced_over, handled_in_order, producing
from tests.test_processes import WorkerProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.timeout(180)]

GROUP = "g"
LEASE_MS = 1000
SYMBOLS = 40


async def checked_on_cluster(tick: Tick) -> Tick:
    """``tests.fixtures.ordered.checked`` with its Redis client made by ``fabric.client.connect``, which takes
    the ``redis+cluster://`` URL (kept for the fixture client made before the handler runs)."""
    if handlers._client is None:
        handlers._client = connect(os.environ["FABRIC_TEST_REDIS_URL"])  # type: ignore[assignment]
    return await checked(tick)


class ClusterOrderedProcess(WorkerProcess):
    """A ``fabric worker --ordered`` subprocess on the cluster, running the sequence-checking handler."""

    def __init__(self, redis_url: str, ns: str, consumer: str, log: Path) -> None:  # noqa: PLW0231
        self.consumer = consumer
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            fabric_cmd(
                "worker", "tests.test_ordered_cluster:checked_on_cluster", "--topic", "tick", "--group", GROUP,
                "--ordered", "--lease-ms", str(LEASE_MS), "--output-topic", OUTPUT_TOPIC, "--consumer", consumer,
                "--namespace", ns, "--redis-url", redis_url, "--block-ms", "100", "--concurrency", "16",
                "--grace-s", "5",
            ),
            cwd=ROOT, env=subprocess_env(redis_url, ns), stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=self._out,
        )


@pytest.fixture
async def cluster(redis_cluster: RedisClusterServers) -> AsyncIterator[Any]:
    client = connect(redis_cluster.url)
    yield client
    await client.aclose()


@pytest.fixture
def spawn(redis_cluster: RedisClusterServers, keys: Keys, tmp_path: Path) -> Iterator[Any]:
    started: list[ClusterOrderedProcess] = []

    def start(consumer: str) -> ClusterOrderedProcess:
        w = ClusterOrderedProcess(redis_cluster.url, keys.ns, consumer, tmp_path / f"{consumer}.log")
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.close()



async def test_the_worker_start_up_check_runs_on_a_cluster(cluster: Any, keys: Keys) -> None:
    await check_worker(cluster, keys, config(ordered=True, lease_ms=LEASE_MS), "a")


async def test_two_ordered_workers_on_a_cluster_split_the_symbols_and_keep_each_ones_order(
        cluster: Any, keys: Keys, spawn: Any) -> None:
    symbols = [f"S{i:02d}" for i in range(SYMBOLS)]
    streams = [keys.stream("tick", Priority.NORMAL, s) for s in symbols]
    assert len({slot_of(s) for s in streams}) == SYMBOLS  # a slot per symbol, over every master
    workers = [spawn(c) for c in ("a", "b")]
    balanced = balanced_over(["a", "b"], streams, cluster, keys)

    async def spread() -> Any:
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.consumer} exited:\n{w.output()}"
        return await balanced()

    async with producing(cluster, keys, symbols) as producer:
        # When both workers run while ticks flow, the streams are split between them
        await eventually(spread, timeout_s=60, what="40 streams spread over a and b")
        start = producer.rounds
        await eventually(lambda: _true(producer.rounds >= start + 5), what="five more rounds")
    rounds = producer.rounds
    await eventually(lambda: _all_handled(cluster, keys, symbols, rounds), timeout_s=60, what="every tick handled")
    # Then every symbol's ticks were handled in publish order, each exactly once, and both stop cleanly
    assert await cluster.lrange(violations_key(keys.ns), 0, -1) == []
    seqs = await handled_in_order(cluster, keys, symbols)
    assert {s: q for s, q in seqs.items() if q != list(range(1, rounds + 1))} == {}
    for w in workers:
        w.send(signal.SIGTERM)
    for w in workers:
        assert await w.exit_code() == 0, w.output()
        w.assert_clean()


async def _all_handled(redis: Any, keys: Keys, symbols: list[str], rounds: int) -> bool:
    seqs = await handled_in_order(redis, keys, symbols)
    return all(len(q) >= rounds for q in seqs.values())


async def _true(value: bool) -> bool:
    return value


def test_the_fixture_handlers_client_takes_a_cluster_url(redis_cluster: RedisClusterServers,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_TEST_REDIS_URL", redis_cluster.url)
    monkeypatch.setattr(handlers, "_client", None)
    assert handlers._redis() is not None
