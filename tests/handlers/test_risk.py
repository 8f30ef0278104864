import math

import pytest

from fabric.events import Action, Alert, Order, Severity, Side, Signal
from handlers.broker import Costs, make_broker_handler, paper_exchange
from handlers.portfolio import Allocation, Holding, make_portfolio_handler
from handlers.risk import RiskLimits, Sleeve, make_risk_handler
from handlers.state import MemoryStore

pytestmark = pytest.mark.timeout(60)

ALLOCATION = Allocation(initial_cash=20_000.0, symbols=("A", "B"))  # 10,000 a sleeve
COSTS = Costs(slippage_bps=2.0, commission_bps=1.0)


class Signals:
    """Numbered signals for symbol A."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, action: Action, price: float, strength: float = 1.0) -> Signal:
        self.seq += 1
        return Signal(symbol="A", action=action, strength=strength, strategy="s", price=price, seq=self.seq)


def _risk(**limits: float):
    store = MemoryStore(Sleeve)
    return store, make_risk_handler(store, ALLOCATION, RiskLimits(**limits), COSTS)


async def test_a_buy_spends_a_fraction_of_the_sleeve_scaled_by_strength():
    # given a sleeve of 10,000 trading a quarter of equity at full strength
    _, risk = _risk(trade_fraction=0.25)
    signal = Signals()
    # when a buy signal of strength 0.8 comes at 100
    order = await risk(signal(Action.BUY, 100.0, strength=0.8))
    # then it orders the whole shares 2,000 buys at the expected fill price (100 plus 2 bps)
    assert isinstance(order, Order)
    assert (order.side, order.quantity, order.mark_price, order.order_id, order.seq) == (
        Side.BUY, math.floor(2_000 / 100.02), 100.0, "A-1", 1)


async def test_sizing_blocks_a_buy_that_affords_less_than_one_share():
    # given a sleeve of 10,000 trading a quarter of equity
    _, risk = _risk(trade_fraction=0.25)
    # when a buy signal comes at a price above 2,500
    out = await risk(Signals()(Action.BUY, 3_000.0))
    # then there is no order, an INFO alert says why
    assert isinstance(out, Alert)
    assert out.severity is Severity.INFO and "less than one share" in out.message and out.symbol == "A"


async def test_the_exposure_limit_blocks_a_buy_that_would_pass_it():
    # given a sleeve that bought a quarter of its equity, with exposure limited to a quarter
    _, risk = _risk(trade_fraction=0.25, max_exposure=0.25)
    signal = Signals()
    assert isinstance(await risk(signal(Action.BUY, 100.0)), Order)
    # when another buy comes at the same price
    out = await risk(signal(Action.BUY, 100.0))
    # then it is refused with a WARNING naming the exposure limit
    assert isinstance(out, Alert)
    assert out.severity is Severity.WARNING and "25% exposure limit" in out.message


async def test_the_exposure_limit_clips_a_buy_to_the_room_left():
    _, risk = _risk(trade_fraction=0.25, max_exposure=0.3)
    signal = Signals()
    first = await risk(signal(Action.BUY, 100.0))
    second = await risk(signal(Action.BUY, 100.0))
    assert (first.quantity, second.quantity) == (24, 5)


async def test_the_drawdown_limit_stops_buying_but_not_selling():
    # given a sleeve fully invested at 100, with a 5% drawdown limit
    store, risk = _risk(trade_fraction=1.0, max_exposure=1.0, max_drawdown=0.05)
    signal = Signals()
    bought = await risk(signal(Action.BUY, 100.0))
    assert isinstance(bought, Order)
    # when the price falls 10% and a buy signal comes, and then another
    first = await risk(signal(Action.BUY, 90.0))
    again = await risk(signal(Action.BUY, 95.0))
    # then both are refused: a CRITICAL alert the first time, WARNING after, and the sleeve stays halted
    assert isinstance(first, Alert) and first.severity is Severity.CRITICAL and "drawdown limit" in first.message
    assert isinstance(again, Alert) and again.severity is Severity.WARNING
    assert (await store.get("A")).halted
    # and a sell still closes the position
    sold = await risk(signal(Action.SELL, 90.0))
    assert isinstance(sold, Order) and sold.side is Side.SELL and sold.quantity == bought.quantity


async def test_a_sell_with_nothing_held_does_nothing():
    _, risk = _risk()
    assert await risk(Signals()(Action.SELL, 100.0)) is None


async def test_risks_book_agrees_with_the_portfolio_built_from_the_fills():
    # given risk, the paper broker and the portfolio sharing the same costs
    risk_store, risk = _risk(trade_fraction=0.5)
    holdings = MemoryStore(Holding)
    broker, portfolio = make_broker_handler(paper_exchange(COSTS)), make_portfolio_handler(holdings, ALLOCATION)
    signal = Signals()
    # when a round of buys and sells goes through all three
    for action, price in [(Action.BUY, 100.0), (Action.SELL, 103.7), (Action.BUY, 97.3), (Action.SELL, 95.1),
                          (Action.BUY, 99.9)]:
        order = await risk(signal(action, price))
        await portfolio(await broker(order))
    # then risk's sleeve holds exactly the cash and position the portfolio has from the fills
    sleeve, holding = await risk_store.get("A"), await holdings.get("A")
    assert (sleeve.cash, sleeve.quantity) == (holding.cash, holding.quantity)
