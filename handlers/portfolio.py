"""The portfolio: cash, positions and PnL, kept per symbol sleeve and summed into one total.

The capital is split evenly over the symbols at the start (``Allocation``): one sleeve per symbol, holding that
symbol's cash and position. The portfolio stage applies each symbol's fills in order (``seq``) to its sleeve and
publishes the sleeve as a ``PortfolioUpdate`` with ``symbol`` set. ``combine`` sums the latest update of every
sleeve into the whole portfolio (``symbol`` None); each sum is ``math.fsum``, exact and independent of order,
so the total does not depend on the order in which sleeves were updated.

Accounting: average cost. A fill adding to a position moves its average price; one reducing it realises
``(price - average) x quantity closed`` (sign flipped for a short). ``realized_pnl`` is net of commissions, so
``total_value == initial cash + realized_pnl + unrealized_pnl``. A sleeve marks its position at its last fill
price; ``combine`` can mark at other prices (the last close of each symbol, at the end of a run).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping

import msgspec

from fabric.events import Fill, PortfolioUpdate, Position, Side
from handlers.broker import cash_change
from handlers.state import Store, admit, replay

__all__ = ["Allocation", "Holding", "apply_fill", "combine", "make_portfolio_handler", "sleeve_update"]


class Allocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The starting capital and the symbols it is split over, evenly: one sleeve each."""

    initial_cash: float
    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.symbols or self.initial_cash <= 0:
            raise ValueError("an allocation needs initial_cash above 0 and at least one symbol")

    @property
    def sleeve_cash(self) -> float:
        """Each symbol's share of the starting capital."""
        return self.initial_cash / len(self.symbols)


class Holding(msgspec.Struct):
    """One symbol's sleeve: its cash, position, realized PnL and last price, the last fill applied and the
    update it gave."""

    cash: float
    last_seq: int = 0
    quantity: float = 0.0
    avg_price: float = 0.0
    realized_pnl: float = 0.0
    mark_price: float = 0.0
    last_outputs: PortfolioUpdate | None = None


def apply_fill(h: Holding, fill: Fill) -> None:
    """Apply a fill to a sleeve, in place (average cost; commissions count as realized)."""
    signed = fill.quantity if fill.side is Side.BUY else -fill.quantity
    h.cash += cash_change(fill.side, fill.price, fill.quantity, fill.commission)
    h.realized_pnl -= fill.commission
    before = h.quantity
    if before == 0 or (before > 0) == (signed > 0):
        h.avg_price = (abs(before) * h.avg_price + fill.quantity * fill.price) / (abs(before) + fill.quantity)
    else:
        closed = min(fill.quantity, abs(before))
        h.realized_pnl += closed * (fill.price - h.avg_price) * (1.0 if before > 0 else -1.0)
        if abs(signed) > abs(before):  # flipped through zero: the remainder opens at this price
            h.avg_price = fill.price
    h.quantity = before + signed
    if h.quantity == 0:
        h.avg_price = 0.0
    h.mark_price = fill.price
    h.last_seq = fill.seq


def sleeve_update(symbol: str, h: Holding, *, market_ts_ns: int = 0) -> PortfolioUpdate:
    """The sleeve as a ``PortfolioUpdate`` for ``symbol``, its position marked at its last price."""
    positions = {symbol: Position(quantity=h.quantity, avg_price=h.avg_price, market_price=h.mark_price)}
    return PortfolioUpdate(
        symbol=symbol, cash=h.cash, total_value=h.cash + h.quantity * h.mark_price,
        positions=positions if h.quantity else {}, realized_pnl=h.realized_pnl,
        unrealized_pnl=h.quantity * (h.mark_price - h.avg_price), market_ts_ns=market_ts_ns, seq=h.last_seq,
    )


def make_portfolio_handler(store: Store[Holding],
                           allocation: Allocation) -> Callable[[Fill], Awaitable[PortfolioUpdate | None]]:
    """The portfolio stage: a handler taking a ``Fill`` and returning its sleeve's ``PortfolioUpdate``."""

    async def portfolio(fill: Fill) -> PortfolioUpdate | None:
        """Apply a fill to its symbol's sleeve."""
        h = await store.get(fill.symbol) or Holding(cash=allocation.sleeve_cash)
        if not admit(h.last_seq, fill.seq, "fill", fill.symbol):
            return replay(h.last_seq, fill.seq, h.last_outputs)
        apply_fill(h, fill)
        h.last_outputs = sleeve_update(fill.symbol, h, market_ts_ns=fill.market_ts_ns)
        await store.put(fill.symbol, h)
        return h.last_outputs

    return portfolio


def combine(updates: Iterable[PortfolioUpdate], allocation: Allocation,
            marks: Mapping[str, float] | None = None) -> PortfolioUpdate:
    """The whole portfolio from each sleeve's latest update (highest ``seq``), positions marked at ``marks``
    where given; a symbol with no update holds its starting cash."""
    latest: dict[str, PortfolioUpdate] = {}
    for u in updates:
        if u.symbol is not None and (u.symbol not in latest or u.seq > latest[u.symbol].seq):
            latest[u.symbol] = u
    positions: dict[str, Position] = {}
    for u in latest.values():
        for symbol, p in u.positions.items():
            price = (marks or {}).get(symbol, p.market_price)
            positions[symbol] = Position(quantity=p.quantity, avg_price=p.avg_price, market_price=price)
    sleeves = set(allocation.symbols) | set(latest)
    cash = math.fsum(latest[s].cash if s in latest else allocation.sleeve_cash for s in sleeves)
    return PortfolioUpdate(
        cash=cash,
        total_value=math.fsum([cash, *(p.quantity * p.market_price for p in positions.values())]),
        positions=dict(sorted(positions.items())),
        realized_pnl=math.fsum(u.realized_pnl for u in latest.values()),
        unrealized_pnl=math.fsum(p.quantity * (p.market_price - p.avg_price) for p in positions.values()),
        market_ts_ns=max((u.market_ts_ns for u in latest.values()), default=0),
    )
