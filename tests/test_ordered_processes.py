"""The ordered mode with real worker processes and real signals: order kept through a join, a SIGKILL and a
SIGSTOP past the lease; a hand-over moves only the streams it must.

Each worker runs ``tests.fixtures.ordered:checked``, which checks every tick's ``seq`` against the last copy
committed on its symbol's output stream and reports any gap or reordering; the copies, read back at the end,
are each symbol's handled order as Redis committed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fabric import Publisher
from fabric.codec import decode_fields
from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.ownership import Lease, Leases
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import subprocess_env
from tests.fixtures.ordered import OUTPUT_TOPIC, in_calls_key, output_stream, violations_key
from tests.test_processes import WorkerProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.real_only, pytest.mark.timeout(180)]

GROUP = "g"
LEASE_MS = 1000
SYMBOLS = 200
PAUSE_S = 0.1
"""Between two rounds of the producer (one tick per symbol each): about 2,000 ticks a second."""


class OrderedProcess(WorkerProcess):
    """A ``fabric worker --ordered`` subprocess running the sequence-checking handler."""

    def __init__(self, redis_url: str, ns: str, consumer: str, log: Path, sleep_ms: int) -> None:  # noqa: PLW0231
        self.consumer = consumer
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            fabric_cmd(
                "worker", "tests.fixtures.ordered:checked", "--topic", "tick", "--group", GROUP, "--ordered",
                "--lease-ms", str(LEASE_MS), "--output-topic", OUTPUT_TOPIC, "--consumer", consumer,
                "--namespace", ns, "--redis-url", redis_url, "--block-ms", "100", "--concurrency", "16",
                "--grace-s", "5",
            ),
            cwd=ROOT, env=subprocess_env(redis_url, ns, FABRIC_TEST_SLEEP_MS=str(sleep_ms)),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
        )


@pytest.fixture
def spawn(redis_url: str, keys: Keys, tmp_path: Path) -> Any:
    started: list[OrderedProcess] = []

    def start(consumer: str, sleep_ms: int = 0) -> OrderedProcess:
        w = OrderedProcess(redis_url, keys.ns, consumer, tmp_path / f"{consumer}.log", sleep_ms)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.close()


class Producer:
    """Publishes rounds of one tick per symbol, ``seq`` 1, 2, 3..., until stopped."""

    def __init__(self, redis: Any, keys: Keys, symbols: list[str]) -> None:
        self.redis, self.keys, self.symbols = redis, keys, symbols
        self.rounds = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with Publisher(self.redis, keys=self.keys) as pub:
            while not self._stop.is_set():
                seq = self.rounds + 1
                ids = await pub.publish_many([Tick(symbol=s, bid=1.0, ask=2.0, seq=seq) for s in self.symbols])
                assert all(ids)
                self.rounds = seq
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), PAUSE_S)

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def producing(redis: Any, keys: Keys, symbols: list[str]) -> AsyncIterator[Producer]:
    producer = Producer(redis, keys, symbols)
    task = asyncio.create_task(producer.run())
    try:
        await eventually(lambda: _true(producer.rounds >= 1), what="the first round published")
        yield producer
    finally:
        producer.stop()
        await task


def balanced_over(members: list[str], streams: list[str], redis: Any, keys: Keys) -> Any:
    """A check: every stream owned, by the given members only, evenly (counts differ by at most one); its value,
    the leases (owner and fencing token by stream)."""
    async def check() -> dict[str, Lease] | None:
        now = await Leases(redis, keys, GROUP).owners(streams)
        counts = Counter(lease.owner for lease in now.values())
        if len(now) == len(streams) and set(counts) == set(members) and max(counts.values()) - min(
                counts.values()) <= 1:
            return now
        return None

    return check


async def handled_in_order(redis: Any, keys: Keys, symbols: list[str]) -> dict[str, list[int]]:
    """Each symbol's committed copies' ``seq``, in stream order."""
    out = {}
    for s in symbols:
        entries = await redis.xrange(output_stream(keys, s))
        out[s] = [decode_fields(fields).seq for _, fields in entries]  # type: ignore[attr-defined]
    return out


async def all_handled(redis: Any, keys: Keys, symbols: list[str], rounds: int) -> bool:
    lengths = [await redis.xlen(output_stream(keys, s)) for s in symbols]
    return sum(lengths) >= len(symbols) * rounds


HANDED_TO_D = re.compile(r"handing (\S+) over to d$", re.MULTILINE)


async def _true(value: bool) -> bool:
    return value


async def test_order_holds_while_a_worker_joins_and_one_is_killed_and_the_join_moves_only_what_it_must(
        redis: Any, keys: Keys, spawn: Any) -> None:
    symbols = [f"S{i:03d}" for i in range(SYMBOLS)]
    streams = [keys.stream("tick", Priority.NORMAL, s) for s in symbols]
    workers = {c: spawn(c) for c in ("a", "b", "c")}
    async with producing(redis, keys, symbols) as producer:
        before = await eventually(balanced_over(["a", "b", "c"], streams, redis, keys), timeout_s=60,
                                  what="200 streams spread over a, b, c")
        # When a fourth worker joins under load
        workers["d"] = spawn("d")
        after = await eventually(balanced_over(["a", "b", "c", "d"], streams, redis, keys), timeout_s=60,
                                 what="200 streams spread over a, b, c, d")
        # Then only the streams the new quota needs moved: 200 / 4 = 50, all of them to d, each once: a stream's
        # token grows by one per acquisition, so a kept stream still has its token (none lapsed and was taken
        # again, none moved and came back) and a moved one has the next (d took it straight from its owner)
        moved = [s for s in streams if before[s].owner != after[s].owner]
        assert len(moved) == 50 and {after[s].owner for s in moved} == {"d"}
        assert {s: after[s].token - before[s].token for s in streams if after[s].token != before[s].token} == {
            s: 1 for s in moved}
        # and their owners handed exactly these over to d
        handed = [m for name in ("a", "b", "c") for m in HANDED_TO_D.findall(workers[name].output())]
        assert sorted(handed) == sorted(moved)
        # When one is SIGKILLed mid-run, its streams move to the others after its lease expires
        workers["b"].send(signal.SIGKILL)
        await eventually(balanced_over(["a", "c", "d"], streams, redis, keys), timeout_s=60,
                         what="b's streams moved to a, c, d")
        await eventually(lambda: _true(producer.rounds >= 5), what="a few more rounds")
    rounds = producer.rounds
    await eventually(lambda: all_handled(redis, keys, symbols, rounds), timeout_s=60, what="every tick handled")
    # Then every symbol's ticks were handled in publish order, each exactly once
    assert await redis.lrange(violations_key(keys.ns), 0, -1) == []
    seqs = await handled_in_order(redis, keys, symbols)
    assert {s: q for s, q in seqs.items() if q != list(range(1, rounds + 1))} == {}
    for name in ("a", "c", "d"):
        workers[name].assert_clean()


async def test_a_paused_owner_resumed_after_its_lease_expired_gets_its_late_writes_refused(
        redis: Any, keys: Keys, spawn: Any) -> None:
    symbols = [f"S{i:02d}" for i in range(20)]
    streams = [keys.stream("tick", Priority.NORMAL, s) for s in symbols]
    a = spawn("a", sleep_ms=200)  # a handler call lasts 200 ms: "a" has entries in hand when it is stopped
    b = spawn("b", sleep_ms=200)
    async with producing(redis, keys, symbols) as producer:
        await eventually(balanced_over(["a", "b"], streams, redis, keys), timeout_s=60, what="streams spread")
        await eventually(lambda: _true(producer.rounds >= 3), what="a few rounds")
        # (once every stream has a committed entry, each owner is in a handler call nearly all the time: its
        # streams' backlogs grow, and a call lasts 200 ms against a commit's few. Stopped earlier, on a busy
        # machine, "a" could have read entries but started no call, and would have nothing to write late.)
        await eventually(lambda: all_handled(redis, keys, symbols, 1), timeout_s=60, what="every stream handling")
        # When "a" is SIGSTOPped inside a handler call, past its lease, "b" takes all its streams over and goes on.
        # (A stop between calls, with "a"'s commits in flight, leaves it nothing to write late: its streams run in
        # step, 200 ms calls then commits, so on a loaded machine that happens. Such a stop is undone and tried
        # again.)
        async def stopped_in_a_call() -> bool:
            a.send(signal.SIGSTOP)
            if int(await redis.hget(in_calls_key(keys.ns), str(a.pid)) or 0) > 0:
                return True
            a.send(signal.SIGCONT)
            return False

        await eventually(stopped_in_a_call, what="a stopped inside a handler call")
        try:
            await eventually(balanced_over(["b"], streams, redis, keys), timeout_s=60, what="b owning everything")
            start = producer.rounds
            await eventually(lambda: all_handled(redis, keys, symbols, start), timeout_s=60,
                             what="b handling what a had in hand and after")
        finally:
            a.send(signal.SIGCONT)  # "a" resumes, finishes the calls it had in hand and tries to commit them
        try:
            await eventually(lambda: _logged(a, "refused: fenced out"), timeout_s=30, what="a's late writes refused")
        except AssertionError as exc:  # (seen once in a full run, never alone: what "a" said, for the next time)
            tail = "\n".join(a.output().splitlines()[-40:])
            raise AssertionError(f"{exc}\n--- a's log, last 40 lines:\n{tail}") from None
    rounds = producer.rounds
    await eventually(lambda: all_handled(redis, keys, symbols, rounds), timeout_s=60, what="every tick handled")
    # Then nothing "a" did late reached Redis: no duplicate, no out-of-order output
    seqs = await handled_in_order(redis, keys, symbols)
    assert {s: q for s, q in seqs.items() if q != list(range(1, rounds + 1))} == {}
    # The handler's own check may have fired in "a" only for a call it had in hand when stopped (its read of the
    # last output ran after the resume, when "b" had gone on): one per stream at most, on a stream whose commit
    # was then refused. A call started after the resume (the lease had run out on a's clock) would be a second.
    late = [v.decode().split("|") for v in await redis.lrange(violations_key(keys.ns), 0, -1)]
    assert {pid for *_, pid in late} <= {str(a.pid)}
    assert len({symbol for symbol, *_ in late}) == len(late)

    async def refused_all() -> bool:
        refused = "\n".join(line for line in a.output().splitlines() if "refused: fenced out" in line)
        return all(f"{{{symbol}}} " in refused for symbol, *_ in late)

    await eventually(refused_all, what="a refused commit for each stream its handler's check fired on")
    b.assert_clean()


async def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.output()
