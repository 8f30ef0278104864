"""Dead letters: entries a group gave up on, kept with their error and original fields.

A dead letter lives in ``ns:dlq:TAG``, the slot of its origin stream, so that moving an entry there and
acknowledging it is one atomic script (``deadletter.lua``), and so is replaying it (``replay.lua``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from fabric import scripts
from fabric.keys import Keys

__all__ = ["DeadLetter", "list_dead_letters", "move", "purge", "replay"]

MAX_ERROR_CHARS = 2_000


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
    """The original entry's fields, byte for byte."""

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
        )


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
) -> bytes | None:
    """Dead-letter one pending entry and ack it atomically; None if this consumer no longer owns it.

    The dead-letter stream is added to ``keys.dlq_registry()`` first, unless it is in ``registered`` (a cache the
    caller keeps, so that a worker pays that round trip once per dead-letter stream)."""
    dlq = keys.dlq(stream)
    if registered is None or dlq not in registered:
        await client.sadd(keys.dlq_registry(), dlq)
        if registered is not None:
            registered.add(dlq)
    result: bytes | None = await scripts.DEADLETTER(
        client,
        [stream, keys.failures(stream), dlq],
        [group, consumer, entry_id, handler, error_type, error[:MAX_ERROR_CHARS], deliveries],
    )
    return result


async def list_dead_letters(client: Redis, keys: Keys, *, count: int = 100) -> list[DeadLetter]:
    """Up to ``count`` dead letters of every dead-letter stream, oldest first within each."""
    out: list[DeadLetter] = []
    registry: Any = await client.smembers(keys.dlq_registry())
    for dlq in sorted(registry):
        name = dlq.decode()
        entries: Any = await client.xrange(name, count=count - len(out))
        for entry_id, raw in entries:
            out.append(DeadLetter.parse(name, entry_id, raw))
        if len(out) >= count:
            break
    return out


async def replay(client: Redis, letter: DeadLetter) -> str | None:
    """Put a dead letter back on its origin stream and delete it; None if it was already replayed."""
    new_id = await scripts.REPLAY(client, [letter.dlq, letter.origin_stream], [letter.id])
    return new_id.decode() if new_id else None


async def purge(client: Redis, letter: DeadLetter) -> bool:
    """Delete a dead letter for good."""
    return bool(await client.xdel(letter.dlq, letter.id))
