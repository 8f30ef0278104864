import asyncio
from typing import Any

import msgspec
import pytest

from fabric import Worker
from fabric.codec import decode_fields
from fabric.errors import Reject, Retry
from fabric.events import Event, Features
from fabric.handler import Context, as_handler
from fabric.testing import run_handler
from handlers.bars import BarState, make_bar_handler
from handlers.broker import Costs, make_broker_handler, paper_exchange
from handlers.feed import symbol_ticks
from handlers.indicators import IndicatorState, make_indicator_handler
from handlers.pipeline import contents
from handlers.portfolio import Allocation, Holding, make_portfolio_handler
from handlers.risk import Sleeve, make_risk_handler
from handlers.state import MemoryStore, OutOfOrder
from handlers.strategy import StrategyState, make_strategy_handler
from tests.contract.test_worker import GROUP, config, publish
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.timeout(60)

ALLOCATION = Allocation(initial_cash=100_000.0, symbols=("SYM000",))
STATEFUL = [
    ("bars", BarState, lambda store: make_bar_handler(store, ("1s",))),
    ("indicators", IndicatorState, lambda store: make_indicator_handler(store, "1s")),
    ("strategy", StrategyState, make_strategy_handler),
    ("risk", Sleeve, lambda store: make_risk_handler(store, ALLOCATION)),
    ("portfolio", Holding, lambda store: make_portfolio_handler(store, ALLOCATION)),
]


def _flat(out: Event | list[Event] | None) -> list[Event]:
    return [] if out is None else out if isinstance(out, list) else [out]


async def _inputs() -> dict[str, list[Event]]:
    """Each stage's input events for one symbol, made by running the stages in turn."""
    inputs: dict[str, list[Event]] = {"bars": list(symbol_ticks("SYM000", 3000, seed=2))}
    broker = make_broker_handler(paper_exchange(Costs()))
    chain = [(name, make(MemoryStore(state))) for name, state, make in STATEFUL]
    chain.insert(4, ("broker", broker))
    for (name, handler), (next_name, _) in zip(chain, chain[1:], strict=False):
        inputs[next_name] = [o for e in inputs[name] for o in _flat(await handler(e))
                             if type(o).__name__ in {"Bar", "Features", "Signal", "Order", "Fill"}]
    assert len(inputs["portfolio"]) > 5  # enough fills for the redelivery tests to mean something
    return inputs


@pytest.fixture(scope="module")
async def inputs() -> dict[str, list[Event]]:
    return await _inputs()


def _bare(state: msgspec.Struct) -> dict:
    """A state without the outputs it keeps (their envelopes, ids and wall-clock times, differ run to run)."""
    return {k: v for k, v in msgspec.structs.asdict(state).items() if k != "last_outputs"}


@pytest.mark.parametrize(("name", "state_type", "make"), STATEFUL, ids=[s[0] for s in STATEFUL])
async def test_a_redelivered_event_republishes_its_outputs_and_changes_nothing(inputs, name, state_type, make):
    # given a stage's inputs applied once each, and again with every event delivered twice, plus stale repeats
    once_store, twice_store = MemoryStore(state_type), MemoryStore(state_type)
    once, twice = make(once_store), make(twice_store)
    events = inputs[name]
    want = [contents(o) for e in events for o in _flat(await once(e))]
    got = []
    for i, e in enumerate(events):
        first = _flat(await twice(e))
        got += [contents(o) for o in first]
        # when the same event comes again, then its outputs come again: the very same events, ids and all
        assert _flat(await twice(e)) == first
        # and when an older one comes again, nothing does
        if i > 0:
            assert await twice(events[i // 2]) is None
    # then the outputs and the final state are those of delivering each event once
    assert got == want
    assert _bare(await twice_store.get("SYM000")) == _bare(await once_store.get("SYM000"))


@pytest.mark.parametrize(("name", "state_type", "make"), STATEFUL, ids=[s[0] for s in STATEFUL])
async def test_outputs_lost_in_a_crash_are_published_when_the_event_is_redelivered(inputs, name, state_type, make):
    # given a stage with outputs for its third productive event, and a clean run's outputs for comparison
    clean, crashed = make(MemoryStore(state_type)), make(MemoryStore(state_type))
    events, productive = inputs[name], 0
    for e in events:
        want = _flat(await clean(e))
        if not want:
            assert _flat(await crashed(e)) == []
            continue
        productive += 1
        if productive < 3:
            await crashed(e)
            continue
        # when the stage applies it and the worker dies before publishing the outputs (the call's result is lost)
        await crashed(e)
        # then the redelivered event publishes the same outputs, and the next events go on as in the clean run
        assert [contents(o) for o in _flat(await crashed(e))] == [contents(o) for o in want]
        break
    else:
        pytest.fail(f"{name}: fewer than 3 of {len(events)} events had outputs")
    rest = events[events.index(e) + 1:]
    assert [contents(o) for r in rest for o in _flat(await crashed(r))] == \
        [contents(o) for r in rest for o in _flat(await clean(r))]


@pytest.mark.parametrize(("name", "state_type", "make"), STATEFUL, ids=[s[0] for s in STATEFUL])
async def test_an_event_ahead_of_its_predecessor_is_retried_and_applied_in_order(inputs, name, state_type, make):
    # given a stage that has applied its first event
    store = MemoryStore(state_type)
    handler = make(store)
    first, second, third = inputs[name][:3]
    await handler(first)
    before = await store.get("SYM000")
    # when the third arrives before the second, then it is sent back for later, changing nothing
    with pytest.raises(OutOfOrder) as raised:
        await handler(third)
    assert isinstance(raised.value, Retry) and raised.value.after_ms > 0
    assert f" {third.seq} for SYM000 arrived before " in raised.value.reason
    assert await store.get("SYM000") == before
    # and once the second is applied, the third is too
    await handler(second)
    await handler(third)
    assert (await store.get("SYM000")).last_seq == third.seq


@pytest.mark.parametrize(("name", "state_type", "make"), STATEFUL, ids=[s[0] for s in STATEFUL])
async def test_an_unnumbered_event_is_rejected_with_the_fix(inputs, name, state_type, make):
    handler = make(MemoryStore(state_type))
    unnumbered = msgspec.structs.replace(inputs[name][0], seq=0)
    with pytest.raises(Reject, match=r"has no seq: number each symbol's"):
        await handler(unnumbered)


async def test_a_stage_runs_under_fabrics_handler_contract(inputs):
    # given the bar stage called as a fabric worker calls a handler
    handler = make_bar_handler(MemoryStore(BarState), ("1s",))
    outputs = []
    for tick in inputs["bars"][:40]:
        outputs += await run_handler(handler, tick, name="handlers.bars")
    # then its bars come out stamped with the tick that closed them
    assert outputs and all(o.producer == "handlers.bars" and o.causation_id for o in outputs)


async def _committed(redis: Any, stream: str) -> list[bytes]:
    """The contents of the outputs committed to ``stream``, in order."""
    return [contents(decode_fields(fields)) for _, fields in await redis.xrange(stream)]


async def _holds(redis: Any, stream: str, n: int) -> bool:
    return len(await redis.xrange(stream)) >= n


async def _all_committed(redis: Any, stream: str) -> bool:
    return int((await redis.xpending(stream, GROUP))["pending"]) == 0


@pytest.mark.real_only
async def test_outputs_of_two_events_applied_before_a_crash_both_come_back(redis, keys, inputs):
    # given the indicator stage run by an ordered worker (as config/pipeline.toml runs it: one owner per symbol
    # stream, each entry committed before the next is handed over), and the outputs of its first two bars
    # alone; a stage keeps only the last applied event's outputs, so this is what lets no output be lost
    clean = make_indicator_handler(MemoryStore(IndicatorState), "1s")
    bars = inputs["indicators"][:2]
    want = [[contents(o) for o in _flat(await clean(b))] for b in bars]
    assert all(want), "both bars must have outputs"
    store = MemoryStore(IndicatorState)
    handler = make_indicator_handler(store, "1s")
    bar_stream = keys.stream("bar", bars[0].default_priority, "SYM000")
    out_stream = keys.stream("features", Features.default_priority, "SYM000")
    applied: list[int] = []
    handed: list[str] = []
    at_second: list[list[bytes]] = []
    dead = asyncio.Event()

    async def dies_after_applying_the_second(event: Event, ctx: Context) -> Event | list[Event] | None:
        if handed:  # the second bar: what of the first's was committed when it was handed over
            pending = await redis.xpending_range(bar_stream, GROUP, handed[0], handed[0], 1)
            at_second.append(await _committed(redis, out_stream) if not pending else [])
        handed.append(ctx.entry_id)
        outputs = await handler(event)
        applied.append(event.seq)
        if len(applied) == 2:
            await dead.wait()  # the worker dies here: the second bar is applied, its outputs are never published
        return outputs

    async def survivor(event: Event, ctx: Context) -> Event | list[Event] | None:
        return await handler(event)

    ordered = {"topics": ["bar"], "ordered": True, "commit_ahead": 0, "lease_ms": 600, "grace_s": 0.1}
    await publish(redis, keys, bars)
    # when the worker applies both bars and dies before committing the second
    first = Worker(redis, as_handler(dies_after_applying_the_second, "first"), config(**ordered), keys=keys,
                   handler_name="first")
    async with running(first):
        await eventually(lambda: _true(len(applied) == 2), what="both bars applied")
    # then the first bar was committed, its outputs with it, before the second was handed over
    assert at_second == [want[0]]
    assert await _committed(redis, out_stream) == want[0]
    # and when another worker takes the symbol over, the second's outputs come back: both, once each, in order
    second = Worker(redis, as_handler(survivor, "second"), config(**ordered), keys=keys, handler_name="second")
    async with running(second):
        await eventually(lambda: _holds(redis, out_stream, len(want[0]) + len(want[1])), what="both bars' outputs")
        await eventually(lambda: _all_committed(redis, bar_stream), what="the second bar committed")
    assert await _committed(redis, out_stream) == want[0] + want[1]
    assert applied == [bars[0].seq, bars[1].seq]


async def _true(value: bool) -> bool:
    return value
