"""Retention: trim a topic's streams by count and age without removing what a group has not acknowledged.

Redis 7.0's XTRIM knows nothing of consumer groups, so ``trim.lua`` finds, atomically, the oldest entry some
group still needs (its first pending entry, or the first one after its last-delivered id) and never trims
past it. Only ``hard_max_len`` may drop such entries, and every one it drops is counted in ``ns:counters``.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from fabric import scripts
from fabric.config import Retention
from fabric.keys import Keys

__all__ = ["TrimResult", "trim_stream", "trim_topic"]

log = logging.getLogger("fabric.retention")

TRIM_STEP = 10_000

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
