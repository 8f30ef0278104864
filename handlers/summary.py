"""A run of the pipeline on fabric, read back from its streams and set beside the single-process run's.

Everything here reads Redis and writes nothing. ``topic_lengths`` is the live progress (entries per topic so far);
``read_events`` decodes every entry of the pipeline's topics; ``tally`` turns them into what a run is judged by:

- events per topic, counted once each however many times an entry was written (``contents`` without the
  envelope: a replayed output is the same event), beside the single-process run's counts;
- per-stage latency: for each output, its ``ts_ns`` minus its cause's (the event whose handling made it, by
  ``causation_id``): the wait in the stream plus the handler call, on the hosts' wall clocks;
- end to end: each ``PortfolioUpdate``'s ``ts_ns`` minus its root's (the tick or file bar that started the
  chain, by ``correlation_id``): from the feed making the tick to the portfolio stage handling its fill;
- the final portfolio, as ``handlers.pipeline`` defines it: ``combine`` of each sleeve's latest update,
  positions marked at the last close of each symbol's bars of the trading timeframe.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from fabric.codec import decode_fields
from fabric.errors import DecodeError
from fabric.events import Bar, Event, PortfolioUpdate
from fabric.keys import Keys
from handlers.pipeline import contents
from handlers.portfolio import Allocation, combine

__all__ = [
    "TOPICS", "Latency", "Tally", "TopicCount", "final_portfolio", "latency", "read_events", "same", "tally",
    "topic_lengths",
]

TOPICS = ("tick", "bar", "features", "signal", "order", "alert", "fill", "audit", "portfolio_update")
"""The pipeline's topics, in the order events flow through them."""
PAGE = 5_000
"""Entries per XRANGE call when reading a stream back."""


class Latency(msgspec.Struct, frozen=True, kw_only=True):
    """Percentiles of a set of latencies, in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def latency(samples_ns: Sequence[int]) -> Latency | None:
    """The percentiles of ``samples_ns`` (nearest rank), or None without samples."""
    if not samples_ns:
        return None
    ordered = sorted(samples_ns)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] / 1e6

    return Latency(count=len(ordered), p50_ms=rank(50), p90_ms=rank(90), p99_ms=rank(99), max_ms=ordered[-1] / 1e6)


class TopicCount(msgspec.Struct, frozen=True, kw_only=True):
    """One topic: the stage that writes it, its distinct events, and the single-process run's count."""

    topic: str
    stage: str
    events: int
    expected: int
    latency: Latency | None
    """Hop latency of the stage writing this topic (cause made -> this event made); None for the feed."""


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    """What a run on fabric ended with."""

    topics: list[TopicCount]
    end_to_end: Latency | None
    portfolio: PortfolioUpdate


async def topic_lengths(client: Redis, keys: Keys, topics: Iterable[str] = TOPICS) -> dict[str, int]:
    """Entries written to each topic so far (all its streams), a replayed output counted again."""
    names = list(topics)
    async with client.pipeline(transaction=False) as pipe:
        for topic in names:
            pipe.smembers(keys.topic_registry(topic))
        registries = await pipe.execute()
    streams = [(topic, s) for topic, members in zip(names, registries, strict=True) for s in sorted(members)]
    async with client.pipeline(transaction=False) as pipe:
        for _, stream in streams:
            pipe.xlen(stream)
        lengths = await pipe.execute()
    totals = dict.fromkeys(names, 0)
    for (topic, _), length in zip(streams, lengths, strict=True):
        totals[topic] += int(length)
    return totals


async def _stream_events(client: Redis, stream: bytes | str) -> list[Event]:
    events: list[Event] = []
    start: bytes | str = "-"
    while True:
        page: Any = await client.xrange(stream, min=start, count=PAGE)
        for _, fields in page:
            try:
                events.append(decode_fields(fields))
            except DecodeError:
                continue  # not an event of the pipeline's (nothing but fabric writes these streams)
        if len(page) < PAGE:
            return events
        start = b"(" + page[-1][0]


async def read_events(client: Redis, keys: Keys, topics: Iterable[str] = TOPICS) -> dict[str, list[Event]]:
    """Every event in each topic's streams, decoded (a replayed output appears twice)."""
    found: dict[str, list[Event]] = {}
    for topic in topics:
        found[topic] = []
        for stream in sorted(await client.smembers(keys.topic_registry(topic))):
            found[topic] += await _stream_events(client, stream)
    return found


def _distinct(events: Iterable[Event]) -> list[Event]:
    """The events once each, a copy (same contents, another envelope: a replayed output) dropped."""
    seen: dict[bytes, Event] = {}
    for e in events:
        seen.setdefault(contents(e), e)
    return list(seen.values())


def _stage(event: Event) -> str:
    """The stage that made an event: its producer's function name (``handlers.wiring:bars`` -> ``bars``)."""
    producer = event.producer
    return producer.rsplit(":", 1)[-1] if ":" in producer and event.causation_id else "feed"


def final_portfolio(events: Mapping[str, Sequence[Event]], allocation: Allocation, timeframe: str) -> PortfolioUpdate:
    """``combine`` of each sleeve's latest update, positions marked at each symbol's last close of ``timeframe``."""
    marks: dict[str, tuple[int, float]] = {}
    for bar in events.get("bar", ()):
        if isinstance(bar, Bar) and bar.timeframe == timeframe and bar.seq > marks.get(bar.symbol, (0, 0.0))[0]:
            marks[bar.symbol] = (bar.seq, bar.close)
    updates = [u for u in events.get("portfolio_update", ()) if isinstance(u, PortfolioUpdate)]
    return combine(updates, allocation, {symbol: close for symbol, (_, close) in marks.items()})


def tally(events: Mapping[str, Sequence[Event]], expected: Mapping[str, int], allocation: Allocation,
          timeframe: str) -> Tally:
    """Counts, latencies and the final portfolio of a run read back by ``read_events``; ``expected`` is the
    single-process run's events per topic."""
    by_id = {e.event_id: e for es in events.values() for e in es}
    hops: defaultdict[str, list[int]] = defaultdict(list)
    end_to_end: list[int] = []
    rows = []
    for topic in [*TOPICS, *sorted(set(events) - set(TOPICS))]:
        distinct = _distinct(events.get(topic, ()))
        stages = sorted({_stage(e) for e in distinct})
        for e in distinct:
            cause = by_id.get(e.causation_id)
            if cause is not None:
                hops[topic].append(e.ts_ns - cause.ts_ns)
            root = by_id.get(e.correlation_id)
            if isinstance(e, PortfolioUpdate) and root is not None:
                end_to_end.append(e.ts_ns - root.ts_ns)
        if distinct or expected.get(topic):
            rows.append(TopicCount(topic=topic, stage=",".join(stages) or "-", events=len(distinct),
                                   expected=expected.get(topic, 0), latency=latency(hops[topic])))
    return Tally(topics=rows, end_to_end=latency(end_to_end),
                 portfolio=final_portfolio(events, allocation, timeframe))


def same(a: Any, b: Any) -> bool:
    """Whether two events hold the same data, to the last bit, envelope aside."""
    return contents(a) == contents(b)
