"""The handler timeout: ``Deadlines``, a watchdog that cancels a task busy on the same call for longer than the
limit, and the ``timeout`` middleware built on it.

These call the wrapped handler directly, in a task of its own (as a worker's dispatcher does); what a worker
makes of a timed-out call (retry, dead letter) is in ``tests/contract/test_worker.py`` and, in the ordered mode,
``tests/test_ordered.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from fabric.events import Event, Tick
from fabric.handler import Context, Deadlines, HandlerFn, as_handler, current_task, timeout

LIMIT_S = 0.05
DEADLINE_S = 10.0
"""Fail instead of hanging when a call never ends."""

T = TypeVar("T")

CTX = Context(stream="s", topic="tick", priority="normal", symbol="A", entry_id="1-0", delivery_count=1,
              group="g", consumer="c")


def tick() -> Tick:
    return Tick(symbol="A", bid=1.0, ask=2.0)


def guarded(fn: object, seconds: float = LIMIT_S) -> HandlerFn:
    return timeout(seconds)(as_handler(fn))  # type: ignore[arg-type]


async def ended(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a task of its own, as a dispatcher runs handlers; fail (without cancelling it, which would
    look like a timeout) if it has not ended within ``DEADLINE_S``."""
    task = asyncio.create_task(coro)
    await asyncio.wait({task}, timeout=DEADLINE_S)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AssertionError(f"the call did not end within {DEADLINE_S}s")
    return task.result()


async def call(handler: HandlerFn) -> list[Event]:
    """One handler call, run as a dispatcher would."""
    return await ended(handler(tick(), CTX))


async def test_a_call_past_its_limit_fails_with_timeout_error():
    # given a handler that waits for something that never happens, under a 50 ms limit
    async def hang(event: Event) -> None:
        await asyncio.Event().wait()

    # when it is called, then the call fails with TimeoutError naming the limit
    with pytest.raises(TimeoutError, match="longer than its 0.05 s timeout"):
        await call(guarded(hang))


async def test_a_call_that_finishes_in_time_returns_its_outputs():
    # given a handler that yields to the loop a few times and returns an event, under a generous limit
    out = tick()

    async def quick(event: Event) -> Tick:
        for _ in range(3):
            await asyncio.sleep(0)
        return out

    # when it is called, then its outputs come back untouched
    assert await call(guarded(quick, seconds=30)) == [out]


async def test_a_call_that_swallows_the_cancellation_and_returns_keeps_its_result():
    # given a handler that catches the timeout's cancellation and returns an event anyway
    out = tick()
    interrupted: list[bool] = []

    async def stubborn(event: Event) -> Tick:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.append(True)
        return out

    # when it runs past its limit
    result = await call(guarded(stubborn))
    # then it was interrupted, and its result stands
    assert interrupted == [True]
    assert result == [out]


async def test_a_timed_out_call_leaves_its_task_not_cancelling():
    # given a task that calls a hanging handler, then goes on with more work
    async def hang(event: Event) -> None:
        await asyncio.Event().wait()

    handler = guarded(hang)

    async def dispatcher() -> tuple[int, bool]:
        with contextlib.suppress(TimeoutError):
            await handler(tick(), CTX)
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        # more work after the timeout: an await and an asyncio.timeout of its own must behave normally
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.sleep(0)
        return cancelling, True

    # when the call times out, then the task is not left cancelling and carries on
    assert await ended(dispatcher()) == (0, True)


async def test_a_task_that_swallowed_the_timeout_is_not_left_cancelling():
    # given a handler that swallows the timeout's cancellation and returns
    async def stubborn(event: Event) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    handler = guarded(stubborn)

    async def dispatcher() -> int:
        await handler(tick(), CTX)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    # when the call ends, then its task has no cancellation left pending
    assert await ended(dispatcher()) == 0


async def test_every_call_past_its_limit_times_out_not_only_the_first():
    # given one guarded handler (one shared timer) and three hanging calls in three tasks at once
    async def hang(event: Event) -> None:
        await asyncio.Event().wait()

    handler = guarded(hang)
    # when they run, then each one fails with TimeoutError
    async def three() -> list[BaseException | list[Event]]:
        return await asyncio.gather(*(handler(tick(), CTX) for _ in range(3)), return_exceptions=True)

    outcomes = await ended(three())
    assert [type(o) for o in outcomes] == [TimeoutError] * 3


async def test_a_cancellation_from_outside_stays_a_cancellation():
    # given a hanging call under a long limit
    started = asyncio.Event()

    async def hang(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(guarded(hang, seconds=30)(tick(), CTX))
    await asyncio.wait_for(started.wait(), DEADLINE_S)
    # when someone else cancels its task (a worker stopping at once)
    task.cancel()
    # then the call ends cancelled, not as a timeout
    await asyncio.wait({task}, timeout=DEADLINE_S)
    assert task.cancelled()


async def test_a_cancellation_from_outside_landing_with_the_deadline_stays_a_cancellation():
    # given a hanging call whose awaited future, once the deadline cancels it, triggers a cancel from outside
    # in the same pass of the loop (a worker cancelled at once just as one of its handlers timed out)
    box: list[asyncio.Task[list[Event]]] = []

    async def hang(event: Event) -> None:
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _: box[0].cancel())
        await fut

    task = asyncio.create_task(guarded(hang)(tick(), CTX))
    box.append(task)
    # when both cancellations land
    await asyncio.wait({task}, timeout=DEADLINE_S)
    # then the outer one is kept, as asyncio.timeout keeps it: the task ends cancelled, not with TimeoutError
    assert task.done()
    assert task.cancelled(), f"ended with {task.exception()!r}"


async def test_a_task_making_short_calls_one_after_another_is_never_cancelled_however_long_it_runs():
    # given the watchdog with a 0.2 s limit, and a task whose calls (marked as the worker marks them) each yield
    # to the loop a few times, one after another, for three times the limit
    limit_s = 0.2  # (a call is a few µs: far from the limit even on a loaded machine)
    deadlines = Deadlines(limit_s)

    async def dispatcher() -> tuple[int, bool]:
        watch = deadlines.watch(asyncio.current_task())
        calls = 0
        start = time.monotonic()
        try:
            while time.monotonic() - start < 3 * limit_s:
                watch.calls += 1
                watch.busy = True
                try:
                    for _ in range(3):
                        await asyncio.sleep(0)
                finally:
                    watch.busy = False
                calls += 1
        finally:
            deadlines.forget(watch)
        return calls, deadlines.watching(asyncio.current_task()) is None

    # when it runs, then none of its calls was cancelled (the watchdog found it busy, on another call each time),
    # and its watch is forgotten
    calls, forgotten = await ended(dispatcher())
    assert calls > 0 and forgotten


async def test_a_call_the_watchdog_cancels_is_settled_and_the_next_call_of_the_task_runs_untouched():
    # given the watchdog with a 50 ms limit, and a task whose first call hangs and whose second returns at once
    deadlines = Deadlines(LIMIT_S)

    async def dispatcher() -> list[str]:
        watch = deadlines.watch(asyncio.current_task())
        outcomes = []
        for hangs in (True, False):
            watch.calls += 1
            watch.busy = True
            try:
                try:
                    if hangs:
                        await asyncio.Event().wait()
                    await asyncio.sleep(0)
                finally:
                    watch.busy = False
                    timed_out = watch.expired and watch.settle()
                outcomes.append("returned")
            except asyncio.CancelledError:
                outcomes.append("timed out" if timed_out else "cancelled")
        task = asyncio.current_task()
        assert task is not None
        outcomes.append(f"cancelling {task.cancelling()}")
        deadlines.forget(watch)
        return outcomes

    # when it runs, then the first call was cancelled as a timeout and undone, and the second one returned
    assert await ended(dispatcher()) == ["timed out", "returned", "cancelling 0"]


async def _own_task_found() -> bool:
    """True if the timeout's task lookup names the task it runs in."""
    return current_task() is asyncio.current_task() is not None


def test_the_task_lookup_names_the_running_task_in_each_task_loop_thread_and_fork():
    # given tasks of one loop, a second loop in the same thread, a loop in another thread
    async def three() -> list[bool]:
        return list(await asyncio.gather(*(asyncio.create_task(_own_task_found()) for _ in range(3))))

    assert asyncio.run(three()) == [True] * 3
    assert asyncio.run(_own_task_found())
    elsewhere: list[bool] = []
    thread = threading.Thread(target=lambda: elsewhere.append(asyncio.run(_own_task_found())))
    thread.start()
    thread.join(DEADLINE_S)
    assert elsewhere == [True]

    # and a child forked from inside a task (what this thread's loop was running is copied into the child)
    async def fork_and_wait() -> int:
        assert await _own_task_found()
        pid = os.fork()
        if pid == 0:  # the child: a new loop of its own, and never back into pytest
            found = False
            try:
                found = asyncio.run(_own_task_found())
            finally:
                os._exit(0 if found else 1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    # then each lookup names its own task, in the child too
    assert asyncio.run(fork_and_wait()) == 0
