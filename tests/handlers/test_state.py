"""RedisStore on a real redis-server and on fakeredis, and the pipeline over it: same portfolio, crash or not."""

import msgspec
import pytest
from redis.crc import key_slot

from fabric.keys import Keys, Priority
from handlers.bars import BarState, OpenBar
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineResult, Stage, contents, run_pipeline
from handlers.risk import Sleeve
from handlers.state import RedisStore, state_key

pytestmark = pytest.mark.timeout(120)

SYMBOLS, TICKS = 3, 1500
STATEFUL = ("bars", "indicators", "strategy", "risk", "portfolio")


def _figures(result: PipelineResult) -> tuple:
    """Everything a run decided, without the envelope fields fabric fills in."""
    return (contents(result.portfolio), {s: contents(u) for s, u in result.sleeves.items()}, result.counts)


def _redis_stores(redis, keys):
    def make(stage, state_type):
        return RedisStore(redis, keys.ns, stage, state_type)
    return make


def test_the_state_key_names_stage_and_symbol_and_shares_the_symbols_slot():
    key = state_key("ns1", "bars", "SYM000")
    assert key == "ns1:state:bars:{SYM000}"
    assert key_slot(key.encode()) == key_slot(Keys("ns1").stream("tick", Priority.NORMAL, "SYM000").encode())


@pytest.mark.parametrize(("stage", "symbol"), [("bars", "a b"), ("bars", ""), ("ba:rs", "SYM000")])
def test_a_state_key_refuses_a_symbol_or_stage_that_would_break_the_layout(stage, symbol):
    with pytest.raises(ValueError, match="invalid"):
        state_key("ns1", stage, symbol)


async def test_a_redis_store_round_trips_a_state(redis, keys):
    # given a bar stage's store, and a state with nested structs and kept outputs
    store = RedisStore(redis, keys.ns, "bars", BarState)
    state = BarState(last_seq=7, open={"1s": OpenBar(start_ns=1, open=2.0, high=3.0, low=1.5, close=2.5,
                                                      volume=10.0, trades=3, published=4)})
    # when nothing was put, then there is no state
    assert await store.get("SYM000") is None
    # when it is put, then it comes back equal, as msgpack under the state key
    await store.put("SYM000", state)
    assert await store.get("SYM000") == state
    assert msgspec.msgpack.decode(await redis.get(state_key(keys.ns, "bars", "SYM000")), type=BarState) == state
    # and other symbols, stages and namespaces do not see it
    assert await store.get("SYM001") is None
    assert await RedisStore(redis, keys.ns, "risk", Sleeve).get("SYM000") is None
    assert await RedisStore(redis, keys.ns + "x", "bars", BarState).get("SYM000") is None


async def test_a_put_replaces_the_state(redis, keys):
    store = RedisStore(redis, keys.ns, "bars", BarState)
    await store.put("SYM000", BarState(last_seq=1))
    await store.put("SYM000", BarState(last_seq=2))
    assert (await store.get("SYM000")).last_seq == 2


async def test_the_pipeline_over_redis_stores_ends_with_the_portfolio_of_memory_stores(redis, keys):
    # given the same ticks
    ticks = list(feed(SYMBOLS, TICKS, seed=11))
    # when they run with in-memory state and with state in Redis
    in_memory = await run_pipeline(ticks, symbols(SYMBOLS))
    in_redis = await run_pipeline(ticks, symbols(SYMBOLS), store=_redis_stores(redis, keys))
    # then both traded and every figure is identical, and the state is in Redis for each stage and symbol
    assert in_memory.counts["fill"] > 5
    assert _figures(in_redis) == _figures(in_memory)
    for stage in STATEFUL:
        assert await redis.exists(*(state_key(keys.ns, stage, s) for s in symbols(SYMBOLS))) == SYMBOLS


def _crash_once(stage_name: str, after: int, crashes: list[str]):
    """Wrap ``stage_name`` so that its ``after``-th call with outputs loses them, as a worker dying after the
    handler saved its state and before the commit, and the event is then delivered again."""
    productive = 0

    def wrap(stage: Stage) -> Stage:
        if stage.name != stage_name:
            return stage

        async def handler(event):
            nonlocal productive
            outputs = await stage.handler(event)
            if outputs:
                productive += 1
                if productive == after:
                    crashes.append(f"{stage_name} {type(event).__name__} {event.symbol} {event.seq}")
                    outputs = await stage.handler(event)  # the redelivery; the first call's outputs are gone
            return outputs

        return Stage(stage.name, stage.takes, handler)

    return wrap


@pytest.mark.parametrize("stage", STATEFUL)
async def test_a_crash_between_saving_state_and_publishing_ends_in_the_clean_runs_portfolio(redis, keys, stage):
    # given a clean run, and one where a stage's state is saved but its outputs are lost once, mid-run
    ticks = list(feed(SYMBOLS, TICKS, seed=11))
    clean = await run_pipeline(ticks, symbols(SYMBOLS))
    crashes: list[str] = []
    crashed = await run_pipeline(ticks, symbols(SYMBOLS), store=_redis_stores(redis, keys),
                                 wrap=_crash_once(stage, 3, crashes))
    # then the crash happened, and the run ended with the clean run's portfolio, sleeves and counts
    assert len(crashes) == 1, crashes
    assert _figures(crashed) == _figures(clean)
