"""A topic's history: follow it live (``tail``), read a time range (``read_range``), replay a range into another
topic or through a handler, and plan and apply retention now.

None of this joins a consumer group: reading history must not disturb the groups that work on it. Positions are
entry ids (``MS-SEQ``, the time Redis appended the entry); ``parse_time`` turns what a person types into one.

Replays are idempotent within a window: each copy (or handler output) is published under an event id derived
from the original's (and the target topic, or the handler and the output's place), with the publisher's
``dedup_window_ms``, so running the same replay again within the window adds nothing. With a window of 0 a
replay is at least once.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable
from contextlib import aclosing
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis

from fabric.codec import decode_fields
from fabric.config import PublisherConfig, Retention
from fabric.errors import DecodeError, NotFound, Reject, Retry
from fabric.events import Event
from fabric.handler import Context, HandlerFn
from fabric.keys import Keys, Priority, StreamRef
from fabric.nodes import by_slot, is_cluster
from fabric.publisher import Publisher
from fabric.retention import plan_stream, trim_stream

__all__ = [
    "DEFAULT_REPLAY_DEDUP_MS", "EVERYTHING", "Entry", "Filters", "ReplayResult", "StreamTrim", "TimeRange",
    "derived_id", "parse_time", "read_range", "replay_into", "replay_to_handler", "tail", "topic_streams",
    "trim_now", "trim_plan",
]

MAX_SEQ = 2**64 - 1
PAGE = 500
DISCOVER_MS = 1_000
TAIL_BLOCKING_SLOTS = 64
"""A tail on a cluster blocks in one XREAD per slot up to this many slots; over it, it polls every
``TAIL_POLL_MS``."""
TAIL_POLL_MS = 100
DEFAULT_REPLAY_DEDUP_MS = 3_600_000
"""A replay marks each event it publishes for an hour (about 100 bytes of Redis memory per event)."""
HANDLER_ATTEMPTS = 5
"""Calls of a handler on one event that keeps raising ``Retry`` before the replay stops there."""
REPLAY_GROUP = "replay"

_ENTRY_ID = re.compile(r"^(\d+)-(\d+)$")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

Advance = Callable[[int], None]


def _quiet(n: int) -> None:
    """An ``advance`` that shows nothing."""


# ---- positions ---------------------------------------------------------------------------------------------


def parse_time(text: str, now_ms: int | None = None) -> int | str:
    """``1700000000000-0`` (an entry id, returned as is), a Unix time in ms, an ISO time (local unless it names
    an offset) or an age before now (``90s``, ``10m``, ``1h``, ``2d``, ``500ms``) as Unix ms."""
    text = text.strip()
    if _ENTRY_ID.match(text):
        return text
    if text.isdigit():
        return int(text)
    age = _AGE.match(text)
    if age:
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return now - int(float(age[1]) * _UNIT_MS[age[2]])
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: give an entry id (1700000000000-0), Unix ms, an ISO "
                         "time (2024-05-01T12:00:00) or an age (10m, 1h)") from None


def _split(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(position: int | str) -> str:
    """The XREAD id that reads from ``position`` on, including it (XREAD starts after the id it is given)."""
    ms, seq = _split(position) if isinstance(position, str) else (position, 0)
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{MAX_SEQ}" if ms > 0 else "0-0"


class TimeRange(NamedTuple):
    """Inclusive entry-id bounds of a range."""

    start: str
    end: str

    @classmethod
    def of(cls, start: int | str, end: int | str) -> TimeRange:
        """From times or entry ids (a time covers its whole millisecond); refuse an empty range."""
        low = start if isinstance(start, str) else f"{start}-0"
        high = end if isinstance(end, str) else f"{end}-{MAX_SEQ}"
        if _split(low) > _split(high):
            raise ValueError(f"the range starts ({low}) after it ends ({high}): swap --from and --to")
        return cls(low, high)

    @property
    def span_ms(self) -> int:
        """Milliseconds covered (what a progress bar counts)."""
        return _split(self.end)[0] - _split(self.start)[0] + 1

    def until(self, now_ms: int) -> TimeRange:
        """The range cut at ``now_ms``, so a replay never reads what it writes itself."""
        return self if _split(self.end)[0] <= now_ms else TimeRange(self.start, f"{now_ms}-{MAX_SEQ}")


# ---- reading -----------------------------------------------------------------------------------------------


class Filters(NamedTuple):
    """What to keep; an empty collection keeps everything of that kind."""

    types: Collection[str] = ()
    symbols: Collection[str] = ()
    priorities: Collection[Priority] = ()

    def stream(self, ref: StreamRef) -> bool:
        """Whether a stream can hold entries to keep (symbol and priority are in its key)."""
        return (not self.symbols or ref.symbol in self.symbols) and (
            not self.priorities or ref.priority in self.priorities)

    def type(self, fields: dict[bytes, bytes]) -> bool:
        """Whether an entry's type is kept (checked before decoding it)."""
        return not self.types or fields.get(b"type", b"").decode(errors="replace") in self.types


EVERYTHING = Filters()


class Entry(NamedTuple):
    """One entry of a topic's stream, decoded, or with the reason it could not be."""

    stream: StreamRef
    entry_id: str
    event: Event | None
    error: str | None
    type: str

    @property
    def time_ms(self) -> int:
        """When Redis appended it."""
        return _split(self.entry_id)[0]


def _entry(ref: StreamRef, entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    kind = fields.get(b"type", b"?").decode(errors="replace")
    try:
        return Entry(ref, entry_id.decode(), decode_fields(fields), None, kind)
    except DecodeError as exc:
        return Entry(ref, entry_id.decode(), None, exc.reason, kind)


async def _registry(client: Redis, keys: Keys, topic: str) -> list[StreamRef]:
    members: Any = await client.smembers(keys.topic_registry(topic))
    return [keys.parse_stream(m) for m in sorted(members)]


async def topic_streams(client: Redis, keys: Keys, topic: str) -> list[StreamRef]:
    """The streams of a topic; ``NotFound`` when it has none."""
    refs = await _registry(client, keys, topic)
    if not refs:
        raise NotFound(f"topic {topic!r} has no streams in namespace {keys.ns!r}: check the topic's name and "
                       "--namespace")
    return refs


async def _start(client: Redis, stream: str, start: int | str) -> str:
    if start != "$":
        return _after(start)
    last: Any = await client.xrevrange(stream, count=1)
    return last[0][0].decode() if last else "0-0"


async def _read_new(client: Redis, positions: dict[str, str], count: int, block_ms: int) -> Any:
    """XREAD after each position, waiting up to ``block_ms`` for the first new entry. On a cluster one XREAD
    takes only streams of one slot: the slots are read in a pipeline (a round trip per node) and, when none has
    anything, a blocking XREAD per slot waits at once for the first to get something, then they are read again."""
    if not is_cluster(client):
        return await client.xread(positions, count=count, block=block_ms)  # type: ignore[arg-type]
    slots = [{key: positions[key] for key in keys} for keys in by_slot(positions)]
    if len(slots) == 1:
        return await client.xread(slots[0], count=count, block=block_ms)  # type: ignore[arg-type]
    reply = await _read_slots(client, slots, count)
    if reply:
        return reply
    if len(slots) > TAIL_BLOCKING_SLOTS:  # a blocked read holds a connection: poll this many instead
        await asyncio.sleep(min(block_ms, TAIL_POLL_MS) / 1000)
    else:
        await _first_to_read(client, slots, block_ms)
    return await _read_slots(client, slots, count)


async def _read_slots(client: Redis, slots: list[dict[str, str]], count: int) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for slot in slots:
            pipe.xread(slot, count=count)  # type: ignore[arg-type]
        replies = await pipe.execute()
    return [stream for reply in replies for stream in reply or []]


async def _first_to_read(client: Redis, slots: list[dict[str, str]], block_ms: int) -> None:
    """Wait until one slot's blocking XREAD returns (an entry came, or ``block_ms`` passed); the others are
    cancelled (their connections are dropped: an XREAD without a group consumes nothing)."""
    reads: list[asyncio.Task[Any]] = [
        asyncio.create_task(client.xread(slot, count=1, block=block_ms))  # type: ignore[arg-type]
        for slot in slots]
    try:
        done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        for read in done:
            read.result()
    finally:
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)


async def tail(client: Redis, keys: Keys, topic: str, *, start: int | str = "$", filters: Filters = EVERYTHING,
               discover_ms: int = DISCOVER_MS, count: int = PAGE) -> AsyncGenerator[Entry, None]:
    """Follow every stream of a topic from ``start`` (``"$"``: only new entries; or a time or entry id), in
    arrival order per stream, forever; streams that appear later are followed from their first entry."""
    refs = {ref.key: ref for ref in await topic_streams(client, keys, topic)}
    positions = {k: await _start(client, k, start) for k, ref in refs.items() if filters.stream(ref)}
    later = "0-0" if start == "$" else _after(start)
    discover_at = time.monotonic() + discover_ms / 1000
    while True:
        if positions:
            reply: Any = await _read_new(client, positions, count, discover_ms)
        else:  # no stream matches yet: wait for one to appear
            await asyncio.sleep(discover_ms / 1000)
            reply = []
        got = [(refs[s.decode()], i, f) for s, entries in reply for i, f in entries]
        for ref, entry_id, fields in sorted(got, key=lambda e: (_split(e[1].decode()), e[0].key)):
            positions[ref.key] = entry_id.decode()
            if filters.type(fields):
                yield _entry(ref, entry_id, fields)
        if time.monotonic() >= discover_at:
            discover_at = time.monotonic() + discover_ms / 1000
            for ref in await _registry(client, keys, topic):
                if ref.key not in refs:
                    refs[ref.key] = ref
                    if filters.stream(ref):
                        positions[ref.key] = later


async def _pages(client: Redis, ref: StreamRef, span: TimeRange, page: int) -> AsyncGenerator[tuple[bytes, Any], None]:
    low = span.start
    while True:
        entries: Any = await client.xrange(ref.key, low, span.end, count=page)
        for entry in entries:
            yield entry
        if len(entries) < page:
            return
        low = "(" + entries[-1][0].decode()


async def read_range(client: Redis, keys: Keys, topic: str, span: TimeRange, *, filters: Filters = EVERYTHING,
                     page: int = PAGE) -> AsyncGenerator[Entry, None]:
    """The entries of every stream of a topic within ``span``, merged in entry-id (time) order."""
    refs = [ref for ref in await topic_streams(client, keys, topic) if filters.stream(ref)]
    readers = [_pages(client, ref, span, page) for ref in refs]
    heap: list[tuple[tuple[int, int], str, int, bytes, Any]] = []

    async def push(i: int) -> None:
        entry = await anext(readers[i], None)
        if entry is not None:
            heapq.heappush(heap, (_split(entry[0].decode()), refs[i].key, i, entry[0], entry[1]))

    try:
        for i in range(len(readers)):
            await push(i)
        while heap:
            _, _, i, entry_id, fields = heapq.heappop(heap)
            await push(i)
            if filters.type(fields):
                yield _entry(refs[i], entry_id, fields)
    finally:  # a reader stopped early closes the per-stream pagers too
        for reader in readers:
            await reader.aclose()


# ---- replaying ---------------------------------------------------------------------------------------------


class ReplayResult(msgspec.Struct, kw_only=True):
    """What a replay did."""

    read: int = 0
    """Entries of the range read (after filters)."""
    done: int = 0
    """Events copied, or handled by the handler."""
    published: int = 0
    duplicates: int = 0
    """Events not published again: the same replay had published them within the dedup window."""
    undecodable: int = 0
    rejected: int = 0
    """Events the handler refused with ``Reject`` (a worker would dead-letter them)."""
    stopped_at: str | None = None
    """``STREAM ENTRY_ID`` of the entry the handler failed on; None when the replay ran to its end."""
    error: str | None = None


def derived_id(event_id: str, *salt: str) -> str:
    """A stable event id for a copy: the original's time digits, then 20 hex digits of a hash."""
    digest = hashlib.blake2b("\0".join((event_id, *salt)).encode(), digest_size=10).hexdigest()
    return event_id[:12] + digest


class _Pacer:
    """Keeps a replay at or under ``rate`` events per second (None: as fast as it goes)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.count = 0
        self.began = time.monotonic()

    async def pace(self, n: int) -> None:
        self.count += n
        if self.rate:
            ahead = self.began + self.count / self.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)


class _Sink:
    """The replay's publisher, with its counts and the progress it reports."""

    def __init__(self, publisher: Publisher, result: ReplayResult, span: TimeRange, advance: Advance) -> None:
        self.publisher, self.result, self.advance = publisher, result, advance
        self.at_ms = _split(span.start)[0]

    async def publish(self, events: list[Event], topic: str | None, priority: Priority | None) -> None:
        if events:
            ids = await self.publisher.publish_many(events, topic, priority)
            published = sum(1 for i in ids if i is not None)
            self.result.published += published
            self.result.duplicates += len(ids) - published

    def reached(self, at_ms: int) -> None:
        if at_ms > self.at_ms:
            self.advance(at_ms - self.at_ms)
            self.at_ms = at_ms


def _publisher(client: Redis, keys: Keys, config: PublisherConfig | None, dedup_window_ms: int) -> Publisher:
    config = msgspec.structs.replace(config or PublisherConfig(), dedup_window_ms=dedup_window_ms)
    return Publisher(client, config, keys)


async def _batches(entries: AsyncIterator[Entry], size: int) -> AsyncIterator[list[Entry]]:
    batch: list[Entry] = []
    async for entry in entries:
        batch.append(entry)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def replay_into(client: Redis, keys: Keys, topic: str, span: TimeRange, into: str, *,
                      filters: Filters = EVERYTHING, publisher: PublisherConfig | None = None,
                      dedup_window_ms: int = DEFAULT_REPLAY_DEDUP_MS, rate: float | None = None,
                      advance: Advance = _quiet) -> ReplayResult:
    """Publish the events of a range of ``topic`` into ``into``, each at its original priority and symbol, in
    time order; ``advance(ms)`` is told how much of the range is done."""
    result, pacer = ReplayResult(), _Pacer(rate)
    size = max(1, min(PAGE, int(rate))) if rate else PAGE
    async with _publisher(client, keys, publisher, dedup_window_ms) as pub:
        sink = _Sink(pub, result, span, advance)
        async for batch in _batches(read_range(client, keys, topic, span, filters=filters), size):
            by_priority: dict[Priority, list[Event]] = {}
            for entry in batch:
                result.read += 1
                if entry.event is None:
                    result.undecodable += 1
                    continue
                copy = msgspec.structs.replace(entry.event, event_id=derived_id(entry.event.event_id, into))
                by_priority.setdefault(entry.stream.priority, []).append(copy)
            for priority, events in by_priority.items():
                await sink.publish(events, into, priority)
                result.done += len(events)
            sink.reached(batch[-1].time_ms)
            await pacer.pace(len(batch))
    return result


def _context(entry: Entry) -> Context:
    ref = entry.stream
    return Context(stream=ref.key, topic=ref.topic, priority=ref.priority.label, symbol=ref.symbol,
                   entry_id=entry.entry_id, delivery_count=1, group=REPLAY_GROUP, consumer=REPLAY_GROUP)


async def _call(handler: HandlerFn, event: Event, ctx: Context) -> list[Event]:
    """Call the handler as a worker would, honouring ``Retry`` a few times."""
    for attempt in range(1, HANDLER_ATTEMPTS + 1):
        try:
            return await handler(event, msgspec.structs.replace(ctx, delivery_count=attempt))
        except Retry as retry:
            if attempt == HANDLER_ATTEMPTS:
                raise
            await asyncio.sleep(retry.after_ms / 1000)
    raise AssertionError("unreachable")


def _stamped(event: Event, outputs: Iterable[Event], name: str) -> list[Event]:
    """Outputs as a worker publishes them, under ids that a second run of the same replay derives again."""
    return [
        msgspec.structs.replace(o, correlation_id=event.root_id, causation_id=event.event_id, producer=name,
                                event_id=derived_id(event.event_id, name, str(n)))
        for n, o in enumerate(outputs)
    ]


async def _handle(fn: HandlerFn, name: str, entry: Entry, result: ReplayResult) -> list[Event] | None:
    """The entry's stamped outputs ([] when rejected or undecodable), or None when the handler failed."""
    result.read += 1
    if entry.event is None:
        result.undecodable += 1
        return []
    try:
        outputs = _stamped(entry.event, await _call(fn, entry.event, _context(entry)), name)
    except Reject:
        result.rejected += 1
        outputs = []
    except Exception as exc:  # any handler failure stops the replay at this entry
        result.stopped_at = f"{entry.stream.key} {entry.entry_id}"
        result.error = f"{type(exc).__name__}: {exc}"
        return None
    result.done += 1
    return outputs


async def replay_to_handler(client: Redis, keys: Keys, topic: str, span: TimeRange, handler: tuple[str, HandlerFn],
                            *, output_topic: str | None = None, filters: Filters = EVERYTHING,
                            publisher: PublisherConfig | None = None, dedup_window_ms: int = DEFAULT_REPLAY_DEDUP_MS,
                            rate: float | None = None, advance: Advance = _quiet) -> ReplayResult:
    """Call ``handler`` (name, function) on each event of the range in time order and publish what it returns
    (to each output's default topic, or ``output_topic``); stop at the first failure, saying where, after
    publishing the outputs of the events before it."""
    name, fn = handler
    result, pacer = ReplayResult(), _Pacer(rate)
    async with _publisher(client, keys, publisher, dedup_window_ms) as pub, \
            aclosing(read_range(client, keys, topic, span, filters=filters)) as entries:
        sink = _Sink(pub, result, span, advance)
        outputs: list[Event] = []
        async for entry in entries:
            made = await _handle(fn, name, entry, result)
            if made is None:
                break
            outputs += made
            if len(outputs) >= PAGE:
                await sink.publish(outputs, output_topic, None)
                outputs = []
            sink.reached(entry.time_ms)
            await pacer.pace(1)
        await sink.publish(outputs, output_topic, None)
    return result


# ---- retention now -----------------------------------------------------------------------------------------


class StreamTrim(msgspec.Struct, kw_only=True):
    """One stream's trim: the plan, then (once applied) what went."""

    topic: str
    stream: str
    length: int
    remove: int
    """Entries the rules would remove now."""
    held_back: int
    """Entries the rules would remove but a group has not acknowledged yet: kept."""
    drop: int
    """Unacknowledged entries the hard cap would drop."""
    removed: int | None = None
    dropped: int | None = None


async def trim_plan(client: Redis, keys: Keys, retention: dict[str, Retention], *,
                    missing_ok: bool = False) -> list[StreamTrim]:
    """Per stream of each topic: its length, what ``retention`` would remove now and what groups hold back;
    ``NotFound`` for a topic without streams (unless ``missing_ok``)."""
    rows = []
    for topic, rules in retention.items():
        try:
            refs = await topic_streams(client, keys, topic)
        except NotFound:
            if missing_ok:
                continue
            raise
        for ref in refs:
            plan = await plan_stream(client, ref.key, rules)
            rows.append(StreamTrim(topic=topic, stream=ref.key, length=plan.length, remove=plan.remove,
                                   held_back=plan.held_back, drop=plan.drop))
    return rows


async def trim_now(client: Redis, keys: Keys, plan: list[StreamTrim], retention: dict[str, Retention], *,
                   advance: Advance = _quiet) -> list[StreamTrim]:
    """Apply retention to the streams of a plan (through ``trim.lua``); the rows with what went."""
    done = []
    for row in plan:
        removed, dropped = await trim_stream(client, keys, row.stream, retention[row.topic])
        done.append(msgspec.structs.replace(row, removed=removed, dropped=dropped))
        advance(1)
    return done
