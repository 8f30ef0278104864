import itertools
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest

from fabric.events import Bar, Tick
from handlers.bars import (
    SAMPLE_BARS,
    BarFileError,
    BarState,
    close_bars,
    make_bar_handler,
    read_bars,
    timeframe_ns,
)
from handlers.feed import feed
from handlers.state import MemoryStore

pytestmark = pytest.mark.timeout(60)

HEADER = "symbol,start,open,high,low,close,volume\n"


def _reference(ticks: list[Tick], timeframe: str) -> list[tuple]:
    """OHLCV per (symbol, interval), grouping all ticks at once."""
    size = timeframe_ns(timeframe)
    groups: dict[tuple[str, int], list[Tick]] = defaultdict(list)
    for t in ticks:
        groups[(t.symbol, t.market_ts_ns // size * size)].append(t)
    out = []
    for (symbol, start), group in sorted(groups.items()):
        mids = [(t.bid + t.ask) / 2 for t in group]
        volume = math.fsum((t.bid_size + t.ask_size) / 2 for t in group)
        out.append((symbol, start, mids[0], max(mids), min(mids), mids[-1], volume, len(group)))
    return out


@pytest.mark.parametrize("timeframe", ["1s", "1m"])
async def test_bars_match_a_reference_grouping_of_the_ticks(timeframe):
    # given a feed's ticks through the bar stage
    ticks = list(feed(3, 600, seed=9))
    store = MemoryStore(BarState)
    handler = make_bar_handler(store, (timeframe,))
    bars: list[Bar] = []
    for t in ticks:
        bars.extend(await handler(t) or [])
    # when the streams end and the open bars are closed
    for symbol in store.symbols():
        bars.extend(close_bars(await store.get(symbol), symbol))
    # then the bars are the reference's OHLCV (mid prices), volume and tick counts
    got = sorted((b.symbol, b.start_ns, b.open, b.high, b.low, b.close, b.volume, b.trades) for b in bars)
    want = _reference(ticks, timeframe)
    assert [g[:6] + (g[7],) for g in got] == [w[:6] + (w[7],) for w in want]
    assert all(math.isclose(g[6], w[6], rel_tol=1e-12) for g, w in zip(got, want, strict=True))
    # and each symbol's bars are numbered 1, 2, 3, ... in time order
    by_symbol: dict[str, list[Bar]] = defaultdict(list)
    for b in sorted(bars, key=lambda b: b.start_ns):
        by_symbol[b.symbol].append(b)
    assert all([b.seq for b in own] == list(range(1, len(own) + 1)) for own in by_symbol.values())


async def test_a_bar_is_published_when_a_tick_of_a_later_interval_arrives():
    # given ticks at 0.2 s and 0.9 s, then one at 2.5 s (nothing in the second from 1 s)
    handler = make_bar_handler(MemoryStore(BarState), ("1s",))
    s = 10**9

    def tick(seq: int, at_ns: int, mid: float) -> Tick:
        return Tick(symbol="A", bid=mid - 0.01, ask=mid + 0.01, market_ts_ns=at_ns, seq=seq)

    # when they arrive
    first = await handler(tick(1, s // 5, 10.0))
    second = await handler(tick(2, 9 * s // 10, 12.0))
    third = await handler(tick(3, 5 * s // 2, 11.0))
    # then only the third publishes a bar: the second [0 s, 1 s), with both earlier ticks; no empty bar
    assert first is None and second is None
    [bar] = third
    assert (bar.start_ns, bar.open, bar.high, bar.low, bar.close, bar.trades, bar.seq) == (0, 10.0, 12.0, 10.0,
                                                                                            12.0, 2, 1)


async def test_both_timeframes_from_one_stage():
    # given the stage making 1s and 1m bars from ticks over two minutes
    handler = make_bar_handler(MemoryStore(BarState), ("1s", "1m"))
    ticks = [Tick(symbol="A", bid=10.0, ask=10.02, market_ts_ns=i * 10**9 // 2, seq=i + 1) for i in range(250)]
    # when they arrive
    bars = [b for t in ticks for b in await handler(t) or []]
    # then 1s bars close every second and 1m bars every minute, each numbered on its own
    assert [b.seq for b in bars if b.timeframe == "1m"] == [1, 2]
    assert [b.seq for b in bars if b.timeframe == "1s"] == list(range(1, 125))


def test_a_bad_timeframe_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="'1x'.*use '1s' or '1m'"):
        make_bar_handler(MemoryStore(BarState), ("1x",))


def test_the_sample_file_reads_as_three_symbols_of_300_one_minute_bars():
    # when the shipped sample is read
    bars = list(read_bars(SAMPLE_BARS))
    # then it holds 300 one-minute bars for each of 3 symbols, numbered in time order, a minute apart
    by_symbol: dict[str, list[Bar]] = defaultdict(list)
    for b in bars:
        by_symbol[b.symbol].append(b)
    assert sorted(by_symbol) == ["ALPHA", "BRAVO", "CHARLIE"]
    for own in by_symbol.values():
        assert [b.seq for b in own] == list(range(1, 301))
        assert all(b.timeframe == "1m" and b.low <= min(b.open, b.close) <= max(b.open, b.close) <= b.high
                   for b in own)
        assert {b.start_ns - a.start_ns for a, b in itertools.pairwise(own)} == {60 * 10**9}


def test_a_csv_line_is_parsed_into_a_bar(tmp_path: Path):
    # given a file of one bar
    path = tmp_path / "bars.csv"
    path.write_text(HEADER + "ALPHA,2024-03-04T14:30:00Z,101.25,101.40,101.10,101.32,18200\n")
    # when it is read
    [bar] = read_bars(path)
    # then each column lands in its field, the start as Unix nanoseconds
    assert (bar.symbol, bar.start_ns, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.seq) == (
        "ALPHA", 1_709_562_600_000_000_000, 101.25, 101.40, 101.10, 101.32, 18200.0, 1)


@pytest.mark.parametrize(("line", "error"), [
    ("ALPHA,2024-03-04T14:30:00Z,101.25,abc,101.10,101.32,18200", r":3: column 'high': 'abc' is not a finite"),
    ("ALPHA,2024-03-04T14:30:00Z,101.25,101.40,101.10,101.32,nan", r":3: column 'volume': 'nan' is not a finite"),
    ("ALPHA,2024-03-04 14:30,101.25,101.40,101.10,101.32,18200", r":3: column 'start': .* not an ISO-8601 UTC"),
    ("ALPHA,2024-03-04T14:30:00+01:00,101.25,101.40,101.10,101.32,18200", r":3: column 'start'"),
    ("ALPHA,2024-03-04T14:30:00Z,101.25,101.40,101.10", r":3: expected 7 columns .* got 5"),
    (",2024-03-04T14:30:00Z,101.25,101.40,101.10,101.32,18200", r":3: column 'symbol' is empty"),
    ("ALPHA,2024-03-04T14:30:00Z,101.25,101.00,101.10,101.32,18200", r":3: columns 'low'..'high': need low"),
    ("ALPHA,2024-03-04T14:30:00Z,101.25,101.40,101.10,101.32,-1", r":3: column 'volume': '-1' is negative"),
    ("ALPHA,2024-03-04T14:29:00Z,101.25,101.40,101.10,101.32,1", r":3: column 'start': .* not after the previous"),
])
def test_a_malformed_line_names_the_file_line_and_column(tmp_path: Path, line, error):
    # given a good line, then a bad one
    path = tmp_path / "bars.csv"
    path.write_text(HEADER + "ALPHA,2024-03-04T14:29:00Z,101.25,101.40,101.10,101.32,18200\n" + line + "\n")
    # when the file is read, then the error names the file, line 3 and what is wrong there
    with pytest.raises(BarFileError, match=re.escape(str(path)) + error):
        list(read_bars(path))


def test_a_wrong_header_is_refused_on_line_1(tmp_path: Path):
    path = tmp_path / "bars.csv"
    path.write_text("symbol,time,open,high,low,close,volume\n")
    with pytest.raises(BarFileError, match=r":1: the header must be symbol,start,open,high,low,close,volume"):
        list(read_bars(path))
