"""Bars: ticks aggregated by market time, and bars read from a CSV file; both feed the same downstream code.

Aggregation. A tick belongs to the bar of its timeframe (``1s``, ``1m``) that contains its ``market_ts_ns``,
intervals aligned to the Unix epoch. A bar's price is the tick's mid; quotes carry no traded volume, so a
bar's ``volume`` sums the quoted size at the touch (the mean of bid and ask size) and ``trades`` counts ticks.
A bar is published when the first tick of a later interval arrives, so the last bar of a stream stays open
(a later tick, or ``close_bars``, closes it); intervals without ticks have no bar. A tick whose market time is
before its open bar's start (bad data) counts in the open bar. Bars of a symbol and timeframe are numbered
(``seq``) 1, 2, 3, ...; ``Bar.start_ns`` is market time.

CSV. ``read_bars`` reads a file with this header and one bar per line, each symbol's bars in time order::

    symbol,start,open,high,low,close,volume
    ALPHA,2024-03-04T14:30:00Z,101.25,101.40,101.10,101.32,18200

``start`` is the bar's start in ISO-8601 UTC (``Z`` or ``+00:00``); prices and volume are decimal numbers with
``low <= open, close <= high`` and ``volume >= 0``. A malformed line raises ``BarFileError`` naming the file,
line and column. ``data/sample_bars.csv`` holds 3 symbols x 300 one-minute bars (generated, not market data).
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from fabric.events import Bar, Tick, new_event_id
from handlers.feed import stable_event_id
from handlers.state import Store, admit, replay

__all__ = [
    "CSV_COLUMNS", "SAMPLE_BARS", "BarFileError", "BarState", "OpenBar", "add_tick", "close_bars",
    "make_bar_handler", "read_bars", "timeframe_ns",
]

CSV_COLUMNS = ("symbol", "start", "open", "high", "low", "close", "volume")
SAMPLE_BARS = Path(__file__).parent / "data" / "sample_bars.csv"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS_NS = {"s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}


@functools.cache
def timeframe_ns(timeframe: str) -> int:
    """Nanoseconds in a timeframe like ``1s``, ``5m`` or ``1h``."""
    count, unit = timeframe[:-1], timeframe[-1:]
    if not count.isdigit() or int(count) < 1 or unit not in _UNITS_NS:
        raise ValueError(f"timeframe {timeframe!r} is not a count and a unit (s, m, h): use '1s' or '1m'")
    return int(count) * _UNITS_NS[unit]


class OpenBar(msgspec.Struct):
    """A bar still taking ticks, and how many bars of its timeframe were published before it."""

    start_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    trades: int
    published: int


class BarState(msgspec.Struct):
    """One symbol's aggregation: the last tick applied, an open bar per timeframe, the bars the last tick closed."""

    last_seq: int = 0
    open: dict[str, OpenBar] = {}
    last_outputs: list[Bar] = []


def _to_bar(symbol: str, timeframe: str, b: OpenBar) -> Bar:
    return Bar(symbol=symbol, timeframe=timeframe, start_ns=b.start_ns, open=b.open, high=b.high, low=b.low,
               close=b.close, volume=b.volume, trades=b.trades, seq=b.published + 1)


def add_tick(state: BarState, tick: Tick, timeframes: tuple[str, ...]) -> list[Bar]:
    """Apply one tick to ``state`` (in place); return the bars it closed."""
    mid = (tick.bid + tick.ask) / 2
    size = (tick.bid_size + tick.ask_size) / 2
    closed: list[Bar] = []
    for tf in timeframes:
        start = tick.market_ts_ns - tick.market_ts_ns % timeframe_ns(tf)
        b = state.open.get(tf)
        if b is None or start > b.start_ns:
            published = 0 if b is None else b.published + 1
            if b is not None:
                closed.append(_to_bar(tick.symbol, tf, b))
            b = state.open[tf] = OpenBar(start_ns=start, open=mid, high=mid, low=mid, close=mid, volume=0.0,
                                         trades=0, published=published)
        b.high, b.low, b.close = max(b.high, mid), min(b.low, mid), mid
        b.volume += size
        b.trades += 1
    state.last_seq = tick.seq
    return closed


def close_bars(state: BarState, symbol: str) -> list[Bar]:
    """The open bars of a finished stream, for a caller that knows no more ticks will come."""
    return [_to_bar(symbol, tf, b) for tf, b in sorted(state.open.items())]


def make_bar_handler(store: Store[BarState],
                     timeframes: tuple[str, ...] = ("1s",)) -> Callable[[Tick], Awaitable[list[Bar] | None]]:
    """The bar stage: a handler taking a ``Tick`` and returning the bars it closed."""
    for tf in timeframes:
        timeframe_ns(tf)  # a bad timeframe fails here, not on the first tick

    async def bars(tick: Tick) -> list[Bar] | None:
        """Aggregate a tick into its symbol's bars."""
        state = await store.get(tick.symbol) or BarState()
        if not admit(state.last_seq, tick.seq, "tick", tick.symbol):
            return replay(state.last_seq, tick.seq, state.last_outputs) or None
        closed = state.last_outputs = add_tick(state, tick, timeframes)
        await store.put(tick.symbol, state)
        return closed or None

    return bars


class BarFileError(ValueError):
    """A bar file's line cannot be read; the message names the file, line and column."""


def _number(path: Path, line: int, row: dict[str, str], column: str) -> float:
    text = row[column]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BarFileError(f"{path}:{line}: column {column!r}: {text!r} is not a finite number")
    return value


def _start_ns(path: Path, line: int, text: str) -> int:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.utcoffset() != timedelta(0):
        raise BarFileError(f"{path}:{line}: column 'start': {text!r} is not an ISO-8601 UTC time "
                           "(write it like 2024-03-04T14:30:00Z)")
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


def _parse(path: Path, line: int, row: dict[str, str], timeframe: str, seq: int, stable_ids: bool) -> Bar:
    """One CSV row as a Bar; ``seq`` is its position in its symbol's sequence."""
    symbol = row["symbol"].strip()
    if not symbol:
        raise BarFileError(f"{path}:{line}: column 'symbol' is empty")
    start = _start_ns(path, line, row["start"].strip())
    o, h, lo, c, v = (_number(path, line, row, col) for col in CSV_COLUMNS[2:])
    if not lo <= min(o, c) <= max(o, c) <= h:
        raise BarFileError(f"{path}:{line}: columns 'low'..'high': need low <= open, close <= high, "
                           f"got open {o}, high {h}, low {lo}, close {c}")
    if v < 0:
        raise BarFileError(f"{path}:{line}: column 'volume': {row['volume']!r} is negative")
    event_id = stable_event_id(start, symbol, timeframe, seq) if stable_ids else new_event_id()
    return Bar(event_id=event_id, symbol=symbol, timeframe=timeframe, start_ns=start, open=o, high=h, low=lo,
               close=c, volume=v, seq=seq)


def read_bars(path: Path | str, timeframe: str = "1m", *, stable_ids: bool = False) -> Iterator[Bar]:
    """The bars of a CSV file, in file order, numbered per symbol; ``BarFileError`` on a malformed line."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(c.strip() for c in header) != CSV_COLUMNS:
            raise BarFileError(f"{path}:1: the header must be {','.join(CSV_COLUMNS)}, got {header!r}")
        last: dict[str, tuple[int, int]] = {}  # symbol -> (seq, start_ns) of its previous bar
        for fields in reader:
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != len(CSV_COLUMNS):
                raise BarFileError(f"{path}:{line}: expected {len(CSV_COLUMNS)} columns "
                                   f"({','.join(CSV_COLUMNS)}), got {len(fields)}")
            row = dict(zip(CSV_COLUMNS, fields, strict=True))
            seq, previous_ns = last.get(row["symbol"].strip(), (0, -1))
            bar = _parse(path, line, row, timeframe, seq + 1, stable_ids)
            if bar.start_ns <= previous_ns:
                raise BarFileError(f"{path}:{line}: column 'start': {row['start']!r} is not after the previous "
                                   f"bar of {bar.symbol}: each symbol's bars must be in time order")
            last[bar.symbol] = (bar.seq, bar.start_ns)
            yield bar
