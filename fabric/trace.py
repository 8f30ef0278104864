"""One correlation id's events, read back from the streams: the tree of what caused what, and each hop's latency.

A worker stamps every output with ``correlation_id`` = its input's root id and ``causation_id`` = its input's
``event_id``, so one correlation id names a tree (tick -> bar -> features -> signal -> order -> fill -> portfolio
update), spread over topics. The root event itself carries an empty ``correlation_id``: it is the event whose
``event_id`` is the correlation id.

Nothing records where a correlation's events went, so ``trace`` reads every stream of the namespace (or of the
topics given), newest first, in pipelined rounds of XREVRANGE pages, keeping the entries whose payload holds the
id (a byte search before any decoding; msgpack and JSON both carry strings verbatim). The work is bounded twice:
a window (entries written since ``since_ms``, on Redis's clock; the last hour by default) and a cap on entries
read (``max_entries``); a trace cut by the cap says so (``truncated``). Once the root is found, no stream is read
further back than the root's entry: its descendants were all written after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis

from fabric.codec import decode_fields
from fabric.errors import DecodeError, NotFound
from fabric.events import Event
from fabric.inspection import _registered
from fabric.keys import Keys, StreamRef

__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_WINDOW_MS", "Hop", "Trace", "trace"]

DEFAULT_WINDOW_MS = 3_600_000
"""How far back a trace reads when not told (Redis's clock, by entry id)."""
DEFAULT_MAX_ENTRIES = 1_000_000
"""Entries a trace reads at most, over all streams, before it stops and says so."""
PAGE = 1_000
"""Entries per XREVRANGE call, at most."""
ROUND_ENTRIES = 50_000
"""Entries asked for per pipelined round, over all streams (pages shrink when there are many streams)."""
PIPELINE_CHUNK = 1_000
ROOT_SLACK_MS = 1_000
"""Read this much before the root's entry: in a cluster, the streams of a tree live on servers whose clocks differ."""


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a trace, where it was written, and how long after its cause."""

    event_id: str
    causation_id: str
    """The ``event_id`` of the event whose handling produced this one; empty on the root."""
    type: str
    topic: str
    symbol: str | None
    producer: str
    stream: str
    entry_id: str
    ts_ns: int
    """When the producer made the event (its clock, Unix ns)."""
    entry_ms: int
    """When Redis wrote the entry (Redis's clock, Unix ms: the entry id's first part)."""
    depth: int
    """0 for the root (and for an event whose cause was not found), its parent's depth + 1 otherwise."""
    latency_ns: int | None
    """This event's ``ts_ns`` minus its cause's ``ts_ns``: from the cause being made to this being made
    (reading, queueing, handling), on the producers' clocks (skewed across hosts); None without a found cause."""
    gap_ms: int | None
    """This entry's time minus its cause's entry time: one clock (Redis's), millisecond resolution."""


class Trace(msgspec.Struct, frozen=True, kw_only=True):
    """The events of one correlation id, depth first (each event before the events it caused)."""

    correlation_id: str
    hops: list[Hop]
    root_found: bool
    """Whether the root event (``event_id`` == the correlation id) was read; without it, the hops whose cause is
    missing are shown at depth 0."""
    total_ns: int | None
    """End to end: the latest event's ``ts_ns`` minus the root's; None without the root."""
    total_gap_ms: int | None
    """The same on Redis's clock: the latest entry time minus the root's."""
    topics: list[str]
    """The topics searched."""
    streams: int
    """Streams searched."""
    since_ms: int
    """Entries written before this (Unix ms, Redis's clock) were not read."""
    scanned: int
    """Entries read."""
    truncated: bool
    """The scan stopped at ``max_entries`` with entries left unread: events may be missing."""
    undecodable: int = 0
    """Entries holding the id that could not be decoded (not shown)."""


class _Found(msgspec.Struct, kw_only=True):
    """An entry holding the correlation id, decoded."""

    ref: StreamRef
    entry_id: str
    type: str
    event: Event

    @property
    def entry_ms(self) -> int:
        return int(self.entry_id.partition("-")[0])


class _Scan:
    """Reads streams newest first in rounds, keeping the entries of one correlation."""

    def __init__(self, correlation_id: str, refs: list[StreamRef], low_ms: int, max_entries: int) -> None:
        self.correlation_id = correlation_id
        self.needle = correlation_id.encode()
        self.low_ms = low_ms
        self.max_entries = max_entries
        self.cursor: dict[str, str] = {ref.key: "+" for ref in refs}  # where each stream's next page starts, back
        self.refs = {ref.key: ref for ref in refs}
        self.found: dict[str, _Found] = {}
        self.scanned = 0
        self.undecodable = 0
        self.truncated = False

    def _calls(self) -> list[tuple[str, int]]:
        """This round's streams and page sizes, within what is left of the cap (which is at least 1)."""
        left = self.max_entries - self.scanned
        active = list(self.cursor)[:left]
        count = max(1, min(PAGE, ROUND_ENTRIES // len(active), left // len(active)))
        return [(key, count) for key in active]

    def _keep(self, ref: StreamRef, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        if self.needle not in fields.get(b"data", b""):
            return
        try:
            event = decode_fields(fields)
        except DecodeError:
            self.undecodable += 1
            return
        if event.correlation_id == self.correlation_id or (
                event.event_id == self.correlation_id and not event.correlation_id):
            found = _Found(ref=ref, entry_id=entry_id.decode(), type=fields[b"type"].decode(), event=event)
            known = self.found.get(event.event_id)  # the same event written twice (a replayed dead letter): the first
            if known is None or found.entry_ms < known.entry_ms:
                self.found[event.event_id] = found
            if event.event_id == self.correlation_id:  # nothing of the tree was written before its root
                self.low_ms = max(self.low_ms, found.entry_ms - ROOT_SLACK_MS)

    async def round(self, client: Redis) -> None:
        """Read the next page of every stream still to read (as many as the cap leaves room for)."""
        if self.scanned >= self.max_entries:
            self.truncated = True
            self.cursor.clear()
            return
        calls = self._calls()
        replies: list[Any] = []
        for start in range(0, len(calls), PIPELINE_CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for key, count in calls[start : start + PIPELINE_CHUNK]:
                    pipe.xrevrange(key, self.cursor[key], f"{self.low_ms}-0", count=count)
                replies += await pipe.execute()
        for (key, count), entries in zip(calls, replies, strict=True):
            self.scanned += len(entries)
            for entry_id, fields in entries:
                self._keep(self.refs[key], entry_id, fields)
            if len(entries) < count:
                del self.cursor[key]
            else:
                self.cursor[key] = "(" + entries[-1][0].decode()


def _hop(found: _Found, parent: _Found | None, depth: int) -> Hop:
    e = found.event
    return Hop(event_id=e.event_id, causation_id=e.causation_id, type=found.type,
               topic=found.ref.topic, symbol=e.symbol, producer=e.producer, stream=found.ref.key,
               entry_id=found.entry_id, ts_ns=e.ts_ns, entry_ms=found.entry_ms, depth=depth,
               latency_ns=None if parent is None else e.ts_ns - parent.event.ts_ns,
               gap_ms=None if parent is None else found.entry_ms - parent.entry_ms)


def _order(f: _Found) -> tuple[int, int, str]:
    return f.entry_ms, f.event.ts_ns, f.event.event_id


def _tree(found: dict[str, _Found]) -> list[Hop]:
    """Depth first from the root (and from each event whose cause was not read), children in writing order."""
    children: dict[str, list[_Found]] = {}
    tops = []
    for f in sorted(found.values(), key=_order):
        cause = f.event.causation_id
        if cause and cause in found and cause != f.event.event_id:
            children.setdefault(cause, []).append(f)
        else:
            tops.append(f)
    hops: list[Hop] = []
    todo: list[tuple[_Found, _Found | None, int]] = [(f, None, 0) for f in reversed(tops)]
    while todo:
        f, parent, depth = todo.pop()
        hops.append(_hop(f, parent, depth))
        todo += [(child, f, depth + 1) for child in reversed(children.pop(f.event.event_id, []))]
    return hops


async def _redis_ms(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def trace(client: Redis, keys: Keys, correlation_id: str, *, topics: Sequence[str] = (),
                since_ms: int | None = None, max_entries: int = DEFAULT_MAX_ENTRIES) -> Trace:
    """The events of ``correlation_id`` on the topics (default: every topic of the namespace) written since
    ``since_ms`` (Unix ms on Redis's clock; default: the last hour), reading at most ``max_entries`` entries.
    ``NotFound`` when none is found (or a topic named does not exist)."""
    if not correlation_id.strip():
        raise ValueError("the correlation id is empty: give the event_id of the event that started the chain")
    if max_entries < 1:
        raise ValueError(f"max_entries must be at least 1, not {max_entries}")
    refs = await _registered(client, keys, topics)
    low_ms = since_ms if since_ms is not None else await _redis_ms(client) - DEFAULT_WINDOW_MS
    scan = _Scan(correlation_id, refs, max(0, low_ms), max_entries)
    while scan.cursor:
        await scan.round(client)
    searched = sorted({ref.topic for ref in refs})
    if not scan.found:
        raise NotFound(_not_found(correlation_id, keys, topics, scan, len(refs), max(0, low_ms)))
    hops = _tree(scan.found)
    root = scan.found.get(correlation_id)
    latest = max(scan.found.values(), key=lambda f: f.event.ts_ns)
    last_written = max(f.entry_ms for f in scan.found.values())
    return Trace(correlation_id=correlation_id, hops=hops, root_found=root is not None,
                 total_ns=None if root is None else latest.event.ts_ns - root.event.ts_ns,
                 total_gap_ms=None if root is None else last_written - root.entry_ms,
                 topics=searched, streams=len(refs), since_ms=max(0, low_ms), scanned=scan.scanned,
                 truncated=scan.truncated, undecodable=scan.undecodable)


def _not_found(correlation_id: str, keys: Keys, topics: Sequence[str], scan: _Scan, streams: int,
               since_ms: int) -> str:
    where = f"topics {', '.join(topics)}" if topics else f"every topic of namespace {keys.ns!r}"
    widen = ["an earlier --since (an age like 6h, or a time)"]
    if topics:
        widen.append("no --topic (every topic)")
    if scan.truncated:
        widen.insert(0, f"a larger --max-entries (the scan stopped at {scan.max_entries:,} entries)")
    return (f"no event of correlation {correlation_id!r} in {where} ({streams} streams, {scan.scanned:,} entries "
            f"written since {since_ms} ms): check the id (an event_id, as in the worker's logs) and --namespace, "
            f"or widen the search: {'; '.join(widen)}")
