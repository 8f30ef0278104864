"""A momentum strategy: buy when the MACD histogram turns up with RSI not overbought, sell when it turns down.

Long only, one position per symbol. On each symbol's ``Features`` (one per bar):

- flat, the histogram crosses above zero and RSI is below ``rsi_overbought``: BUY;
- long, the histogram crosses below zero or RSI passes ``rsi_exit``: SELL.

A signal's strength is half for the crossing and half for how decisively the histogram crossed, measured in
the Bollinger band's standard deviation and capped at 1: ``0.5 + 0.5 * min(1, |hist| / sigma)``. The
strategy tracks the position it asked for, not the one it got (risk may refuse a buy; a later sell of nothing
is then dropped by risk), so it depends on nothing but its own symbol's features, in order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from fabric.events import Action, Features, Signal
from handlers.state import Store, admit, replay

__all__ = ["StrategyParams", "StrategyState", "decide", "make_strategy_handler"]


class StrategyParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The strategy's thresholds."""

    name: str = "macd_rsi"
    rsi_overbought: float = 70.0
    rsi_exit: float = 80.0


class StrategyState(msgspec.Struct):
    """One symbol's strategy state: the previous histogram, the position asked for, signals sent, and the
    signal (or None) the last features gave."""

    last_seq: int = 0
    previous_hist: float | None = None
    long: bool = False
    signals: int = 0
    last_outputs: Signal | None = None


def decide(state: StrategyState, values: dict[str, float], params: StrategyParams) -> tuple[Action, float] | None:
    """The action and strength for one bar's features, or None; updates ``state`` in place."""
    hist, rsi = values.get("macd_hist"), values.get("rsi_14")
    lower, upper = values.get("bb_lower"), values.get("bb_upper")
    previous, state.previous_hist = state.previous_hist, hist
    if hist is None or rsi is None or lower is None or upper is None or previous is None:
        return None
    sigma = (upper - lower) / 4  # the bands are 2 sigma either side
    strength = 0.5 + 0.5 * (min(1.0, abs(hist) / sigma) if sigma > 0 else 1.0)
    if not state.long and previous <= 0 < hist and rsi < params.rsi_overbought:
        state.long = True
        return Action.BUY, strength
    if state.long and (hist < 0 <= previous or rsi > params.rsi_exit):
        state.long = False
        return Action.SELL, strength
    return None


def make_strategy_handler(store: Store[StrategyState],
                          params: StrategyParams | None = None) -> Callable[[Features], Awaitable[Signal | None]]:
    """The strategy stage: a handler taking a bar's ``Features`` and returning a ``Signal`` when it acts."""
    p = params or StrategyParams()

    async def strategy(features: Features) -> Signal | None:
        """Decide on one bar's features."""
        state = await store.get(features.symbol) or StrategyState()
        if not admit(state.last_seq, features.seq, "features", features.symbol):
            return replay(state.last_seq, features.seq, state.last_outputs)
        decision = decide(state, features.values, p)
        state.last_seq = features.seq
        signal = None
        if decision is not None:
            state.signals += 1
            action, strength = decision
            signal = Signal(symbol=features.symbol, action=action, strength=strength, strategy=p.name,
                            price=features.values["close"], market_ts_ns=features.market_ts_ns, seq=state.signals)
        state.last_outputs = signal
        await store.put(features.symbol, state)
        return signal

    return strategy
