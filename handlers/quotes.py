"""Quote handlers: what a tick says about the market, as indicators."""

from __future__ import annotations

from fabric.errors import Reject
from fabric.events import Indicator, Tick


async def mid_price(tick: Tick) -> Indicator:
    """The mid price of a tick; a crossed book is bad input, not a reason to retry."""
    if tick.bid > tick.ask:
        raise Reject(f"crossed book: bid {tick.bid} > ask {tick.ask}")
    return Indicator(symbol=tick.symbol, name="mid", value=(tick.bid + tick.ask) / 2)
