"""Risk: size each buy as a fraction of equity, cap exposure, stop buying past a drawdown; an order or an alert.

Why sleeves. The final portfolio must be the same on every run, however the pipeline's workers interleave
symbols. So no decision may depend on another symbol: the capital is split evenly over the symbols at the start
(``Allocation``), and each symbol's sleeve has its own cash, position, peak equity and drawdown. A sleeve's
decisions are a function of its own signals, in their order (``seq``); the portfolio's totals are sums of the
sleeves, and sums commute. Across symbols, then, processing order cannot change anything: not which orders
are made, nor their sizes, nor the final figures. A limit on the whole portfolio's exposure would depend on
which symbol got there first, and is therefore left out on purpose.

The sleeve here is risk's own book, updated as each order is made, on the assumption that it fills in full at
the broker's price (``Costs``, the paper broker's): the fills then agree with it to the cent, and risk needs
no second input whose arrival order against the signals would vary from run to run. (With a real broker, fills
would become that second input.)

The rules, per sleeve, equity marked at the signal's price:

- a BUY spends ``trade_fraction x strength x equity``, clipped so the position stays within
  ``max_exposure x equity`` and the cash suffices; less than one share: no order, an Alert (INFO when sizing
  is the reason, WARNING when exposure or cash is);
- once equity falls ``max_drawdown`` below its peak, the sleeve stops buying for good (a CRITICAL Alert the
  first time, WARNING after);
- a SELL closes the position; with no position there is nothing to do.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec

from fabric.events import Action, Alert, Order, Severity, Side, Signal
from handlers.broker import Costs, cash_change
from handlers.portfolio import Allocation
from handlers.state import Store, admit, replay

__all__ = ["RiskLimits", "Sleeve", "make_risk_handler"]

Decision = Order | Alert | None


class RiskLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-sleeve limits, as fractions of the sleeve's equity."""

    trade_fraction: float = 0.25
    max_exposure: float = 0.8
    max_drawdown: float = 0.05


class Sleeve(msgspec.Struct):
    """One symbol's risk book: cash, position, peak equity, whether buying stopped, orders made, and the order
    or alert (or None) the last signal gave."""

    cash: float
    peak_equity: float
    last_seq: int = 0
    quantity: float = 0.0
    halted: bool = False
    orders: int = 0
    last_outputs: Order | Alert | None = None


def _alert(signal: Signal, severity: Severity, why: str) -> Alert:
    return Alert(symbol=signal.symbol, severity=severity, source="risk",
                 message=f"{signal.symbol} {signal.action.value} signal {signal.seq} rejected: {why}")


class _Risk:
    """The rules, over one sleeve at a time."""

    def __init__(self, limits: RiskLimits, costs: Costs) -> None:
        self.limits = limits
        self.costs = costs

    def decide(self, s: Sleeve, signal: Signal) -> Decision:
        equity = s.cash + s.quantity * signal.price
        s.peak_equity = max(s.peak_equity, equity)
        if signal.action is Action.SELL:
            return self.order(s, signal, Side.SELL, s.quantity) if s.quantity > 0 else None
        if signal.action is not Action.BUY:
            return None
        if s.halted or equity < s.peak_equity * (1 - self.limits.max_drawdown):
            first, s.halted = not s.halted, True
            return _alert(signal, Severity.CRITICAL if first else Severity.WARNING,
                          f"the sleeve is {1 - equity / s.peak_equity:.1%} below its peak equity, past the "
                          f"{self.limits.max_drawdown:.1%} drawdown limit: buying stopped")
        return self.buy(s, signal, equity)

    def buy(self, s: Sleeve, signal: Signal, equity: float) -> Decision:
        price = self.costs.fill_price(Side.BUY, signal.price)
        budget = self.limits.trade_fraction * signal.strength * equity
        room = self.limits.max_exposure * equity - s.quantity * signal.price
        affordable = s.cash / (1 + self.costs.commission_bps / 10_000)
        # a float, as Order.quantity is: an int would come back from the stored state as a float, so a replayed
        # order would differ from the original
        quantity = float(math.floor(min(budget, room, affordable) / price))
        if quantity >= 1:
            return self.order(s, signal, Side.BUY, quantity)
        if budget < price:
            return _alert(signal, Severity.INFO, f"{budget:.2f} to spend buys less than one share at {price:.2f}")
        if room < price:
            return _alert(signal, Severity.WARNING, f"the position is at the {self.limits.max_exposure:.0%} "
                                                    "exposure limit")
        return _alert(signal, Severity.WARNING, f"cash {s.cash:.2f} buys less than one share at {price:.2f}")

    def order(self, s: Sleeve, signal: Signal, side: Side, quantity: float) -> Order:
        """Make the order and book its expected fill in the sleeve."""
        price = self.costs.fill_price(side, signal.price)
        s.cash += cash_change(side, price, quantity, self.costs.commission(price, quantity))
        s.quantity += quantity if side is Side.BUY else -quantity
        s.orders += 1
        return Order(symbol=signal.symbol, order_id=f"{signal.symbol}-{s.orders}", side=side, quantity=quantity,
                     strategy=signal.strategy, mark_price=signal.price, market_ts_ns=signal.market_ts_ns,
                     seq=s.orders)


def make_risk_handler(store: Store[Sleeve], allocation: Allocation, limits: RiskLimits | None = None,
                      costs: Costs | None = None) -> Callable[[Signal], Awaitable[Decision]]:
    """The risk stage: a handler taking a ``Signal`` and returning an ``Order``, an ``Alert`` or None."""
    rules = _Risk(limits or RiskLimits(), costs or Costs())

    async def risk(signal: Signal) -> Decision:
        """Check a signal against its symbol's sleeve."""
        s = await store.get(signal.symbol) or Sleeve(cash=allocation.sleeve_cash, peak_equity=allocation.sleeve_cash)
        if not admit(s.last_seq, signal.seq, "signal", signal.symbol):
            return replay(s.last_seq, signal.seq, s.last_outputs)
        decision = s.last_outputs = rules.decide(s, signal)
        s.last_seq = signal.seq
        await store.put(signal.symbol, s)
        return decision

    return risk
