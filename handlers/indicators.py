"""Indicators computed incrementally, O(1) work per bar: SMA, EMA, RSI (Wilder), MACD (12/26/9), Bollinger bands.

Each indicator is a msgspec Struct holding exactly what its next value needs (a ring buffer with a running
mean and sum of squared deviations, an exponential average, Wilder's averages), so a symbol's indicators can be
encoded and stored between bars. ``update(close)`` takes the next close and returns the value, or None while
the indicator is warming up. ``handlers.reference`` computes the same numbers the plain way; the tests compare.

Conventions (those of TA-Lib and most charting tools): an EMA of period n is seeded with the SMA of its first n
values, then ``ema += (x - ema) * 2 / (n + 1)``; RSI uses Wilder's smoothing seeded with the simple averages of
the first n gains and losses (RSI is 100 when there are no losses, 50 when the price has not moved); MACD's
signal line is the 9-period EMA of the MACD line, whose values start at the 26th close; Bollinger bands are
the 20-bar SMA plus and minus 2 population standard deviations.

The stage: ``make_indicator_handler`` turns each ``Bar`` of its timeframe into one ``Features`` event holding
every indicator ready at that bar, plus the close (one event per bar, so a strategy needs no join).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import msgspec

from fabric.events import Bar, Features
from handlers.bars import timeframe_ns
from handlers.state import Store, admit, replay

__all__ = [
    "Bollinger", "Ema", "IndicatorState", "Macd", "Rsi", "Sma", "Window", "make_indicator_handler",
    "update_features",
]


class Window(msgspec.Struct):
    """The last ``size`` values in a ring, with their mean and sum of squared deviations (sliding Welford).

    Each push is O(1) and keeps the error near one rounding of the values' size, so the standard deviation of a
    window whose values barely differ is known to about 1e-8 of the price (the square root of that rounding).
    """

    size: int
    values: list[float] = []
    pos: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def full(self) -> bool:
        """True once the window holds ``size`` values."""
        return len(self.values) == self.size

    def push(self, x: float) -> None:
        """Add a value, dropping the oldest once full."""
        if not self.full:
            self.values.append(x)
            delta = x - self.mean
            self.mean += delta / len(self.values)
            self.m2 += delta * (x - self.mean)
            return
        old, self.values[self.pos] = self.values[self.pos], x
        self.pos = (self.pos + 1) % self.size
        mean = self.mean + (x - old) / self.size
        self.m2 += (x - old) * (x - mean + old - self.mean)
        self.mean = mean

    def pstdev(self) -> float:
        """The population standard deviation of the window (rounding can push m2 a hair below 0)."""
        return math.sqrt(max(self.m2, 0.0) / len(self.values))


class Sma(msgspec.Struct):
    """Simple moving average of the last ``period`` values."""

    period: int
    window: Window | None = None

    def update(self, x: float) -> float | None:
        """The SMA including ``x``, or None before ``period`` values."""
        if self.window is None:
            self.window = Window(self.period)
        self.window.push(x)
        return self.window.mean if self.window.full else None


class Ema(msgspec.Struct):
    """Exponential moving average, smoothing ``2 / (period + 1)``, seeded with the SMA of the first values."""

    period: int
    count: int = 0
    value: float = 0.0

    def update(self, x: float) -> float | None:
        """The EMA including ``x``, or None before ``period`` values."""
        if self.count < self.period:
            self.count += 1
            self.value += (x - self.value) / self.count  # the running mean of the seed values
            return self.value if self.count == self.period else None
        self.value += (x - self.value) * 2 / (self.period + 1)
        return self.value


class Rsi(msgspec.Struct):
    """Wilder's relative strength index over ``period`` changes."""

    period: int = 14
    previous: float | None = None
    count: int = 0
    avg_gain: float = 0.0
    avg_loss: float = 0.0

    def update(self, x: float) -> float | None:
        """The RSI including ``x``, or None before ``period + 1`` values."""
        if self.previous is None:
            self.previous = x
            return None
        change, self.previous = x - self.previous, x
        gain, loss = max(change, 0.0), max(-change, 0.0)
        if self.count < self.period:
            self.count += 1
            self.avg_gain += (gain - self.avg_gain) / self.count
            self.avg_loss += (loss - self.avg_loss) / self.count
            if self.count < self.period:
                return None
        else:
            self.avg_gain = (self.avg_gain * (self.period - 1) + gain) / self.period
            self.avg_loss = (self.avg_loss * (self.period - 1) + loss) / self.period
        return rsi(self.avg_gain, self.avg_loss)


def rsi(avg_gain: float, avg_loss: float) -> float:
    """RSI from average gain and loss: 100 with no losses, 50 with no change at all."""
    if avg_loss == 0.0:
        return 50.0 if avg_gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


class Macd(msgspec.Struct):
    """MACD line (fast EMA - slow EMA), its signal line (an EMA of it) and their difference, the histogram."""

    fast: Ema = msgspec.field(default_factory=lambda: Ema(12))
    slow: Ema = msgspec.field(default_factory=lambda: Ema(26))
    signal: Ema = msgspec.field(default_factory=lambda: Ema(9))

    def update(self, x: float) -> tuple[float, float, float] | None:
        """(macd, signal, histogram) including ``x``, or None until the signal line has its first value."""
        fast, slow = self.fast.update(x), self.slow.update(x)
        if fast is None or slow is None:
            return None
        line = fast - slow
        signal = self.signal.update(line)
        return None if signal is None else (line, signal, line - signal)


class Bollinger(msgspec.Struct):
    """Bollinger bands: the ``period`` SMA and ``width`` population standard deviations either side."""

    period: int = 20
    width: float = 2.0
    window: Window | None = None

    def update(self, x: float) -> tuple[float, float, float] | None:
        """(lower, middle, upper) including ``x``, or None before ``period`` values."""
        if self.window is None:
            self.window = Window(self.period)
        self.window.push(x)
        if not self.window.full:
            return None
        mid, spread = self.window.mean, self.width * self.window.pstdev()
        return (mid - spread, mid, mid + spread)


class IndicatorState(msgspec.Struct):
    """One symbol's indicators on one timeframe, the last bar applied and the features it gave."""

    last_seq: int = 0
    sma: Sma = msgspec.field(default_factory=lambda: Sma(20))
    ema: Ema = msgspec.field(default_factory=lambda: Ema(20))
    rsi: Rsi = msgspec.field(default_factory=Rsi)
    macd: Macd = msgspec.field(default_factory=Macd)
    bollinger: Bollinger = msgspec.field(default_factory=Bollinger)
    last_outputs: Features | None = None


def update_features(state: IndicatorState, close: float) -> dict[str, float]:
    """Apply one close to every indicator (in place); return the values that are ready, and the close."""
    values = {"close": close}
    for name, value in (("sma_20", state.sma.update(close)), ("ema_20", state.ema.update(close)),
                        ("rsi_14", state.rsi.update(close))):
        if value is not None:
            values[name] = value
    macd = state.macd.update(close)
    if macd is not None:
        values["macd"], values["macd_signal"], values["macd_hist"] = macd
    bands = state.bollinger.update(close)
    if bands is not None:
        values["bb_lower"], values["bb_mid"], values["bb_upper"] = bands
    return values


def make_indicator_handler(store: Store[IndicatorState],
                           timeframe: str = "1s") -> Callable[[Bar], Awaitable[Features | None]]:
    """The indicator stage: a handler taking a ``Bar`` of ``timeframe`` (others pass) and returning its Features."""
    period_ns = timeframe_ns(timeframe)

    async def indicators(bar: Bar) -> Features | None:
        """Update the symbol's indicators with a bar's close."""
        if bar.timeframe != timeframe:
            return None
        state = await store.get(bar.symbol) or IndicatorState()
        if not admit(state.last_seq, bar.seq, "bar", bar.symbol):
            return replay(state.last_seq, bar.seq, state.last_outputs)
        values = update_features(state, bar.close)
        state.last_seq = bar.seq
        state.last_outputs = Features(symbol=bar.symbol, values=values, timeframe=timeframe,
                                      market_ts_ns=bar.start_ns + period_ns, seq=bar.seq)
        await store.put(bar.symbol, state)
        return state.last_outputs

    return indicators
