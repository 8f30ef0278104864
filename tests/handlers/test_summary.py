"""handlers.summary: a run read back from its events, judged against the single-process run."""

import msgspec
import pytest

from fabric.events import Event, PortfolioUpdate
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineConfig, Stage, contents, run_pipeline
from handlers.portfolio import Allocation
from handlers.summary import latency, tally

pytestmark = pytest.mark.timeout(60)

SYMBOLS, TICKS = 3, 600


async def _run_with_events() -> tuple[dict[str, list[Event]], dict[str, int], PortfolioUpdate]:
    """run_pipeline's result, and every event it made, by topic (as they would sit in the streams)."""
    ticks = list(feed(SYMBOLS, TICKS, seed=7))
    made: dict[str, list[Event]] = {"tick": list(ticks)}

    def recording(stage: Stage) -> Stage:
        async def handler(event):
            outputs = await stage.handler(event)
            for o in [outputs] if isinstance(outputs, Event) else outputs or []:
                made.setdefault(o.default_topic, []).append(o)
            return outputs

        return Stage(stage.name, stage.takes, handler)

    result = await run_pipeline(ticks, symbols(SYMBOLS), wrap=recording)
    return made, result.counts, result.portfolio


async def test_a_replayed_output_counts_once_and_the_portfolio_is_the_single_process_runs():
    # given every event of a run, one portfolio update and one bar written twice (a replay: same data, new envelope)
    events, counts, portfolio = await _run_with_events()
    for topic in ("portfolio_update", "bar"):
        events[topic].append(msgspec.structs.replace(events[topic][0], event_id="f" * 32, ts_ns=1))
    allocation = Allocation(initial_cash=PipelineConfig().initial_cash, symbols=tuple(symbols(SYMBOLS)))
    # when they are tallied
    result = tally(events, counts, allocation, PipelineConfig().timeframe)
    # then each topic counts its distinct events, as the single-process run counted them
    assert {t.topic: t.events for t in result.topics} == counts
    assert all(t.events == t.expected for t in result.topics)
    # and the final portfolio, from the sleeves' latest updates marked at the last closes, is run_pipeline's
    assert contents(result.portfolio) == contents(portfolio)


async def test_a_missing_event_shows_in_its_topics_count():
    events, counts, _ = await _run_with_events()
    events["fill"].pop()
    allocation = Allocation(initial_cash=PipelineConfig().initial_cash, symbols=tuple(symbols(SYMBOLS)))
    row = next(t for t in tally(events, counts, allocation, "1s").topics if t.topic == "fill")
    assert (row.events, row.expected) == (counts["fill"] - 1, counts["fill"])


def test_latency_percentiles_are_nearest_rank_in_milliseconds():
    lat = latency([i * 1_000_000 for i in range(1, 101)])  # 1 .. 100 ms
    assert lat is not None
    assert (lat.count, lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.max_ms) == (100, 50.0, 90.0, 99.0, 100.0)
    assert latency([]) is None
