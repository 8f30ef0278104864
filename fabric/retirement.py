"""Retiring consumers that dead processes left in a group: idle for long, and holding nothing.

Every process a supervisor restarts joins under a fresh consumer name, so a group collects the names of dead
ones. Their pending entries are reclaimed by the living (``reclaim_idle_ms``); once a dead consumer's pending
list is empty and it has been idle for ``retire_idle_ms``, ``retire.lua`` removes it, checking both in the same
atomic step (removing a consumer drops its pending entries, which would then never be delivered again).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.client import error_code

__all__ = ["retire_idle_consumers"]

log = logging.getLogger("fabric.retirement")


async def retire_idle_consumers(
    client: Redis, streams: Iterable[str], group: str, *, min_idle_ms: int, keep: str = ""
) -> dict[str, list[str]]:
    """Remove, from ``group`` on each stream, the consumers idle at least ``min_idle_ms`` whose pending list is
    empty (never ``keep``); return the names removed per stream. A stream or group that no longer exists is
    skipped."""
    retired: dict[str, list[str]] = {}
    for stream in streams:
        try:
            names = await scripts.RETIRE(client, [stream], [group, min_idle_ms, keep])
        except rex.ResponseError as exc:
            if error_code(exc) == "NOGROUP":
                continue
            raise
        if names:
            retired[stream] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            log.info("retired consumers of group %s on %s, idle over %d ms with nothing pending: %s",
                     group, stream, min_idle_ms, ", ".join(retired[stream]))
    return retired
