"""A deterministic synthetic market: a seeded random walk of quotes for N symbols.

Each symbol ``SYM000``, ``SYM001``, ... has its own random generator, seeded from the feed's seed and the
symbol's name, so a symbol's ticks do not depend on how many other symbols there are. Its mid price starts
between 20 and 200 and moves by a Gaussian log-return per tick; the spread is 1 to 3 cents around it; sizes
are round lots. Ticks are spaced by random whole milliseconds of *market time*, starting at ``START_NS``;
that time travels in ``market_ts_ns`` and is the only clock the pipeline reads. The symbols' ticks are merged
in market-time order (ties: by symbol), and each tick is numbered in its symbol's sequence (``seq`` from 1).

The same seed and sizes give the same ticks, field for field, except the envelope fabric sets: ``ts_ns``
(when the event was made) and ``event_id`` (random, unless ``stable_ids``: then derived from the tick).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Iterator

from fabric.events import Tick, new_event_id

__all__ = ["START_NS", "TICK_SIGMA", "feed", "stable_event_id", "symbol_ticks", "symbols"]

START_NS = 1_704_205_800_000_000_000
"""Market time of the first tick: 2024-01-02 14:30:00 UTC."""
TICK_SIGMA = 0.0005
"""Standard deviation of one tick's log-return (5 basis points)."""
MEAN_GAP_MS = 250
"""Mean market time between two ticks of a symbol."""


def symbols(count: int) -> list[str]:
    """The first ``count`` symbol names: SYM000, SYM001, ..."""
    return [f"SYM{i:03d}" for i in range(count)]


def stable_event_id(market_ts_ns: int, *parts: object) -> str:
    """A 32-hex-digit event id made from the data: market milliseconds, then a hash of ``parts``."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=10).hexdigest()
    return f"{market_ts_ns // 1_000_000:012x}{digest}"


def symbol_ticks(symbol: str, count: int, seed: int, *, stable_ids: bool = False) -> Iterator[Tick]:
    """One symbol's ``count`` ticks, in order."""
    rng = random.Random(f"{seed}:{symbol}")
    log_mid = math.log(rng.uniform(20.0, 200.0))
    ts_ns = START_NS + rng.randrange(MEAN_GAP_MS) * 1_000_000
    for seq in range(1, count + 1):
        mid_cents = math.exp(log_mid) * 100
        spread_cents = rng.randint(1, 3)
        bid_cents = math.floor(mid_cents - spread_cents / 2)
        yield Tick(
            event_id=stable_event_id(ts_ns, seed, symbol, seq) if stable_ids else new_event_id(),
            symbol=symbol, bid=bid_cents / 100, ask=(bid_cents + spread_cents) / 100,
            bid_size=rng.randint(1, 10) * 100.0, ask_size=rng.randint(1, 10) * 100.0, exchange="SIM",
            market_ts_ns=ts_ns, seq=seq,
        )
        log_mid += rng.gauss(0.0, TICK_SIGMA)
        ts_ns += (1 + int(rng.expovariate(1 / MEAN_GAP_MS))) * 1_000_000


def feed(symbol_count: int, ticks_per_symbol: int, seed: int = 0, *, stable_ids: bool = False) -> Iterator[Tick]:
    """Every symbol's ticks merged in market-time order (ties broken by symbol)."""
    streams = [symbol_ticks(s, ticks_per_symbol, seed, stable_ids=stable_ids) for s in symbols(symbol_count)]
    return heapq.merge(*streams, key=lambda t: (t.market_ts_ns, t.symbol))
