"""Turns: one holder at a time, handed on only after the event loop went round, in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from fabric.turns import Turns

DEADLINE_S = 5.0
"""Fail instead of hanging when a turn never comes."""


async def _within(step: Awaitable[object]) -> None:
    await asyncio.wait_for(step, DEADLINE_S)


async def _holds_once_taken(turns: Turns, me: str) -> bool:
    """Take the turn and say whether ``me`` holds it right then (later passes of the loop hand it on)."""
    await turns.take(me)
    return turns.holds(me)


async def test_only_one_dispatcher_holds_the_turn_at_a_time():
    # given a counter of the loop's passes, and five dispatchers taking the turn again and again
    turns = Turns()
    loop = asyncio.get_running_loop()
    passes = 0

    def count_pass() -> None:
        nonlocal passes
        passes += 1
        handle[0] = loop.call_soon(count_pass)

    handle = [loop.call_soon(count_pass)]
    names = [f"d{i}" for i in range(5)]
    taken: list[tuple[int, str, list[str]]] = []

    async def dispatcher(me: str) -> None:
        for _ in range(20):
            await turns.take(me)
            taken.append((passes, me, [n for n in names if turns.holds(n)]))
            await asyncio.sleep(0)

    # when they all run
    try:
        await _within(asyncio.gather(*(dispatcher(n) for n in names)))
    finally:
        handle[0].cancel()
    # then each, on getting the turn, held it alone, and no two got it in the same pass of the loop
    assert len(taken) == 100
    assert all(holders == [me] for _, me, holders in taken), taken
    assert len({p for p, _, _ in taken}) == 100, taken


async def test_a_waiter_gets_the_turn_only_after_the_loop_went_round():
    # given A taking the free turn, B asking for it in the same pass of the loop, and an observer after both
    turns = Turns()
    log: list[str] = []
    snapshot: list[tuple[bool, bool, list[str]]] = []

    async def taker(me: str) -> None:
        await turns.take(me)
        log.append(me)

    async def observe() -> None:
        snapshot.append((turns.holds("A"), turns.holds("B"), list(log)))

    a = asyncio.create_task(taker("A"))
    b = asyncio.create_task(taker("B"))
    observer = asyncio.create_task(observe())
    # when the loop runs them
    await _within(asyncio.gather(a, b, observer))
    # then within that pass A kept the turn and B was still waiting; B got it only on a later pass
    assert snapshot == [(True, False, ["A"])]
    assert log == ["A", "B"]


async def test_the_holder_keeps_the_turn_while_it_runs_without_yielding():
    # given A waiting behind Z, then B asking after A: when the loop goes round, Z's turn goes to A while B waits
    turns = Turns()
    b_asked: list[bool] = []
    held_throughout: list[bool] = []

    async def a() -> None:
        await turns.take("A")
        # when A runs on without giving the loop a chance (a handler that never waits)
        for _ in range(1000):
            held_throughout.append(bool(b_asked) and turns.holds("A") and not turns.holds("B") and not b.done())

    async def ask_b() -> None:
        b_asked.append(True)
        await turns.take("B")

    a_task = asyncio.create_task(a())
    await turns.take("Z")
    b = asyncio.create_task(ask_b())
    await _within(asyncio.gather(a_task, b))
    # then A held the turn all along with B waiting, and B got it only afterwards
    assert len(held_throughout) == 1000 and all(held_throughout)


async def test_the_turn_is_handed_on_without_an_explicit_release():
    # given A holding the turn and B waiting for it
    turns = Turns()
    seen: list[tuple[bool, bool]] = []

    async def b() -> None:
        await turns.take("B")
        seen.append((turns.holds("B"), turns.holds("A")))

    waiter = asyncio.create_task(b())
    await turns.take("A")
    # when A only yields to the loop (as a handler waiting on I/O does), never releasing anything
    await _within(waiter)
    # then B got the turn, and A no longer had it
    assert seen == [(True, False)]


async def test_a_waiter_cancelled_before_its_turn_does_not_block_the_others():
    # given B and C waiting, in that order, behind A; B is cancelled before the turn is handed on
    turns = Turns()
    served: list[str] = []

    async def taker(me: str) -> None:
        await turns.take(me)
        served.append(me)

    async def cancel_b() -> None:
        b.cancel()

    b = asyncio.create_task(taker("B"))
    c = asyncio.create_task(taker("C"))
    canceller = asyncio.create_task(cancel_b())
    await turns.take("A")
    # when the loop goes round
    await _within(asyncio.gather(c, canceller))
    # then C gets the turn, B never does, and a newcomer still gets one later
    assert b.cancelled()
    assert served == ["C"]
    assert await asyncio.wait_for(_holds_once_taken(turns, "D"), DEADLINE_S)


async def test_a_waiter_cancelled_as_it_is_granted_the_turn_does_not_block_the_others():
    # given A holding the turn, then B and C waiting
    turns = Turns()
    served: list[str] = []

    async def taker(me: str) -> None:
        await turns.take(me)
        served.append(me)

    a = asyncio.create_task(taker("A"))
    b = asyncio.create_task(taker("B"))
    c = asyncio.create_task(taker("C"))

    async def cancel_b_once_granted() -> None:
        while not turns.holds("B"):
            await asyncio.sleep(0)
        b.cancel()  # B has been given the turn but its take has not resumed yet

    # when B is cancelled as the turn reaches it
    await _within(cancel_b_once_granted())
    # then C still gets a turn, and so does a newcomer: nobody stalls behind the cancelled waiter
    await _within(asyncio.gather(a, c))
    with pytest.raises(asyncio.CancelledError):
        await b
    assert served == ["A", "C"]
    assert await asyncio.wait_for(_holds_once_taken(turns, "D"), DEADLINE_S)


async def test_waiters_are_served_in_arrival_order():
    # given four waiters arriving in order behind A
    turns = Turns()
    served: list[str] = []

    async def taker(me: str) -> None:
        await turns.take(me)
        served.append(me)

    names = ["B", "C", "D", "E"]
    tasks = [asyncio.create_task(taker(n)) for n in names]
    await turns.take("A")
    # when the loop goes round until each one was served
    await _within(asyncio.gather(*tasks))
    # then they were served in the order they arrived, one turn each
    assert served == names
