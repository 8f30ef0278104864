import random

import pytest

from fabric.events import Fill, Position, Side
from handlers.portfolio import Allocation, Holding, apply_fill, combine, make_portfolio_handler, sleeve_update
from handlers.state import MemoryStore

pytestmark = pytest.mark.timeout(60)

ALLOCATION = Allocation(initial_cash=30_000.0, symbols=("A", "B", "C"))  # 10,000 a sleeve


def _fill(seq: int, side: Side, quantity: float, price: float, commission: float = 0.0, symbol: str = "A") -> Fill:
    return Fill(symbol=symbol, order_id=f"{symbol}-{seq}", side=side, price=price, quantity=quantity,
                commission=commission, seq=seq, market_ts_ns=seq * 1000)


async def test_realized_and_unrealized_pnl_over_a_round_trip():
    # given a sleeve of 10,000
    portfolio = make_portfolio_handler(MemoryStore(Holding), ALLOCATION)
    # when it buys 10 at 100 (commission 1)
    bought = await portfolio(_fill(1, Side.BUY, 10, 100.0, 1.0))
    # then the position is held at 100, the commission is realized, nothing is unrealized at the fill price
    assert bought.positions == {"A": Position(quantity=10, avg_price=100.0, market_price=100.0)}
    assert (bought.cash, bought.realized_pnl, bought.unrealized_pnl, bought.total_value) == (8_999.0, -1.0, 0.0,
                                                                                              9_999.0)
    # and marked at 110 the position shows 100 unrealized
    marked = combine([bought], ALLOCATION, {"A": 110.0})
    assert (marked.unrealized_pnl, marked.total_value) == (100.0, 30_099.0)
    # when it sells the 10 at 120 (commission 1.2)
    sold = await portfolio(_fill(2, Side.SELL, 10, 120.0, 1.2))
    # then 200 is realized less both commissions, nothing is held, and the cash is all there is
    assert sold.positions == {}
    assert sold.realized_pnl == pytest.approx(197.8)
    assert (sold.unrealized_pnl, sold.total_value) == (0.0, sold.cash)
    assert sold.cash == pytest.approx(10_197.8)


def test_a_partial_close_realizes_its_part_and_a_flip_opens_at_the_fill_price():
    h = Holding(cash=10_000.0)
    apply_fill(h, _fill(1, Side.BUY, 10, 100.0))
    apply_fill(h, _fill(2, Side.BUY, 10, 110.0))
    assert (h.quantity, h.avg_price) == (20, 105.0)
    apply_fill(h, _fill(3, Side.SELL, 5, 115.0))
    assert (h.quantity, h.avg_price, h.realized_pnl) == (15, 105.0, 50.0)
    apply_fill(h, _fill(4, Side.SELL, 20, 100.0))
    assert (h.quantity, h.avg_price, h.realized_pnl) == (-5, 100.0, 50.0 - 75.0)
    apply_fill(h, _fill(5, Side.BUY, 5, 90.0))
    assert (h.quantity, h.avg_price, h.realized_pnl) == (0, 0.0, -25.0 + 50.0)


@pytest.mark.parametrize("seed", range(5))
def test_total_value_is_initial_cash_plus_realized_and_unrealized_pnl(seed):
    # given random fills, longs and shorts, with commissions
    rng = random.Random(seed)
    h = Holding(cash=10_000.0)
    for seq in range(1, 200):
        apply_fill(h, _fill(seq, rng.choice([Side.BUY, Side.SELL]), rng.randint(1, 50), rng.uniform(50, 150),
                            rng.uniform(0, 2)))
        u = sleeve_update("A", h)
        # then after every fill the books balance
        assert u.total_value == pytest.approx(10_000.0 + u.realized_pnl + u.unrealized_pnl, abs=1e-6)


async def test_the_whole_portfolio_sums_the_latest_update_of_each_sleeve_in_any_order():
    # given updates of sleeves A and B (C never traded)
    portfolio = make_portfolio_handler(MemoryStore(Holding), ALLOCATION)
    updates = [await portfolio(_fill(1, Side.BUY, 10, 100.0, 0.5)),
               await portfolio(_fill(1, Side.BUY, 3, 33.3, 0.1, symbol="B")),
               await portfolio(_fill(2, Side.BUY, 5, 101.0, 0.5)),
               await portfolio(_fill(2, Side.SELL, 3, 35.55, 0.1, symbol="B"))]
    # when they are combined in several orders
    totals = {combine(random.Random(i).sample(updates, len(updates)), ALLOCATION).total_value for i in range(10)}
    whole = combine(updates, ALLOCATION)
    # then the result is the same, from A's and B's latest updates and C's untouched 10,000
    assert totals == {whole.total_value}
    assert whole.cash == pytest.approx(10_000 - 1_000 - 505 - 1.0 + 10_000 - 99.9 + 106.65 - 0.2 + 10_000)
    [(symbol, a)] = whole.positions.items()
    assert (symbol, a.quantity, a.market_price) == ("A", 15, 101.0)
    assert a.avg_price == pytest.approx((10 * 100 + 5 * 101) / 15)
    assert whole.symbol is None
