"""Shared circuit breakers across real worker processes (issue 5's must-show), on the session's redis-server.

Worker processes run ``fabric worker --config FILE`` with ``[breakers.x]`` and ``[workers.w] breakers = ["x"]``
and the ``flaky_record`` handler of ``tests/fixtures/handlers.py``: it fails while ``down_key(ns)`` exists, and notes
every call it begins with Redis's TIME and the breaker's state and ``since`` read in one script. So "no
call begun more than ``REPORT_MS + POLL_MS`` after the breaker opened" is checked on Redis's clock, from Redis's own
record of when it opened, whatever the processes' clocks say.

Run as ``python -m tests.test_breaker_processes URL NS INDEX``, this module is one of the processes of the
HALF_OPEN property test (``_admitter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from fabric import Publisher
from fabric.breaker import CLOSED, HALF_OPEN, OPEN, POLL_MS, REPORT_MS, BreakerStore
from fabric.client import connect
from fabric.codec import decode_fields
from fabric.config import BreakerConfig, load_config
from fabric.events import BreakerStateChanged, Tick
from fabric.keys import Keys
from tests.conftest import ROOT
from tests.fixtures.handlers import Call, calls_key, down_key, subprocess_env
from tests.test_processes import GROUP, pending, publish_ticks, records, streams
from tests.test_supervisor import SupervisorProcess
from tests.waiting import eventually

pytestmark = pytest.mark.real_only

BOUND_MS = REPORT_MS + POLL_MS
"""breaker.py's written bound: every process stops calling within this long of the breaker opening."""
BREAKER = "x"
BLOCK_MS = 100
MAX_DELIVERIES = 3
BACKOFF_MS = 600
"""Base and cap of the retry backoff: a failed entry is retried 300-600 ms later (``retry.backoff_ms``), long after
the breaker opened (a few tens of ms after the first failures), so its retry waits for the breaker."""
SKEW_S = 600


# ---- processes and their config ----------------------------------------------------------------------------


def write_config(tmp_path: Path, *, processes: int, recovery_ms: int, fallback: str | None = None,
                 handler: str = "flaky_record") -> Path:
    """A config file: breaker x (3 consecutive failures fleet-wide trip it) guarding one [workers.w] table."""
    path = tmp_path / f"breaker-{processes}.toml"
    path.write_text(
        f"[breakers.{BREAKER}]\nfailure_threshold = 3\nrecovery_ms = {recovery_ms}\nhalf_open_trials = 1\n"
        f"close_after = 1\n\n"
        f'[workers.w]\nhandler = "tests.fixtures.handlers:{handler}"\nprocesses = {processes}\ngroup = "{GROUP}"\n'
        f'topics = ["tick"]\nbreakers = ["{BREAKER}"]\nconcurrency = 4\nblock_ms = {BLOCK_MS}\n'
        f"max_deliveries = {MAX_DELIVERIES}\nbackoff_base_ms = {BACKOFF_MS}\nbackoff_max_ms = {BACKOFF_MS}\n"
        "reclaim_idle_ms = 5000\n"
        + (f'fallback = "tests.fixtures.handlers:{fallback}"\n' if fallback else "")
    )
    return path


def breaker_store(redis: Any, keys: Keys, config: Path) -> BreakerStore:
    """The file's breaker x, as the workers run it."""
    return BreakerStore(redis, keys, load_config(config).breakers[BREAKER])


@pytest.fixture
def fleet(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    """Start ``fabric worker --config FILE`` in the test's namespace (``skew_s``: with the Python clock of its
    processes shifted); it and its children are killed at teardown."""
    started: list[SupervisorProcess] = []

    def start(config: Path, *, skew_s: int = 0, **env: str) -> SupervisorProcess:
        environ = subprocess_env(redis_url, keys.ns, **env)
        if skew_s:
            environ["PYTHONPATH"] = f"{skewed_clock(tmp_path, skew_s)}{os.pathsep}{environ['PYTHONPATH']}"
        sup = SupervisorProcess(["--config", str(config), "--namespace", keys.ns, "--redis-url", redis_url],
                                environ, tmp_path / f"fleet-{len(started)}.log")
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.close()


SITECUSTOMIZE = '''"""Shift this process's wall clock (time.time, time.time_ns, datetime.now) by SKEW_S seconds."""
import datetime as _dt
import time as _time

SKEW_S = {skew_s}
_time_s, _time_ns = _time.time, _time.time_ns
_time.time = lambda: _time_s() + SKEW_S
_time.time_ns = lambda: _time_ns() + SKEW_S * 1_000_000_000


class _SkewedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls.fromtimestamp(_time.time(), tz)

    @classmethod
    def utcnow(cls):
        return cls.utcfromtimestamp(_time.time())

    @classmethod
    def today(cls):
        return cls.now()


_dt.datetime = _SkewedDatetime
'''


def skewed_clock(tmp_path: Path, skew_s: int) -> Path:
    """A directory whose ``sitecustomize.py`` shifts the clock of a Python process that has it on PYTHONPATH."""
    folder = tmp_path / f"skew{skew_s:+d}"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(skew_s=skew_s))
    return folder


# ---- Redis's view ------------------------------------------------------------------------------------------


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def redis_clock_past(redis: Any, t_ms: int) -> None:
    """Wait until Redis's clock reads ``t_ms`` (a duration under test, measured where the breaker measures it)."""

    async def past() -> bool:
        return await redis_ms(redis) >= t_ms

    await eventually(past, what=f"Redis's clock to reach {t_ms}")


async def breaker(redis: Any, keys: Keys) -> tuple[str, int]:
    """The breaker's state and the Redis time it entered it."""
    state, since = await redis.hmget(keys.breaker(BREAKER), "state", "since")
    return (state or b"CLOSED").decode(), int(since or 0)


async def opened(redis: Any, keys: Keys) -> int | None:
    """When the breaker opened (Redis ms), while it is OPEN."""
    state, since = await breaker(redis, keys)
    return since if state == OPEN else None


async def transitions(redis: Any, keys: Keys, name: str = BREAKER) -> list[tuple[str, str, int]]:
    """The breaker's transitions from the system stream: (old, new, Redis ms)."""
    out = []
    for entry_id, fields in await redis.xrange(keys.breaker_events()):
        event = decode_fields(fields)
        assert isinstance(event, BreakerStateChanged)
        if event.breaker == name:
            out.append((event.old_state, event.new_state, int(entry_id.split(b"-")[0])))
    return out


async def calls(redis: Any, keys: Keys) -> list[Call]:
    """Every call ``flaky_record`` began, in order."""
    return [Call.parse(raw) for raw in await redis.lrange(calls_key(keys.ns), 0, -1)]


def late(cs: list[Call]) -> list[Call]:
    """Calls begun while the breaker was OPEN, more than the bound after it opened."""
    return [c for c in cs if c.state == OPEN and c.redis_ms - c.since_ms > BOUND_MS]


async def group_lag(redis: Any, keys: Keys) -> int:
    """Entries of the topic the group has not been delivered yet (Redis's lag, summed over the streams)."""
    total = 0
    for s in await streams(redis, keys):
        (group,) = [g for g in await redis.xinfo_groups(s) if g["name"] == GROUP.encode()]
        assert group["lag"] is not None, f"Redis cannot tell the lag of {s}"
        total += int(group["lag"])
    return total


async def dead_letters(redis: Any, keys: Keys) -> list[str]:
    """Dead-letter streams of the namespace that exist."""
    registered = [k.decode() for k in await redis.smembers(keys.dlq_registry())]
    per_stream = [keys.dlq(s) for s in await streams(redis, keys)]
    return [k for k in sorted({*registered, *per_stream}) if await redis.exists(k)]


async def handled_all(redis: Any, keys: Keys, published: set[str]) -> bool:
    return {r[0] for r in await records(redis, keys.ns)} >= published and not await pending(redis, keys)


async def stop(sup: SupervisorProcess) -> None:
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0, sup.output()
    sup.assert_clean()


# ---- three processes, one breaker --------------------------------------------------------------------------


class Flow:
    """A steady flow of ticks over 10 symbols (10 every ``pause_s``), published until ``stop()``."""

    def __init__(self, redis: Any, keys: Keys, pause_s: float = 0.025) -> None:
        self.redis, self.keys, self.pause_s = redis, keys, pause_s
        self.published: set[str] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Flow:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop publishing; every event in ``published`` is in Redis after this."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        async with Publisher(self.redis, keys=self.keys) as pub:
            while not self._stop.is_set():
                events = [Tick(symbol=f"S{i}", bid=1.0, ask=2.0) for i in range(10)]
                await pub.publish_many(events)
                self.published |= {e.event_id for e in events}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.pause_s)


class Reads(NamedTuple):
    """The group's reading of the topic: entries read, entries in the streams, lag (summed over the streams)."""

    read: int
    length: int
    lag: int


async def reads(redis: Any, streams_: list[str]) -> Reads:
    """Each stream's counts at one instant (one MULTI per stream: a cluster serves the streams from several nodes);
    two readings' differences still add up stream by stream."""
    read = length = lag = 0
    for s in streams_:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xinfo_groups(s)
            pipe.xlen(s)
            groups, n = await pipe.execute()
        (group,) = [g for g in groups if g["name"] == GROUP.encode()]
        assert group["lag"] is not None and group["entries-read"] is not None, group
        read, length, lag = read + int(group["entries-read"]), length + int(n), lag + int(group["lag"])
    return Reads(read, length, lag)


async def test_three_processes_stop_within_the_bound_wait_in_redis_and_recover_losing_nothing(
        redis, keys, fleet, tmp_path) -> None:
    # Given 3 worker processes of one [workers.w] table guarded by breaker x (3 consecutive failures fleet-wide
    # trip it, 4 s to recover), max_deliveries 3, all three calling their handler on a steady flow of events
    recovery_ms = 4000
    config = write_config(tmp_path, processes=3, recovery_ms=recovery_ms)
    sup = fleet(config)
    pids = {c.pid for c in await sup.started(3)}
    async with Flow(redis, keys) as flow:

        async def all_three_calling() -> bool:
            return {c.pid for c in await calls(redis, keys)} >= pids

        await eventually(all_three_calling, what="each of the 3 processes to call its handler")

        # When the downstream goes down
        await redis.set(down_key(keys.ns), 1)

        # Then the failures, wherever they were seen, trip the breaker
        since = await eventually(lambda: opened(redis, keys), what="the breaker to open")

        # and once every process has had the bound to see it (and a read in flight has returned), the group reads
        # nothing more for as long again: the flow's events wait in Redis, the lag grows by every one of them
        await redis_clock_past(redis, since + BOUND_MS + BLOCK_MS)
        joined = await streams(redis, keys)
        before = await reads(redis, joined)
        await redis_clock_past(redis, await redis_ms(redis) + BOUND_MS)
        after = await reads(redis, joined)
        assert await opened(redis, keys) == since, "the breaker left OPEN during the observation: raise recovery_ms"
        assert after.length > before.length, "the flow went on"
        assert after.read == before.read and after.lag - before.lag == after.length - before.length, (before, after)

        # and none of the three processes began a call more than the bound after the breaker opened
        seen = await calls(redis, keys)
        assert not late(seen), f"calls begun past the bound while open: {late(seen)[:5]}"
        failed = [c for c in seen if c.failed]
        assert failed, "the downstream's failures were seen"

        # When the downstream heals, while the breaker is still open (an outage long enough that a worker retrying
        # every BACKOFF_MS or sooner would have used up MAX_DELIVERIES of every failed entry)
        assert await opened(redis, keys) == since
        assert await redis_ms(redis) - min(c.redis_ms for c in failed) > MAX_DELIVERIES * BACKOFF_MS
        await redis.delete(down_key(keys.ns))
    published = flow.published

    # Then after the recovery time one trial closes the breaker, and every event is handled and acked, the
    # backlog that waited while it was open included
    await eventually(lambda: handled_all(redis, keys, published), timeout_s=60, what="every event handled")
    assert [(old, new) for old, new, _ in await transitions(redis, keys)] == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert (await breaker(redis, keys))[0] == CLOSED

    # and nothing was dead-lettered, and no entry came near max_deliveries: the outage cost each failed entry one
    # delivery for its failure, and at most one more for its retry, waiting for the breaker
    assert not await dead_letters(redis, keys)
    seen = await calls(redis, keys)
    assert max(c.delivery for c in seen) < MAX_DELIVERIES, [c for c in seen if c.delivery >= MAX_DELIVERIES][:5]
    assert not late(seen)
    await stop(sup)


# ---- bugs found on the way (fabric/breaker.py, fabric/worker.py): the fix is proposed, the test waits for it ---


async def test_a_worker_holding_nothing_when_the_breaker_opened_still_recovers(redis, keys, fleet, tmp_path) -> None:
    # Given breaker x tripped by another process (300 ms to recover), and a worker process started while it is
    # open, so it holds no entry
    config = write_config(tmp_path, processes=1, recovery_ms=300)
    assert (await breaker_store(redis, keys, config).record(3, 3, 3, 0, 0)).state == OPEN
    sup = fleet(config)

    # When events arrive (the downstream is healthy)
    published = await publish_ticks(redis, keys, 10)

    # Then after the recovery time a trial is admitted, the breaker closes and every event is handled
    await eventually(lambda: handled_all(redis, keys, published), timeout_s=15,
                     what="every event handled (the breaker recovered)")
    await stop(sup)


async def test_an_entry_whose_trials_fail_during_the_outage_is_not_dead_lettered(redis, keys, fleet, tmp_path) -> None:
    # Given breaker x two failures short of tripping (300 ms to recover), a downstream that is down, and one worker
    # process working on one event, which is the one that fails the third time and trips the breaker
    config = write_config(tmp_path, processes=1, recovery_ms=300)
    await redis.set(down_key(keys.ns), 1)
    assert (await breaker_store(redis, keys, config).record(2, 2, 2, 0, 0)).state == CLOSED
    sup = fleet(config)
    published = await publish_ticks(redis, keys, 1)

    # When the outage lasts for MAX_DELIVERIES trials (each one a call of the only entry the worker holds)
    async def outage_over() -> bool:
        trials_failed = [t for t in await transitions(redis, keys) if t[:2] == (HALF_OPEN, OPEN)]
        return len(trials_failed) >= MAX_DELIVERIES or bool(await dead_letters(redis, keys))

    await eventually(outage_over, timeout_s=30, what=f"{MAX_DELIVERIES} failed trials (or a dead letter)")
    await redis.delete(down_key(keys.ns))

    # Then once it heals, the event is handled, not dead-lettered
    async def settled() -> bool:
        return await handled_all(redis, keys, published) or bool(await dead_letters(redis, keys))

    await eventually(settled, timeout_s=30, what="the event handled or dead-lettered")
    assert not await dead_letters(redis, keys), f"dead-lettered: {[c for c in await calls(redis, keys)]}"
    await stop(sup)


# ---- HALF_OPEN admits exactly K trials, whoever asks -----------------------------------------------------------

ADMITTERS = 4
ROUNDS = 8
SEED = int(os.environ.get("FABRIC_TEST_SEED", random.randrange(2**32)))


def ready_key(ns: str) -> str:
    return f"{ns}:ready"


def go_key(ns: str, index: int) -> str:
    """One admitter's go list; every admitter's in one hash slot, so one MULTI gives them all their go at once."""
    return f"{ns}:go:{{admitters}}:{index}"


def answers_key(ns: str) -> str:
    return f"{ns}:answers"


def trial_policy(name: str, trials: int) -> BreakerConfig:
    """Trips on one failure; trials admitted as soon as anyone asks (recovery_ms 0)."""
    return BreakerConfig(name=name, failure_threshold=1, recovery_ms=0, half_open_trials=trials)


async def _admitter(url: str, ns: str, index: int) -> None:
    """One process of the property test: per round, on its go, fire ``callers`` concurrent ``admit()`` calls on its
    own client and report how many were admitted."""
    client = connect(url, max_connections=64)
    keys = Keys(ns)
    try:
        await asyncio.gather(*(client.ping() for _ in range(64)))  # connections open before the burst
        await client.rpush(ready_key(ns), index)
        while True:
            popped = await client.blpop([go_key(ns, index)], timeout=20)
            if popped is None or popped[1] == b"stop":
                return
            go = json.loads(popped[1])
            store = BreakerStore(client, keys, trial_policy(go["breaker"], go["trials"]))
            states = await asyncio.gather(*(store.admit() for _ in range(go["callers"])))
            await client.rpush(answers_key(ns), json.dumps({
                "round": go["round"], "index": index, "admitted": sum(s.admitted for s in states),
                "states": sorted({s.state for s in states})}))
    finally:
        await client.aclose()


@pytest.fixture
def admitters(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[list[Any]]:
    """``ADMITTERS`` processes running ``_admitter``; killed at teardown if still running."""
    import subprocess

    logs = [(tmp_path / f"admitter-{i}.log").open("wb") for i in range(ADMITTERS)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_breaker_processes", redis_url, keys.ns, str(i)],
                              cwd=ROOT, env=subprocess_env(redis_url, keys.ns), stdin=subprocess.DEVNULL,
                              stdout=log, stderr=log) for i, log in enumerate(logs)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()


async def test_half_open_admits_exactly_k_trials_across_processes(redis, keys, admitters) -> None:
    rng = random.Random(SEED)
    ready = await eventually(lambda: _at_least(redis.llen(ready_key(keys.ns)), ADMITTERS), timeout_s=30,
                             what=f"{ADMITTERS} admitter processes ready")
    assert ready
    for r in range(ROUNDS):
        # Given a breaker allowing K trials (1-5), just tripped, eligible for HALF_OPEN at once
        trials = rng.randint(1, 5)
        callers = [rng.randint(1, 40) for _ in range(ADMITTERS)]
        name = f"p{r}"
        note = f"seed {SEED} (FABRIC_TEST_SEED), round {r}: K={trials}, callers per process {callers}"
        assert (await BreakerStore(redis, keys, trial_policy(name, trials)).record(1, 1, 1, 0, 0)).state == OPEN

        # When every process fires its callers' admit() at once
        async with redis.pipeline(transaction=True) as pipe:
            for i, n in enumerate(callers):
                pipe.rpush(go_key(keys.ns, i), json.dumps({"round": r, "breaker": name, "trials": trials,
                                                           "callers": n}))
            await pipe.execute()
        answers = []
        for _ in range(ADMITTERS):
            popped = await redis.blpop([answers_key(keys.ns)], timeout=30)
            assert popped is not None, f"an admitter did not answer; {note}"
            answers.append(json.loads(popped[1]))

        # Then exactly K were admitted in all (fewer only if fewer asked), all in HALF_OPEN, after one transition
        assert all(a["round"] == r for a in answers), note
        assert sum(a["admitted"] for a in answers) == min(trials, sum(callers)), f"{answers}; {note}"
        assert {s for a in answers for s in a["states"]} == {HALF_OPEN}, f"{answers}; {note}"
        assert [(o, n) for o, n, _ in await transitions(redis, keys, name)] == [(CLOSED, OPEN), (OPEN, HALF_OPEN)], note
    for i in range(ADMITTERS):
        await redis.rpush(go_key(keys.ns, i), "stop")
    codes = await asyncio.gather(*(asyncio.to_thread(p.wait, 30) for p in admitters))
    assert codes == [0] * ADMITTERS


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


# ---- a host whose clock is minutes off -----------------------------------------------------------------------


@pytest.mark.parametrize("skew_s", [SKEW_S, -SKEW_S], ids=["10-min-ahead", "10-min-behind"])
async def test_a_process_with_a_skewed_clock_stops_and_recovers_on_redis_time(
        redis, keys, fleet, tmp_path, skew_s) -> None:
    # Given one worker process whose Python clock is 10 minutes off, calling its (healthy) handler on a backlog,
    # guarded by breaker x (2 s to recover)
    recovery_ms = 2000
    config = write_config(tmp_path, processes=1, recovery_ms=recovery_ms)
    published = await publish_ticks(redis, keys, 2000)
    sup = fleet(config, skew_s=skew_s, FABRIC_TEST_SLEEP_MS="10")

    async def calling() -> list[Call]:
        cs = await calls(redis, keys)
        return cs if len(cs) >= 20 else []

    before = await eventually(calling, what="20 calls of the skewed process")
    for c in before:  # its clock really is off (the shift took), by about the skew, both ways of reading it
        assert abs(c.clock_ms - c.redis_ms - skew_s * 1000) < SKEW_S * 1000 / 2, c
        assert abs(c.datetime_ms - c.redis_ms - skew_s * 1000) < SKEW_S * 1000 / 2, c

    # When another process (this test) reports the failures that trip the breaker
    tripped = await breaker_store(redis, keys, config).record(3, 3, 3, 0, 0)
    assert tripped.state == OPEN
    _, since = await breaker(redis, keys)

    # Then the skewed process stops calling within the bound, and comes back through one trial after the
    # recovery time as Redis measures it (not minutes early or late: the deadline below is far shorter than the
    # skew), and the breaker closes
    await eventually(lambda: handled_all(redis, keys, published), timeout_s=60, what="every event handled")
    seen = await calls(redis, keys)
    assert not late(seen), f"calls begun past the bound while open: {late(seen)[:5]}"
    (half_open_ms,) = [t for old, new, t in await transitions(redis, keys) if new == HALF_OPEN]
    assert half_open_ms >= since + recovery_ms
    resumed = [c for c in seen if c.redis_ms > since and c.state != OPEN]
    assert resumed and min(c.redis_ms for c in resumed) >= since + recovery_ms
    assert resumed[0].state == HALF_OPEN, "the first call after the trip was the trial"
    assert [(old, new) for old, new, _ in await transitions(redis, keys)] == [
        (CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert not await dead_letters(redis, keys)
    await stop(sup)


if __name__ == "__main__":
    asyncio.run(_admitter(sys.argv[1], sys.argv[2], int(sys.argv[3])))
