"""Retention: trim a topic's streams by count and age without removing what a group has not acknowledged.

Redis 7.0's XTRIM knows nothing of consumer groups, so ``trim.lua`` finds, atomically, the oldest entry some
group still needs (its first pending entry, or the first one after its last-delivered id) and never trims
past it. Only ``hard_max_len`` may drop such entries, and every one it drops is counted in ``ns:counters``.

``plan_stream`` says what ``trim_stream`` would do now without writing anything: it reads the same facts
(length, Redis's clock, each group's last-delivered id and pending entries) and applies the same rules, so
``fabric trim`` can show the plan before it asks. (A dry-run argument to ``trim.lua`` would keep the rules in one
place; until then the tests hold the two to the same answers.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

from redis.asyncio import Redis

from fabric import scripts
from fabric.config import Retention
from fabric.keys import Keys

__all__ = ["TrimPlan", "TrimResult", "plan_stream", "trim_stream", "trim_topic"]

log = logging.getLogger("fabric.retention")

TRIM_STEP = 10_000
PLAN_PAGE = 1_000

TrimResult = tuple[int, int]  # entries removed, unacknowledged entries dropped by the hard cap


async def trim_stream(client: Redis, keys: Keys, stream: str, retention: Retention) -> TrimResult:
    """Apply ``retention`` to one stream now; loop until nothing more may go."""
    removed = dropped = 0
    while True:
        r, d = await scripts.TRIM(
            client, [stream], [retention.max_len, retention.max_age_ms, retention.hard_max_len, TRIM_STEP]
        )
        removed, dropped = removed + int(r), dropped + int(d)
        if int(r) < TRIM_STEP:
            break
    if dropped:
        await client.hincrby(keys.counters(), f"dropped_by_cap:{stream}", dropped)
        log.warning("hard cap on %s dropped %d entries some group had not acknowledged", stream, dropped)
    return removed, dropped


async def trim_topic(client: Redis, keys: Keys, topic: str, retention: Retention) -> TrimResult:
    """Apply ``retention`` to every stream of a topic."""
    removed = dropped = 0
    members: Any = await client.smembers(keys.topic_registry(topic))
    for stream in sorted(members):
        r, d = await trim_stream(client, keys, stream.decode(), retention)
        removed, dropped = removed + r, dropped + d
    return removed, dropped


class TrimPlan(NamedTuple):
    """What trimming one stream now would do."""

    length: int
    remove: int
    """Entries that would go."""
    held_back: int
    """Entries the count or age rule would remove, kept because some group has not acknowledged them."""
    drop: int
    """Unacknowledged entries the hard cap would drop (counted in ``ns:counters`` when it does)."""


_Id = tuple[int, int]


def _id(raw: bytes | str) -> _Id:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


class _Groups(NamedTuple):
    safe: _Id | None
    """Entries below this id are acknowledged by every group (None: no groups)."""
    last_delivered: list[_Id]
    pending: set[_Id]
    """Pending entries among the first ``hard`` of the stream (only fetched for the hard cap)."""


async def _groups(client: Redis, stream: str, hard: int) -> _Groups:
    """Each group's bound as trim.lua computes it: the first pending entry, else the one after last-delivered."""
    safe: _Id | None = None
    delivered: list[_Id] = []
    pending: set[_Id] = set()
    info: Any = await client.xinfo_groups(stream)
    for group in info:
        last = _id(group["last-delivered-id"])
        delivered.append(last)
        bound = (last[0], last[1] + 1)
        if int(group["pending"]) > 0:
            summary: Any = await client.xpending(stream, group["name"])
            bound = min(bound, _id(summary["min"]))
            if hard:
                held: Any = await client.xpending_range(stream, group["name"], min="-", max="+", count=hard)
                pending.update(_id(p["message_id"]) for p in held)
        safe = bound if safe is None else min(safe, bound)
    return _Groups(safe, delivered, pending)


async def _oldest_ids(client: Redis, stream: str) -> AsyncGenerator[_Id, None]:
    """The stream's entry ids from the oldest, a page at a time."""
    low = "-"
    while True:
        page: Any = await client.xrange(stream, low, "+", count=PLAN_PAGE)
        for entry_id, _ in page:
            yield _id(entry_id)
        if len(page) < PLAN_PAGE:
            return
        low = "(" + page[-1][0].decode()


async def _age_cut(client: Redis, max_age_ms: int) -> _Id | None:
    if not max_age_ms:
        return None
    now: Any = await client.time()  # Redis's clock, as trim.lua uses
    seconds, micros = now
    return max(0, int(seconds) * 1000 + int(micros) // 1000 - max_age_ms), 0


async def plan_stream(client: Redis, stream: str, retention: Retention) -> TrimPlan:
    """What ``trim_stream`` would remove from ``stream`` now, and what it keeps for groups; writes nothing."""
    length = int(await client.xlen(stream))
    if not length:  # empty, or deleted while its topic's registry still names it: nothing to plan
        return TrimPlan(0, 0, 0, 0)
    by_count = max(0, length - retention.max_len) if retention.max_len else 0
    by_cap = max(0, length - retention.hard_max_len) if retention.hard_max_len else 0
    age_cut = await _age_cut(client, retention.max_age_ms)
    groups = await _groups(client, stream, by_cap)
    remove = held_back = drop = 0
    index = 0
    async for entry in _oldest_ids(client, stream):  # only the prefix that some rule reaches is read
        wanted = index < by_count or (age_cut is not None and entry < age_cut)
        forced = index < by_cap
        if not (wanted or forced):
            break
        needed = groups.safe is not None and entry >= groups.safe
        if forced and needed and (entry in groups.pending or any(entry > d for d in groups.last_delivered)):
            drop += 1
        if forced or not needed:
            remove += 1
        else:
            held_back += 1
        index += 1
    return TrimPlan(length, remove, held_back, drop)
