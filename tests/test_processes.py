"""Worker processes under real signals: SIGKILL loses nothing, SIGTERM/SIGINT drain and exit 0.

Each test runs ``fabric worker`` subprocesses with the handlers of ``tests/fixtures/handlers.py``, which record
``event_id|pid|stream|entry_id`` in Redis per handled event, and checks Redis's own bookkeeping (XPENDING,
the group's last delivered id) against what was published and what was handled.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from fabric import Publisher
from fabric.events import Tick
from fabric.keys import Keys
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import gate_key, handled_key, parse_record, subprocess_env
from tests.waiting import eventually

pytestmark = pytest.mark.real_only

TOPIC = "tick"
GROUP = "g"
RECLAIM_IDLE_MS = 1000
SHUTDOWN_DEADLINE_S = 30.0
"""A deadline for a process to exit, far above its grace; not a timing threshold under test."""
FAULTS = ("Traceback", "Task was destroyed", "never awaited", "Exception ignored")

Entry = tuple[str, str]  # stream key, entry id


class WorkerProcess:
    """One ``fabric worker`` subprocess; its stdout and stderr go to a file (a pipe could fill and block it)."""

    def __init__(self, redis_url: str, ns: str, consumer: str, log: Path, *, handler: str, sleep_ms: int,
                 concurrency: int, grace_s: float) -> None:
        self.consumer = consumer
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            fabric_cmd(
                "worker", f"tests.fixtures.handlers:{handler}", "--topic", TOPIC, "--group", GROUP,
                "--consumer", consumer, "--namespace", ns, "--redis-url", redis_url,
                "--reclaim-idle-ms", str(RECLAIM_IDLE_MS), "--block-ms", "100",
                "--concurrency", str(concurrency), "--grace-s", str(grace_s),
            ),
            cwd=ROOT, env=subprocess_env(redis_url, ns, FABRIC_TEST_SLEEP_MS=str(sleep_ms)),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout_s: float = SHUTDOWN_DEADLINE_S) -> int:
        """Wait for the process to end; fail with its output if it is still running at the deadline."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.consumer} still running after {timeout_s}s:\n{self.output()}"
            ) from None

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def assert_clean(self) -> None:
        out = self.output()
        for fault in FAULTS:
            assert fault not in out, f"{fault!r} in the output of worker {self.consumer}:\n{out}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def spawn(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Any]:
    """Start worker processes of the test's namespace; every one is killed at teardown."""
    started: list[WorkerProcess] = []

    def start(consumer: str, *, handler: str = "slow_record", sleep_ms: int = 20, concurrency: int = 8,
              grace_s: float = 10.0) -> WorkerProcess:
        w = WorkerProcess(redis_url, keys.ns, consumer, tmp_path / f"{consumer}.log", handler=handler,
                          sleep_ms=sleep_ms, concurrency=concurrency, grace_s=grace_s)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.close()


# ---- reading Redis's bookkeeping ---------------------------------------------------------------------------


async def publish_ticks(redis: Any, keys: Keys, n: int, symbols: int = 10) -> set[str]:
    events = [Tick(symbol=f"S{i % symbols}", bid=1.0, ask=2.0) for i in range(n)]
    async with Publisher(redis, keys=keys) as pub:
        ids = await pub.publish_many(events)
    assert all(ids), "every event is new, so every one gets an entry"
    return {e.event_id for e in events}


async def records(redis: Any, ns: str) -> list[tuple[str, int, str, str]]:
    """(event_id, pid, stream, entry_id) per handler call, in order."""
    return [parse_record(r) for r in await redis.lrange(handled_key(ns), 0, -1)]


async def streams(redis: Any, keys: Keys) -> list[str]:
    """The topic's streams on which the group exists (a worker creates it when it joins)."""
    out = []
    for s in sorted(s.decode() for s in await redis.smembers(keys.topic_registry(TOPIC))):
        if any(g["name"] == GROUP.encode() for g in await redis.xinfo_groups(s)):
            out.append(s)
    return out


async def pending(redis: Any, keys: Keys, consumer: str | None = None) -> set[Entry]:
    """Entries delivered to the group and not acked (to ``consumer`` only, if given)."""
    out: set[Entry] = set()
    for s in await streams(redis, keys):
        rows = await redis.xpending_range(s, GROUP, "-", "+", 100_000, consumername=consumer)
        out |= {(s, row["message_id"].decode()) for row in rows}
    return out


async def all_entries(redis: Any, keys: Keys) -> set[Entry]:
    return {(s, entry_id.decode()) for s in await streams(redis, keys) for entry_id, _ in await redis.xrange(s)}


async def undelivered(redis: Any, keys: Keys) -> set[Entry]:
    """Entries the group has not read yet: after its last delivered id."""
    out: set[Entry] = set()
    for s in await streams(redis, keys):
        (group,) = [g for g in await redis.xinfo_groups(s) if g["name"] == GROUP.encode()]
        last = group["last-delivered-id"].decode()
        out |= {(s, entry_id.decode()) for entry_id, _ in await redis.xrange(s, f"({last}", "+")}
    return out


# ---- behaviours --------------------------------------------------------------------------------------------


async def test_sigkill_mid_batch_loses_nothing_and_the_survivor_takes_over(redis, keys, spawn) -> None:
    # Given two workers handling 3000 ticks over 10 symbols, slowly enough that work is in flight
    published = await publish_ticks(redis, keys, 3000)
    victim = spawn("victim")
    survivor = spawn("survivor")

    async def victim_mid_batch() -> bool:
        rs = await records(redis, keys.ns)
        by_victim = sum(1 for r in rs if r[1] == victim.pid)
        by_survivor = sum(1 for r in rs if r[1] == survivor.pid)
        return by_victim >= 50 and by_survivor >= 1 and bool(await pending(redis, keys, "victim"))

    await eventually(victim_mid_batch, what="both workers handling, the victim holding unacked entries")

    # When the victim is killed outright
    victim.send(signal.SIGKILL)
    assert await victim.exit_code() == -signal.SIGKILL
    held = await pending(redis, keys, "victim")
    assert held, "the victim died holding entries it had been delivered and not acked"

    # Then every published event is handled at least once and nothing stays pending
    async def all_handled_and_acked() -> bool:
        handled = {r[0] for r in await records(redis, keys.ns)}
        return handled >= published and not await pending(redis, keys)

    await eventually(all_handled_and_acked, timeout_s=60, what="every event handled and acked")
    assert {r[0] for r in await records(redis, keys.ns)} == published

    # and the survivor handled the entries the victim had been holding
    by_survivor = {(r[2], r[3]) for r in await records(redis, keys.ns) if r[1] == survivor.pid}
    missed = held - by_survivor
    assert not missed, f"{len(missed)} of the victim's {len(held)} entries never reached the survivor"

    # and the survivor still stops cleanly
    survivor.send(signal.SIGTERM)
    assert await survivor.exit_code() == 0, survivor.output()
    survivor.assert_clean()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_work_and_exits_0(redis, keys, spawn, sig) -> None:
    # Given one worker with a slow handler and a backlog of 1000 ticks
    published = await publish_ticks(redis, keys, 1000)
    grace_s = 10.0
    worker = spawn("w", grace_s=grace_s)

    async def some_handled() -> bool:
        return await redis.llen(handled_key(keys.ns)) >= 50

    await eventually(some_handled, what="50 events handled")

    # When it is told to stop mid-backlog
    worker.send(sig)

    # Then it exits 0 within its grace (its handlers take 20 ms), and says nothing alarming on the way out
    assert await worker.exit_code(timeout_s=grace_s) == 0, worker.output()
    worker.assert_clean()

    # and no event was handled twice, and it did not run the whole backlog before stopping
    rs = await records(redis, keys.ns)
    handled_ids = [r[0] for r in rs]
    assert len(handled_ids) == len(set(handled_ids)), "an event was handled twice"
    assert set(handled_ids) < published, "the worker handled the whole backlog: the signal came too late to test"

    # and every entry is accounted for: handled entries are exactly the acked ones; the rest are pending
    # (returned to the group) or not yet delivered
    entries = await all_entries(redis, keys)
    still_pending = await pending(redis, keys)
    not_read = await undelivered(redis, keys)
    acked = entries - still_pending - not_read
    handled_entries = {(r[2], r[3]) for r in rs}
    assert len(entries) == len(published)
    assert not still_pending & not_read
    assert handled_entries == acked, (
        f"handled but not acked: {len(handled_entries - acked)}; acked but not handled: {len(acked - handled_entries)}"
    )
    assert len(acked) + len(still_pending) + len(not_read) == len(published)


async def test_sigterm_hands_unstarted_entries_back_to_the_group(redis, keys, spawn) -> None:
    # Given one worker with a slow handler, stopped by SIGTERM while it holds a read-ahead backlog
    published = await publish_ticks(redis, keys, 1000)
    worker = spawn("w")

    async def some_handled() -> bool:
        return await redis.llen(handled_key(keys.ns)) >= 50

    await eventually(some_handled, what="50 events handled")
    worker.send(signal.SIGTERM)
    assert await worker.exit_code() == 0, worker.output()

    # Then what it had read but not started is pending with an idle time past any reclaim threshold, so the
    # rest of the group takes it over at once instead of waiting reclaim_idle_ms
    rows = []
    for s in await streams(redis, keys):
        rows += await redis.xpending_range(s, GROUP, "-", "+", 100_000)
    assert rows and len(rows) < len(published), "the worker was stopped holding unstarted entries"
    held = [r for r in rows if r["time_since_delivered"] < 3_600_000]
    assert not held, (
        f"{len(held)} of {len(rows)} pending entries were not handed back (idle {held[0]['time_since_delivered']} ms)"
        f":\n{worker.output()}"
    )


async def test_a_live_worker_keeps_its_slow_entries(redis, keys, spawn) -> None:
    # Given a worker holding 4 entries in handlers that have not finished, and a second live worker
    published = await publish_ticks(redis, keys, 4, symbols=1)
    holder = spawn("holder", handler="gated_record")
    await eventually(lambda: _count(pending(redis, keys, "holder"), 4), what="4 entries delivered to holder")
    rival = spawn("rival", handler="gated_record")

    async def rival_joined() -> bool:
        return "joined group" in rival.output()

    await eventually(rival_joined, what="the rival to join the group")

    # When the handlers stay busy for several reclaim idle times (both workers reclaim every second meanwhile)
    await asyncio.sleep(3 * RECLAIM_IDLE_MS / 1000)  # the duration under test, not a wait for a condition

    # Then the holder's heartbeat kept them: still its own, never delivered again
    rows = []
    for s in await streams(redis, keys):
        rows += await redis.xpending_range(s, GROUP, "-", "+", 100)
    redelivered = [r for r in rows if r["consumer"] != b"holder" or r["times_delivered"] != 1]
    assert len(rows) == 4 and not redelivered, f"live work was redelivered: {rows}\n{holder.output()}"

    # and once the handlers finish, each event was handled exactly once, by the holder
    await redis.set(gate_key(keys.ns), 1)

    async def done() -> bool:
        return await redis.llen(handled_key(keys.ns)) >= 4 and not await pending(redis, keys)

    await eventually(done, what="4 events handled and acked")
    rs = await records(redis, keys.ns)
    assert sorted(r[0] for r in rs) == sorted(published), f"handled: {rs}"
    assert {r[1] for r in rs} == {holder.pid}, f"the rival (pid {rival.pid}) took over live work: {rs}"


async def test_a_second_sigterm_stops_at_once_leaving_in_flight_entries_pending(redis, keys, spawn) -> None:
    # Given a worker draining after a first SIGTERM, its handlers stuck, with a long grace
    await publish_ticks(redis, keys, 4, symbols=1)
    worker = spawn("w", handler="gated_record", grace_s=600.0)
    await eventually(lambda: _count(pending(redis, keys, "w"), 4), what="4 entries delivered")
    worker.send(signal.SIGTERM)

    async def draining() -> bool:
        return "draining" in worker.output()

    await eventually(draining, what="the worker to log that it is draining")

    # When a second SIGTERM arrives
    worker.send(signal.SIGTERM)

    # Then it stops at once (long before its grace), without a traceback, and the unfinished entries stay
    # pending for the group
    await worker.exit_code()
    worker.assert_clean()
    assert len(await pending(redis, keys)) == 4
    assert not await records(redis, keys.ns)


async def _count(coro: Any, n: int) -> bool:
    return len(await coro) >= n
