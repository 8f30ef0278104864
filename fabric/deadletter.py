"""Dead letters: entries a group gave up on, kept with their error and original fields.

A dead letter lives in ``ns:dlq:TAG``, the slot of its origin stream, so that moving an entry there and
acknowledging it is one atomic script (``deadletter.lua``), and so is replaying it (``replay.lua``): a dead letter
replayed twice, by two racing replays, or again after a lost reply, is put back on its origin stream once.

A dead letter is named ``TAG/ENTRY_ID`` (``{BTC/USD}/1700000000000-0``): its dead-letter stream's hash tag and its
entry id there (``DeadLetter.ref``); ``get`` also accepts the whole key, ``ns:dlq:{BTC/USD}/1700000000000-0``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from fabric import scripts
from fabric.codec import decode_fields
from fabric.errors import NotFound
from fabric.events import Event
from fabric.keys import Keys

__all__ = [
    "DeadLetter", "DeadLetterFilter", "PurgeReport", "ReplayOutcome", "ReplayReport", "find", "get",
    "list_dead_letters", "move", "original_event", "purge", "purge_many", "replay", "replay_many",
    "server_time_ms",
]

MAX_ERROR_CHARS = 2_000
PAGE = 500
"""Entries per XRANGE while walking a dead-letter stream."""
PURGE_CHUNK = 500
"""Ids per XDEL."""

_ENTRY_ID = re.compile(r"^\d+-\d+$")


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter as stored."""

    dlq: str
    id: str
    origin_stream: str
    origin_id: str
    group: str
    consumer: str
    handler: str
    error_type: str
    error: str
    deliveries: int
    first_failure_ms: int
    last_failure_ms: int
    fields: dict[str, bytes]
    """The original entry's fields, byte for byte (empty when ``origin_missing``)."""
    origin_missing: bool = False
    """The entry was already trimmed from its stream when it was dead-lettered: there is nothing to replay."""

    @classmethod
    def parse(cls, dlq: str, entry_id: bytes, raw: dict[bytes, bytes]) -> DeadLetter:
        """Build from an XRANGE entry of a dead-letter stream."""
        text = {k.decode(): v.decode(errors="replace") for k, v in raw.items() if not k.startswith(b"f:")}
        return cls(
            dlq=dlq,
            id=entry_id.decode(),
            origin_stream=text.get("origin_stream", ""),
            origin_id=text.get("origin_id", ""),
            group=text.get("group", ""),
            consumer=text.get("consumer", ""),
            handler=text.get("handler", ""),
            error_type=text.get("error_type", ""),
            error=text.get("error", ""),
            deliveries=int(text.get("deliveries", "0") or 0),
            first_failure_ms=int(text.get("first_failure_ms", "0") or 0),
            last_failure_ms=int(text.get("last_failure_ms", "0") or 0),
            fields={k[2:].decode(): v for k, v in raw.items() if k.startswith(b"f:")},
            origin_missing=text.get("origin_missing") == "1",
        )

    @property
    def ref(self) -> str:
        """The name commands print and accept: ``TAG/ENTRY_ID``."""
        return f"{Keys.tag_of(self.dlq)}/{self.id}"

    @property
    def dead_ms(self) -> int:
        """When it was dead-lettered (Unix ms): the time part of its entry id."""
        return int(self.id.partition("-")[0])

    @property
    def event_type(self) -> str:
        """The original entry's ``type`` field ('' when it had none)."""
        return self.fields.get("type", b"").decode(errors="replace")


class DeadLetterFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead letters a command means; a field left None matches every dead letter."""

    topic: str | None = None
    """The origin stream's topic."""
    stream: str | None = None
    """The origin stream's key (``ns:s:TOPIC:PRIORITY:TAG``)."""
    event_type: str | None = None
    """The original entry's ``type`` (``Tick``), exactly."""
    error: str | None = None
    """Text in the error type or message, in any case."""
    min_age_ms: int | None = None
    """Dead-lettered at least this long ago (by Redis's clock)."""
    max_age_ms: int | None = None
    """Dead-lettered at most this long ago."""
    group: str | None = None
    """The group that gave up on it."""

    def __post_init__(self) -> None:
        for name in ("min_age_ms", "max_age_ms"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, not {value}")
        if self.min_age_ms is not None and self.max_age_ms is not None and self.min_age_ms > self.max_age_ms:
            raise ValueError(f"an age of at least {self.min_age_ms} ms and at most {self.max_age_ms} ms matches "
                             "nothing: swap them")

    def id_range(self, now_ms: int) -> tuple[str, str]:
        """The XRANGE bounds (by dead-letter time) that the age limits allow."""
        start = "-" if self.max_age_ms is None else str(max(0, now_ms - self.max_age_ms))
        end = "+" if self.min_age_ms is None else str(max(0, now_ms - self.min_age_ms))
        return start, end

    def matches(self, letter: DeadLetter, keys: Keys) -> bool:
        """Whether a dead letter (already within ``id_range``) passes the other conditions."""
        if self.stream is not None and letter.origin_stream != self.stream:
            return False
        if self.group is not None and letter.group != self.group:
            return False
        if self.event_type is not None and letter.event_type != self.event_type:
            return False
        if self.error is not None:
            needle = self.error.casefold()
            if needle not in letter.error_type.casefold() and needle not in letter.error.casefold():
                return False
        return self.topic is None or _topic_of(keys, letter.origin_stream) == self.topic


def _topic_of(keys: Keys, stream: str) -> str | None:
    try:
        return keys.parse_stream(stream).topic
    except ValueError:
        return None


async def server_time_ms(client: Redis) -> int:
    """Redis's clock in Unix ms: ages are measured against it, as dead-letter ids are stamped by it."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def move(
    client: Redis,
    keys: Keys,
    stream: str,
    entry_id: bytes,
    *,
    group: str,
    consumer: str,
    handler: str,
    error_type: str,
    error: str,
    deliveries: int,
    registered: set[str] | None = None,
    fence: tuple[str, int] | None = None,
) -> bytes | None:
    """Dead-letter one pending entry and ack it atomically; None if this consumer no longer owns it (or, given
    ``fence`` = (lease key, token) for an ordered group's stream, if that token is no longer the stream's).

    The dead-letter stream is added to ``keys.dlq_registry()`` first, unless it is in ``registered`` (a cache the
    caller keeps, so that a worker pays that round trip once per dead-letter stream)."""
    dlq = keys.dlq(stream)
    if registered is None or dlq not in registered:
        await client.sadd(keys.dlq_registry(), dlq)
        if registered is not None:
            registered.add(dlq)
    script_keys = [stream, keys.failures(stream), dlq]
    args: list[object] = [group, consumer, entry_id, handler, error_type, error[:MAX_ERROR_CHARS], deliveries]
    if fence is not None:
        script_keys.append(fence[0])
        args.append(fence[1])
    result: bytes | None = await scripts.DEADLETTER(client, script_keys, args)
    return result


async def _dlqs(client: Redis, keys: Keys, flt: DeadLetterFilter) -> list[str]:
    """The dead-letter streams that can hold what the filter asks for, in name order."""
    if flt.stream is not None:
        return [keys.dlq(flt.stream)] if "{" in flt.stream else []
    registry: Any = await client.smembers(keys.dlq_registry())
    return sorted(name.decode() for name in registry)


def _after(entry_id: bytes) -> str:
    """The smallest entry id after this one (XRANGE's start for the next page)."""
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq) + 1}"


async def _walk(client: Redis, dlq: str, bounds: tuple[str, str], keep: Callable[[DeadLetter], bool],
                want: int | None, page: int) -> list[DeadLetter]:
    """Up to ``want`` dead letters of one stream within ``bounds`` that ``keep`` accepts, read ``page`` at a time."""
    start, end = bounds
    out: list[DeadLetter] = []
    while want is None or len(out) < want:
        entries: Any = await client.xrange(dlq, min=start, max=end, count=page)
        out += (letter for letter in (DeadLetter.parse(dlq, i, raw) for i, raw in entries) if keep(letter))
        if len(entries) < page:
            break
        start = _after(entries[-1][0])
    return out if want is None else out[:want]


async def find(
    client: Redis,
    keys: Keys,
    flt: DeadLetterFilter | None = None,
    *,
    limit: int | None = None,
    now_ms: int | None = None,
    page: int = PAGE,
) -> list[DeadLetter]:
    """Up to ``limit`` (None: all) dead letters that pass ``flt``, by dead-letter stream, oldest first within each.

    Every registered dead-letter stream is walked ``page`` entries at a time; ages are measured from ``now_ms``
    (default: Redis's clock now)."""
    flt = flt or DeadLetterFilter()
    now = await server_time_ms(client) if now_ms is None else now_ms
    out: list[DeadLetter] = []
    for dlq in await _dlqs(client, keys, flt):
        want = None if limit is None else limit - len(out)
        if want == 0:
            break
        out += await _walk(client, dlq, flt.id_range(now), lambda letter: flt.matches(letter, keys), want, page)
    return out


def _dlq_of_ref(keys: Keys, ref: str) -> tuple[str, str]:
    head, sep, entry_id = ref.rpartition("/")
    if not sep or not _ENTRY_ID.match(entry_id) or not head.endswith("}") or "{" not in head:
        raise ValueError(f"{ref!r} is not a dead letter id: use TAG/ENTRY_ID as `fabric dlq list` prints it, "
                         "e.g. '{BTC/USD}/1700000000000-0'")
    dlq = keys.dlq(head)  # the key of the tag that ends ``head``, whether ``head`` is the tag or the whole key
    if head not in (dlq, Keys.tag_of(head)):
        raise ValueError(f"{head!r} is not a dead-letter stream of namespace {keys.ns!r}: pass --namespace")
    return dlq, entry_id


async def get(client: Redis, keys: Keys, ref: str) -> DeadLetter:
    """The dead letter named ``TAG/ENTRY_ID``; ``ValueError`` for a malformed name, ``NotFound`` if it is gone."""
    dlq, entry_id = _dlq_of_ref(keys, ref)
    entries: Any = await client.xrange(dlq, min=entry_id, max=entry_id)
    if not entries:
        raise NotFound(f"no dead letter {ref} in namespace {keys.ns!r}: it was replayed or purged, or the id is "
                       "mistyped; `fabric dlq list` shows the ids")
    entry, raw = entries[0]
    return DeadLetter.parse(dlq, entry, raw)


def original_event(letter: DeadLetter) -> Event:
    """The original entry decoded; ``DecodeError`` says why not (unknown type, bad bytes, nothing kept)."""
    return decode_fields({name.encode(): value for name, value in letter.fields.items()})


async def list_dead_letters(client: Redis, keys: Keys, *, count: int = 100) -> list[DeadLetter]:
    """Up to ``count`` dead letters of every dead-letter stream, oldest first within each."""
    return await find(client, keys, limit=count)


async def replay(client: Redis, letter: DeadLetter) -> str | None:
    """Put a dead letter back on its origin stream and delete it; None if it was already replayed (or purged), or
    holds nothing to replay."""
    new_id = await scripts.REPLAY(client, [letter.dlq, letter.origin_stream], [letter.id])
    return new_id.decode() if new_id else None


async def purge(client: Redis, letter: DeadLetter) -> bool:
    """Delete a dead letter for good."""
    return bool(await client.xdel(letter.dlq, letter.id))


Outcome = Literal["replayed", "gone", "no_original", "would_replay"]


class ReplayOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What replaying one dead letter did."""

    id: str
    """The dead letter's ``TAG/ENTRY_ID``."""
    origin_stream: str
    outcome: Outcome
    """``replayed``; ``gone`` (already replayed or purged, possibly by this very call when Redis's reply was lost
    and the client resent it); ``no_original`` (nothing kept to replay, left in place); ``would_replay`` (dry run)."""
    new_entry_id: str | None = None
    """The entry the replay added to the origin stream."""


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay of many dead letters did, in counts and per dead letter."""

    matched: int
    replayed: int
    gone: int
    no_original: int
    dry_run: bool
    letters: list[ReplayOutcome]


class _Pacer:
    """Fixed pacing: call n starts no earlier than n / rate after the first (no burst to catch up after a stall)."""

    def __init__(self, rate_per_s: float | None) -> None:
        self._interval_s = 1 / rate_per_s if rate_per_s else 0.0
        self._next_s: float | None = None

    async def wait(self) -> None:
        if not self._interval_s:
            return
        now = asyncio.get_running_loop().time()
        due = now if self._next_s is None else max(self._next_s, now)
        self._next_s = due + self._interval_s
        if due > now:
            await asyncio.sleep(due - now)


async def _replay_one(client: Redis, letter: DeadLetter, dry_run: bool) -> ReplayOutcome:
    if dry_run:
        outcome: Outcome = "no_original" if not letter.fields else "would_replay"
        return ReplayOutcome(id=letter.ref, origin_stream=letter.origin_stream, outcome=outcome)
    result = await scripts.REPLAY(client, [letter.dlq, letter.origin_stream], [letter.id])
    if result is None:
        return ReplayOutcome(id=letter.ref, origin_stream=letter.origin_stream, outcome="gone")
    if result == 0:
        return ReplayOutcome(id=letter.ref, origin_stream=letter.origin_stream, outcome="no_original")
    return ReplayOutcome(id=letter.ref, origin_stream=letter.origin_stream, outcome="replayed",
                         new_entry_id=result.decode())


async def replay_many(
    client: Redis,
    letters: Sequence[DeadLetter],
    *,
    rate_per_s: float | None = None,
    dry_run: bool = False,
    advance: Callable[[int], None] = lambda n: None,
) -> ReplayReport:
    """Replay dead letters one by one, at most ``rate_per_s`` a second (None or 0: no limit); idempotent.

    A dead letter already gone (replayed or purged since it was found) counts as ``gone`` and writes nothing. With
    ``dry_run`` nothing is written. ``advance(1)`` is called after each one."""
    pacer = _Pacer(None if dry_run else rate_per_s)
    outcomes = []
    for letter in letters:
        await pacer.wait()
        outcomes.append(await _replay_one(client, letter, dry_run))
        advance(1)
    count = {kind: sum(1 for o in outcomes if o.outcome == kind) for kind in ("replayed", "gone", "no_original")}
    return ReplayReport(matched=len(letters), replayed=count["replayed"], gone=count["gone"],
                        no_original=count["no_original"], dry_run=dry_run, letters=outcomes)


class PurgeReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a purge did."""

    matched: int
    purged: int
    gone: int
    """Already replayed or purged since they were found."""


async def purge_many(client: Redis, letters: Sequence[DeadLetter]) -> PurgeReport:
    """Delete dead letters for good, ``PURGE_CHUNK`` ids per XDEL; the dead-letter streams stay registered."""
    by_dlq: dict[str, list[str]] = {}
    for letter in letters:
        by_dlq.setdefault(letter.dlq, []).append(letter.id)
    purged = 0
    for dlq, ids in by_dlq.items():
        for i in range(0, len(ids), PURGE_CHUNK):
            purged += int(await client.xdel(dlq, *ids[i : i + PURGE_CHUNK]))
    return PurgeReport(matched=len(letters), purged=purged, gone=len(letters) - purged)
