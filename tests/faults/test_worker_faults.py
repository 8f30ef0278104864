"""Worker process faults, scored by the checker: SIGKILL, SIGSTOP past the reclaim time, SIGTERM under load, a
hanging handler, a handler that always raises."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.faults.checker import Score, read_dead_letters, read_journals
from tests.faults.harness import WorkerProc, World, case, joined, rate, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 240
"""The short form's events per case (the long form passes more)."""


@case("worker SIGKILL mid-batch", "no loss")
async def case_worker_sigkill(w: World, events: int) -> Score:
    # Given two workers sharing a producer's flow, slowly enough that the victim holds entries in flight
    await w.create_streams()
    victim, survivor = await joined(w.spawn("victim", sleep_ms=20), w.spawn("survivor", sleep_ms=20))
    producing = asyncio.create_task(w.publish(events, rate=rate(events)))
    await until(lambda: _mid_batch(w, victim.pid, events // 10), what="the victim mid-batch, holding entries")

    # When the victim is killed outright
    victim.send(signal.SIGKILL)
    assert await victim.exit_code() == -signal.SIGKILL
    fault_end = time.time()
    await producing

    # Then the survivor accounts for everything and still stops cleanly
    await w.settle()
    await survivor.stopped_cleanly()
    return await w.score(fault_end=fault_end)


async def _mid_batch(w: World, pid: int, handled: int) -> bool:
    return w.handled_by(pid) >= handled and await w.pending("victim") > 0


@case("worker SIGSTOP past reclaim, SIGCONT", "no loss")
async def case_worker_sigstop(w: World, events: int) -> Score:
    # Given two workers sharing a producer's flow, one of them frozen while it holds entries in hand
    await w.create_streams()
    frozen, _ = await joined(w.spawn("frozen", sleep_ms=20), w.spawn("survivor", sleep_ms=20))
    producing = asyncio.create_task(w.publish(events, rate=rate(events)))
    held = await until(lambda: _freeze_holding(w, frozen, events // 10), what="the frozen worker stopped mid-batch")

    # When it stays frozen until the survivor has reclaimed every entry it held and acknowledged them, then wakes
    await until(lambda: _finished(w, held), what=f"the survivor to reclaim and finish the {len(held)} entries the "
                "frozen worker held")
    frozen.send(signal.SIGCONT)
    fault_end = time.time()
    await producing

    # Then the late worker's acks and commits do no harm: everything is accounted for, both stop cleanly (the
    # short form checks that its stopped line counts the late acks as refused)
    await w.settle()
    await w.stop_workers()
    return await w.score(fault_end=fault_end)


async def _freeze_holding(w: World, frozen: WorkerProc, handled: int) -> set[tuple[str, bytes]] | None:
    """SIGSTOP the worker once it has handled ``handled`` calls and holds entries; the entries it holds once
    stopped (the same on two reads, so no ack it sent before it stopped is still on its way), or None after
    waking it up again if it held none."""
    if w.handled_by(frozen.pid) < handled or not await w.pending("frozen"):
        return None
    frozen.send(signal.SIGSTOP)
    await until(lambda: _true(frozen.stopped()), what="SIGSTOP to take effect")
    held = await w.pending_ids("frozen")
    while held != (again := await w.pending_ids("frozen")):
        held = again
    if not held:  # it finished all it held just before it stopped: let it go on, and try again
        frozen.send(signal.SIGCONT)
        return None
    return held


async def _finished(w: World, entries: set[tuple[str, bytes]]) -> bool:
    return not await w.unacked(entries)


@case("worker SIGTERM under load", "no loss, no duplicates")
async def case_worker_sigterm(w: World, events: int) -> Score:
    # Given a worker handling while a producer keeps publishing
    await w.create_streams()
    (first,) = await joined(w.spawn("first", sleep_ms=2))
    producing = asyncio.create_task(w.publish(events, rate=rate(events), batch=10))
    await until(lambda: _true(w.handled_by(first.pid) >= events // 5), what="the first worker under load")

    # When it is told to stop mid-flow, drains, and a second worker takes over
    first.send(signal.SIGTERM)
    assert await first.exit_code() == 0, first.output()
    first.assert_clean()
    fault_end = time.time()
    second = w.spawn("second", sleep_ms=2)
    await producing

    # Then nothing is lost and nothing handled twice: the drain committed what it handled, handed back the rest
    await w.settle()
    await second.stopped_cleanly()
    return await w.score(fault_end=fault_end)


async def _true(value: bool) -> bool:
    return value


@case("handler hangs (timeout, retry)", "no loss, no duplicates")
async def case_handler_hangs(w: World, events: int) -> Score:
    # Given a handler whose first call on every tenth tick hangs, under a per-call timeout
    worker = w.spawn("w", handler="hang_some", handler_timeout_s=0.5, env={"FAULTS_HANG_EVERY": "10"})
    await w.publish(events)
    fault_end = time.time()

    # Then the hung calls time out and their entries are handled on the next delivery
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


@case("handler always raises", "no loss")
async def case_handler_raises(w: World, events: int) -> Score:
    # Given a handler that fails every call, and three deliveries allowed
    worker = w.spawn("w", handler="always_raise", max_deliveries=3)
    await w.publish(events)
    fault_end = time.time()

    # Then every event ends as a dead letter
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


# ---- the short form ------------------------------------------------------------------------------------


async def test_a_worker_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_worker_sigkill(w, EVENTS)
    assert s.lost == 0 and s.unexpected == 0, s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()


async def test_a_worker_frozen_past_the_reclaim_time_does_no_harm_when_it_wakes(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_worker_sigstop(w, EVENTS)
        frozen = next(p for p in w.workers if p.consumer == "frozen")
        late_acks = frozen.stat("refused")
        late = frozen.output()
    # the entries it held when it froze were finished by the survivor before it woke: its acks came late, were
    # refused and counted (its stopped line, and a warning), and did no harm
    assert late_acks > 0, late
    assert "already acknowledged: another consumer took them over" in late, late
    assert s.lost == 0 and s.unexpected == 0, s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()
    assert "Traceback" not in late


async def test_sigterm_under_load_drains_without_loss_or_duplicates(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_worker_sigterm(w, EVENTS)
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()


async def test_a_hanging_handler_times_out_and_its_entry_is_retried(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_handler_hangs(w, EVENTS)
        _, handlings = read_journals(w.journal_dir)
    assert (s.lost, s.duplicated, s.dead_lettered) == (0, 0, 0), s.describe()
    assert s.handled == EVENTS, s.describe()
    retried = [h for h in handlings if h.delivery > 1]
    assert len(retried) == EVENTS // 10, "each hung call's entry was handled on its second delivery"


async def test_a_handler_that_always_raises_ends_in_dead_letters_carrying_the_error(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_handler_raises(w, EVENTS)
        letters = await read_dead_letters(w.client, w.keys)
    assert (s.lost, s.handled, s.dead_lettered) == (0, 0, EVENTS), s.describe()
    assert all(d.error_type == "RuntimeError" and d.error == f"always fails on {d.event_id}" for d in letters)
