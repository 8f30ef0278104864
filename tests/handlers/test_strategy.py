import pytest

from fabric.events import Action, Features
from handlers.state import MemoryStore
from handlers.strategy import StrategyState, make_strategy_handler

pytestmark = pytest.mark.timeout(60)


class Bars:
    """Numbered features for symbol A: a close, a MACD histogram and RSI, bands 1 either side of the close."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, hist: float, rsi: float = 50.0, close: float = 100.0) -> Features:
        self.seq += 1
        values = {"close": close, "macd_hist": hist, "rsi_14": rsi, "bb_lower": close - 1, "bb_upper": close + 1}
        return Features(symbol="A", values=values, market_ts_ns=self.seq, seq=self.seq)


async def _signals(*features: Features):
    strategy = make_strategy_handler(MemoryStore(StrategyState))
    return [await strategy(f) for f in features]


async def test_buys_when_the_histogram_turns_up_and_sells_when_it_turns_down():
    bar = Bars()
    out = await _signals(bar(-0.2), bar(0.1), bar(0.3), bar(-0.05))
    assert out[0] is None and out[2] is None
    buy, sell = out[1], out[3]
    assert (buy.action, buy.seq, buy.price, buy.market_ts_ns, buy.strategy) == (Action.BUY, 1, 100.0, 2, "macd_rsi")
    assert (sell.action, sell.seq) == (Action.SELL, 2)
    # strength: half for the crossing, half for its size in band sigmas (sigma 0.5 here), capped at 1
    assert buy.strength == pytest.approx(0.5 + 0.5 * 0.1 / 0.5)
    assert sell.strength == pytest.approx(0.5 + 0.5 * 0.05 / 0.5)


async def test_an_overbought_market_is_not_bought():
    bar = Bars()
    assert await _signals(bar(-0.2), bar(0.1, rsi=75.0)) == [None, None]


async def test_a_position_is_sold_when_rsi_passes_the_exit_level():
    bar = Bars()
    out = await _signals(bar(-0.2), bar(0.1), bar(0.2, rsi=85.0))
    assert [s.action for s in out[1:]] == [Action.BUY, Action.SELL]


async def test_nothing_happens_while_indicators_warm_up():
    strategy = make_strategy_handler(MemoryStore(StrategyState))
    out = [await strategy(Features(symbol="A", values={"close": 100.0}, seq=i)) for i in range(1, 30)]
    assert out == [None] * 29
