import itertools

import pytest

from fabric.events import new_event_id
from handlers.feed import START_NS, feed, symbol_ticks, symbols
from handlers.pipeline import contents

pytestmark = pytest.mark.timeout(60)


def test_same_seed_and_size_give_the_same_tick_contents():
    # given two feeds with the same seed and sizes
    first = [contents(t) for t in feed(5, 200, seed=42)]
    second = [contents(t) for t in feed(5, 200, seed=42)]
    # then their ticks are the same, byte for byte, in the same order
    assert first == second
    assert len(first) == 1000


def test_stable_ids_make_the_same_event_ids_on_every_run():
    # given two feeds with stable ids, another id made in between
    first = [t.event_id for t in feed(3, 50, seed=1, stable_ids=True)]
    new_event_id()
    second = [t.event_id for t in feed(3, 50, seed=1, stable_ids=True)]
    # then the ids repeat, are distinct, and are 32 hex digits as every event id
    assert first == second
    assert len(set(first)) == len(first)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in first)


def test_a_different_seed_gives_different_ticks():
    # given feeds with two seeds
    a = [contents(t) for t in feed(3, 100, seed=1)]
    b = [contents(t) for t in feed(3, 100, seed=2)]
    # then they differ
    assert a != b


def test_ticks_are_in_market_time_order_and_numbered_per_symbol():
    # given a feed
    ticks = list(feed(4, 300, seed=3))
    # then it is merged in market-time order, starting at START_NS
    times = [t.market_ts_ns for t in ticks]
    assert times == sorted(times) and times[0] >= START_NS
    # and each symbol's ticks are numbered 1, 2, 3, ... with strictly increasing market times
    for symbol in symbols(4):
        own = [t for t in ticks if t.symbol == symbol]
        assert [t.seq for t in own] == list(range(1, 301))
        assert all(a.market_ts_ns < b.market_ts_ns for a, b in itertools.pairwise(own))


def test_quotes_are_a_sane_book():
    # given a feed
    ticks = list(feed(4, 300, seed=4))
    # then every quote has a positive bid below its ask, by whole cents, and positive sizes
    assert all(0 < t.bid < t.ask for t in ticks)
    assert all(round((t.ask - t.bid) * 100) in (1, 2, 3) for t in ticks)
    assert all(t.bid_size > 0 and t.ask_size > 0 for t in ticks)


def test_a_symbols_ticks_do_not_depend_on_how_many_symbols_there_are():
    # given SYM001 in a feed of 2 symbols and in one of 10
    few = [contents(t) for t in feed(2, 100, seed=5) if t.symbol == "SYM001"]
    many = [contents(t) for t in feed(10, 100, seed=5) if t.symbol == "SYM001"]
    # then its ticks are the same
    assert few == many == [contents(t) for t in symbol_ticks("SYM001", 100, seed=5)]
