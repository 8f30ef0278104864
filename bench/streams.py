"""What Redis itself says about a run's streams: entries stored, pending in the group, not yet delivered."""

from __future__ import annotations

from collections.abc import Iterable

from redis.asyncio import Redis

from fabric import Keys, Priority

__all__ = ["pending", "registered", "stored", "undelivered"]


async def registered(client: Redis, keys: Keys, topic: str, priority: Priority | None = None) -> list[str]:
    """The stream keys of a topic (its registry set), optionally of one priority only."""
    members = sorted(m.decode() for m in await client.smembers(keys.topic_registry(topic)))
    if priority is None:
        return members
    return [m for m in members if keys.parse_stream(m).priority == priority]


async def stored(client: Redis, streams: Iterable[str]) -> int:
    """Entries in the streams (sum of XLEN)."""
    async with client.pipeline(transaction=False) as pipe:
        for s in streams:
            pipe.xlen(s)
        return sum(await pipe.execute())


async def pending(client: Redis, streams: Iterable[str], group: str) -> int:
    """Entries delivered to the group and not acknowledged (sum of XPENDING's count)."""
    async with client.pipeline(transaction=False) as pipe:
        for s in streams:
            pipe.xpending(s, group)
        return sum(int(reply["pending"]) for reply in await pipe.execute())


async def undelivered(client: Redis, streams: Iterable[str], group: str) -> int:
    """Entries the group has not read yet (sum of XINFO GROUPS ``lag``, Redis 7); -1 if Redis cannot tell, or
    the group does not exist yet on one of the streams."""
    async with client.pipeline(transaction=False) as pipe:
        for s in streams:
            pipe.xinfo_groups(s)
        replies = await pipe.execute()
    total = 0
    for groups in replies:
        lags = [g.get("lag") for g in groups if _text(g["name"]) == group]
        if not lags or lags[0] is None:
            return -1
        total += int(lags[0])
    return total


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
