"""Lua scripts, one operation each, loaded from the ``.lua`` files beside this module.

Each script's header names its KEYS and ARGV. ``Script`` runs one by SHA and loads it on NOSCRIPT (after a
Redis restart or SCRIPT FLUSH); a script either ran whole or not at all, so the retry is safe.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from fabric.client import Line
from fabric.nodes import ClusterLine, by_slot, is_cluster

__all__ = [
    "ACK", "BREAKER", "CLAIM", "COMMIT", "DEADLETTER", "FAIL", "FENCED_COMMIT", "FENCED_READ", "LEASE",
    "KeyIndex",
    "LEASE_HANDOVER", "LEASE_RELEASE", "LEASE_RENEW", "MEMBERS", "OUTPUTS", "PUBLISH", "RECLAIM", "RELEASE", "REPLAY",
    "RETIRE",
    "SAMPLER", "TAKEOVER", "TOKENS", "TOUCH", "TRIM", "Script",
]

CONCURRENT_CALLS = 64
"""``Script.many`` on a cluster: the calls in flight at once (each holds a connection of the client's pool)."""


class KeyIndex:
    """The KEYS of a script call that names keys by their 1-based index in ARGV: each key listed once."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        """The key's index in KEYS, adding it on first use."""
        i = self._index.get(key)
        if i is None:
            self.keys.append(key)
            i = self._index[key] = len(self.keys)
        return i


class Script:
    """One Lua script, run with EVALSHA."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files(__package__).joinpath(f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: list[str], args: list[Any]) -> Any:
        """Run the script; load it first if the server does not know it."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    async def many(self, client: Redis, calls: list[tuple[list[Any], list[Any]]],
                   errors: bool = False) -> list[Any]:
        """Run the script once per (keys, args), all in one pipelined round trip; return the replies in order
        (loading the script first if the server did not know it: those calls had not run). A call's error reply
        is raised once all have run, or with ``errors`` returned in its place (the others' replies are kept)."""
        if not calls:
            return []
        if is_cluster(client):
            replies = await self._concurrently(client, calls)
        else:
            replies = await self._pipelined(client, calls)
            if any(isinstance(r, NoScriptError) for r in replies):
                await client.script_load(self.source)
                again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                for i, r in zip(again, await self._pipelined(client, [calls[i] for i in again]), strict=True):
                    replies[i] = r
        for r in replies:
            if isinstance(r, Exception) and not errors:
                raise r
        return replies

    async def _concurrently(self, client: Redis, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """The calls each on its first key's node (a cluster's pipeline refuses EVALSHA): a slot's calls one after
        another, in order, as a pipeline runs them; the slots at once, at most ``CONCURRENT_CALLS``. An error
        is returned in its call's place."""
        limit = asyncio.Semaphore(CONCURRENT_CALLS)
        replies: list[Any] = [None] * len(calls)
        # a client's first commands sent at once race in its start-up (redis-py 8.1: a connection of one is
        # closed under another's handshake): it reads the slot map first, once
        await client.initialize()

        async def run(indexes: list[int]) -> None:
            async with limit:
                for i in indexes:
                    try:
                        replies[i] = await self(client, *calls[i])
                    except Exception as exc:  # ``many`` raises it (or returns it) once the other calls have run
                        replies[i] = exc

        slots = by_slot(range(len(calls)), key=lambda i: calls[i][0][0] if calls[i][0] else "")
        await asyncio.gather(*(run(indexes) for indexes in slots))
        return replies

    async def _pipelined(self, client: Redis, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def on(self, line: Line | ClusterLine, keys: list[Any], args: list[Any]) -> Any:
        """Run the script on a ``Line`` or a ``ClusterLine`` (raw reply; on a cluster it runs where its first key
        is served); load it first if the server does not know it (on a cluster: that key's node)."""
        try:
            return await line.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            if isinstance(line, Line) or not keys:
                await line.call("SCRIPT", "LOAD", self.source)
            else:
                await line.call_at(keys[0], "SCRIPT", "LOAD", self.source)
            return await line.call("EVALSHA", self.sha, len(keys), *keys, *args)


ACK = Script("ack")
BREAKER = Script("breaker")
PUBLISH = Script("publish")
COMMIT = Script("commit")
FAIL = Script("fail")
DEADLETTER = Script("deadletter")
TOUCH = Script("touch")
RECLAIM = Script("reclaim")
TRIM = Script("trim")
CLAIM = Script("claim")
REPLAY = Script("replay")
RELEASE = Script("release")
RETIRE = Script("retire")
SAMPLER = Script("sampler")
LEASE = Script("lease")
TOKENS = Script("tokens")
LEASE_RENEW = Script("lease_renew")
LEASE_RELEASE = Script("lease_release")
LEASE_HANDOVER = Script("lease_handover")
TAKEOVER = Script("takeover")
MEMBERS = Script("members")
FENCED_COMMIT = Script("fenced_commit")
FENCED_READ = Script("fenced_read")
OUTPUTS = Script("outputs")
