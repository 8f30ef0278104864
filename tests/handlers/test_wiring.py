"""handlers.wiring: the stages as fabric worker handlers over Redis, configured from the environment."""

from collections import deque

import pytest

from fabric.client import connect
from fabric.events import Bar, Event, Features, Fill, Order, PortfolioUpdate, Signal, Tick
from fabric.handler import load_handler
from fabric.testing import run_handler
from handlers import wiring
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineConfig, contents, run_pipeline
from handlers.portfolio import Allocation, combine
from handlers.state import state_key

pytestmark = pytest.mark.timeout(120)

SYMBOLS, TICKS = 3, 1500
ROUTES: dict[type[Event], tuple[str, ...]] = {
    Tick: ("bars",), Bar: ("indicators",), Features: ("strategy",), Signal: ("risk",), Order: ("broker", "audit"),
    Fill: ("audit", "portfolio"),
}


@pytest.fixture
async def env(monkeypatch, redis_url, keys):
    """The environment a worker of the pipeline runs in; the built stages are closed afterwards."""
    monkeypatch.setenv("FABRIC_REDIS_URL", redis_url)
    monkeypatch.setenv(wiring.NAMESPACE_ENV, keys.ns)
    monkeypatch.setenv(wiring.SYMBOLS_ENV, ",".join(symbols(SYMBOLS)))
    monkeypatch.delenv(wiring.CONFIG_ENV, raising=False)
    yield keys.ns
    await wiring.close()


async def _through_the_wiring(ticks: list[Tick], restart_at: int) -> PortfolioUpdate:
    """Each tick through the wiring's handlers as workers call them, the stages rebuilt (a restart) once."""
    sleeves: list[PortfolioUpdate] = []
    marks: dict[str, float] = {}
    for i, tick in enumerate(ticks):
        if i == restart_at:
            await wiring.close()
        todo: deque[Event] = deque([tick])
        while todo:
            e = todo.popleft()
            if isinstance(e, PortfolioUpdate):
                sleeves.append(e)
            elif isinstance(e, Bar):
                marks[e.symbol] = e.close
            for name in ROUTES.get(type(e), ()):
                todo.extend(await run_handler(getattr(wiring, name), e, name=f"handlers.wiring:{name}"))
    allocation = Allocation(initial_cash=PipelineConfig().initial_cash, symbols=tuple(symbols(SYMBOLS)))
    return combine(sleeves, allocation, marks)


def test_every_stage_loads_as_a_fabric_worker_handler():
    for name in ("bars", "indicators", "strategy", "risk", "broker", "audit", "portfolio"):
        ref, handler = load_handler(f"handlers.wiring:{name}")
        assert ref == f"handlers.wiring:{name}" and callable(handler)


async def test_the_wiring_restarted_mid_run_ends_with_the_single_process_portfolio(env):
    # given the ticks of a run, and the single-process mode's final portfolio for them
    ticks = list(feed(SYMBOLS, TICKS, seed=11))
    want = (await run_pipeline(ticks, symbols(SYMBOLS))).portfolio
    # when they go through the wiring's handlers, its stages closed and rebuilt from Redis halfway
    got = await _through_the_wiring(ticks, restart_at=len(ticks) // 2)
    # then the portfolio is the same, and each stage's state is in Redis under the namespace from the environment
    assert want.positions or want.realized_pnl
    assert contents(got) == contents(want)
    client = connect()
    try:
        assert await client.exists(*(state_key(env, s, "SYM000") for s in wiring.wiring().stages
                                     if s not in {"broker", "audit"})) == 5
    finally:
        await client.aclose()


async def test_the_pipeline_config_file_is_read_from_the_environment(env, monkeypatch, tmp_path):
    # given a config file choosing one-minute bars
    path = tmp_path / "pipeline.toml"
    path.write_text('timeframe = "1m"\ninitial_cash = 300000.0\n')
    monkeypatch.setenv(wiring.CONFIG_ENV, str(path))
    # when a few minutes of ticks go through the bar stage
    ticks = list(feed(1, 600, seed=3))
    bars = [b for t in ticks for b in await run_handler(wiring.bars, t)]
    # then its bars are one-minute bars
    assert bars and {b.timeframe for b in bars} == {"1m"}


async def test_a_missing_symbol_list_says_how_to_set_it(env, monkeypatch):
    monkeypatch.delenv(wiring.SYMBOLS_ENV)
    with pytest.raises(ValueError, match=r"FABRIC_PIPELINE_SYMBOLS is not set: set it to the pipeline's symbols"):
        await wiring.bars(next(iter(feed(1, 1, seed=1))))


async def test_a_bad_config_file_names_the_variable_and_the_fix(env, monkeypatch, tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('timeframe = "1m"\nunknown_field = 1\n')
    monkeypatch.setenv(wiring.CONFIG_ENV, str(path))
    with pytest.raises(ValueError, match=r"FABRIC_PIPELINE_CONFIG=.*point it at a TOML file of PipelineConfig"):
        await wiring.bars(next(iter(feed(1, 1, seed=1))))
