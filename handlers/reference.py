"""The indicators of ``handlers.indicators`` computed the plain way, over a whole series, for the tests to compare.

Each function takes the closes and returns one value per close (None while warming up), recomputing every
window from scratch: slow, and obviously right. The conventions are those of ``handlers.indicators``.
"""

from __future__ import annotations

import statistics

__all__ = ["bollinger", "ema", "macd", "rsi", "sma"]

Series = list[float | None]


def sma(closes: list[float], period: int) -> Series:
    """Mean of each full window of ``period`` closes."""
    return [None if i + 1 < period else statistics.fmean(closes[i + 1 - period:i + 1]) for i in range(len(closes))]


def ema(closes: list[float], period: int) -> Series:
    """EMA seeded with the mean of the first ``period`` closes."""
    out: Series = [None] * len(closes)
    if len(closes) < period:
        return out
    value = statistics.fmean(closes[:period])
    out[period - 1] = value
    for i in range(period, len(closes)):
        value = value + (closes[i] - value) * 2 / (period + 1)
        out[i] = value
    return out


def rsi(closes: list[float], period: int = 14) -> Series:
    """Wilder's RSI: simple averages of the first ``period`` gains and losses, then Wilder's smoothing."""
    out: Series = [None] * len(closes)
    changes = [b - a for a, b in zip(closes, closes[1:], strict=False)]
    if len(changes) < period:
        return out
    gain = statistics.fmean(max(c, 0.0) for c in changes[:period])
    loss = statistics.fmean(max(-c, 0.0) for c in changes[:period])
    out[period] = _rsi(gain, loss)
    for i in range(period, len(changes)):
        gain = (gain * (period - 1) + max(changes[i], 0.0)) / period
        loss = (loss * (period - 1) + max(-changes[i], 0.0)) / period
        out[i + 1] = _rsi(gain, loss)
    return out


def _rsi(gain: float, loss: float) -> float:
    if loss == 0.0:
        return 50.0 if gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + gain / loss)


Triples = list[tuple[float, float, float] | None]


def macd(closes: list[float], fast: int = 12, slow: int = 26, signal: int = 9) -> Triples:
    """(macd, signal, histogram) per close: the signal is the EMA of the MACD line from its first value on."""
    fast_ema, slow_ema = ema(closes, fast), ema(closes, slow)
    line = [f - s for f, s in zip(fast_ema, slow_ema, strict=True) if f is not None and s is not None]
    signal_line = ema(line, signal)
    out: Triples = [None] * len(closes)
    offset = len(closes) - len(line)
    for i, (m, s) in enumerate(zip(line, signal_line, strict=True)):
        if s is not None:
            out[offset + i] = (m, s, m - s)
    return out


def bollinger(closes: list[float], period: int = 20, width: float = 2.0) -> Triples:
    """(lower, middle, upper) per close: the window's mean and ``width`` population standard deviations."""
    out: Triples = [None] * len(closes)
    for i in range(period - 1, len(closes)):
        window = closes[i + 1 - period:i + 1]
        mid, spread = statistics.fmean(window), width * statistics.pstdev(window)
        out[i] = (mid - spread, mid, mid + spread)
    return out
