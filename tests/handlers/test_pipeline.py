import random
from collections import defaultdict, deque

import pytest

from fabric.events import Event
from handlers.bars import SAMPLE_BARS, read_bars
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineConfig, PipelineResult, contents, run_pipeline

pytestmark = pytest.mark.timeout(120)

SYMBOLS, TICKS = 6, 1500


def _interleaved(events: list[Event], seed: int) -> list[Event]:
    """The same per-symbol streams merged in a random cross-symbol order."""
    queues: dict[str, deque[Event]] = defaultdict(deque)
    for e in events:
        queues[e.symbol].append(e)
    rng, out = random.Random(seed), []
    while queues:
        symbol = rng.choice(sorted(queues))
        out.append(queues[symbol].popleft())
        if not queues[symbol]:
            del queues[symbol]
    return out


def _figures(result: PipelineResult) -> tuple:
    """Everything a run decided, without the envelope fields (ids, wall-clock times) fabric fills in."""
    return (contents(result.portfolio), {s: contents(u) for s, u in result.sleeves.items()}, result.counts)


async def _run_feed(ticks: list[Event], seed_symbols: int = SYMBOLS) -> PipelineResult:
    return await run_pipeline(ticks, symbols(seed_symbols))


async def test_the_final_portfolio_is_the_same_on_every_run():
    # given two runs of the pipeline over the same seed and size
    first = await _run_feed(list(feed(SYMBOLS, TICKS, seed=11)))
    second = await _run_feed(list(feed(SYMBOLS, TICKS, seed=11)))
    # then they traded (so the comparison means something) and ended with the same portfolio, sleeves and counts
    assert first.counts["fill"] > 20
    assert _figures(first) == _figures(second)


@pytest.mark.parametrize("order_seed", range(3))
async def test_the_final_portfolio_does_not_depend_on_the_order_across_symbols(order_seed):
    # given the feed in market-time order, and the same per-symbol streams randomly interleaved
    ticks = list(feed(SYMBOLS, TICKS, seed=11))
    shuffled = _interleaved(ticks, order_seed)
    assert [t.symbol for t in shuffled] != [t.symbol for t in ticks]
    # when both run through the pipeline
    in_order, reordered = await _run_feed(ticks), await _run_feed(shuffled)
    # then every figure is identical, to the last bit
    assert _figures(in_order) == _figures(reordered)


async def test_a_different_seed_gives_a_different_portfolio():
    a = await _run_feed(list(feed(SYMBOLS, TICKS, seed=11)))
    b = await _run_feed(list(feed(SYMBOLS, TICKS, seed=12)))
    assert contents(a.portfolio) != contents(b.portfolio)


async def test_every_stage_runs_and_counts_its_events():
    # given a run over the feed
    result = await _run_feed(list(feed(SYMBOLS, TICKS, seed=11)))
    counts = result.counts
    # then every tick was taken, every bar gave features, and every order a fill, an update and two audit entries
    assert counts["tick"] == SYMBOLS * TICKS
    assert counts["bar"] == counts["features"] > 0
    assert counts["signal"] > 0
    assert counts["order"] == counts["fill"] == counts["portfolio_update"] == counts["audit"] // 2 > 0
    # and the books balance: total value is the starting cash plus realized and unrealized PnL
    p = result.portfolio
    assert p.total_value == pytest.approx(PipelineConfig().initial_cash + p.realized_pnl + p.unrealized_pnl)


async def test_outputs_carry_the_chain_back_to_the_tick_that_started_it():
    # given a feed with stable ids
    ticks = list(feed(SYMBOLS, TICKS, seed=11, stable_ids=True))
    ids = {t.event_id: t.symbol for t in ticks}
    # when it runs
    result = await _run_feed(ticks)
    # then each sleeve's latest update names, as correlation id, a tick of its own symbol
    for symbol, update in result.sleeves.items():
        assert ids[update.correlation_id] == symbol
        assert update.producer == "handlers.portfolio"


async def test_bars_from_a_file_go_through_the_same_stages_in_any_cross_symbol_order():
    # given the sample file's one-minute bars, in file order and randomly interleaved
    bars = list(read_bars(SAMPLE_BARS))
    config = PipelineConfig(timeframe="1m")
    names = {b.symbol for b in bars}
    # when both run through the pipeline from the indicator stage on
    in_order = await run_pipeline(bars, names, config)
    reordered = await run_pipeline(_interleaved(bars, 5), names, config)
    # then it traded, and the two runs agree on everything
    assert in_order.counts["bar"] == 900 and in_order.counts["fill"] > 0 and "tick" not in in_order.counts
    assert _figures(in_order) == _figures(reordered)
