"""Stream ownership for ordered groups: a lease per stream with a fencing token, and a registry of live members.

In an ordered group each stream (topic × priority × symbol) has at most one owner at a time, which handles its
entries one after another. Ownership is a lease in Redis (``Keys.lease``, in the stream's slot) that expires
after ``ttl_ms`` on Redis's clock unless its owner renews it every ``ttl_ms / 3``::

    free ──acquire──▶ held ──hand_over──▶ releasing ──release, or expiry──▶ free
                       └──────────release, or expiry──────────────────────▶ free

Only the owner renews, marks releasing or releases, and only under its current token. A releasing lease is still
its owner's (it finishes the entry in hand and commits it); nobody else acquires it until it is released or has
expired.

Each acquisition of a free stream draws a new token from the stream's fence counter (``Keys.fence``, no TTL):
tokens only grow and are never reused. A write for an owned stream is applied only if its token is still the
lease's, in the same script (``fenced_commit.lua`` shows the check), so a paused former owner writes nothing once
the stream has moved on. Reads are fenced too (``read``: on a single Redis a transaction watching the leases, on
a cluster ``fenced_read.lua``): an entry read by a stale owner would become pending to it, and the new owner,
reading past it, would break the order. A new owner calls ``take_over`` before reading
new entries: it claims, oldest first, what the former owner had read and not finished, under the new token.

Membership is a zset of member → last heartbeat (``Keys.members``); the live members, with the streams and the
current owners, are what ``balance.balance`` spreads the streams over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import nodes, scripts
from fabric.client import Line
from fabric.keys import Keys

__all__ = [
    "FENCED", "LEASE_TTL_MS", "MEMBER_TTL_MS", "TAKEOVER_COUNT", "WATCHED_READ_ATTEMPTS", "Lease", "Leases",
    "Members", "Read", "Takeover",
    "by_slot", "renew_interval_ms",
]

LEASE_TTL_MS = 3_000
"""How long a lease lives without a renewal (Redis's clock)."""
MEMBER_TTL_MS = 3_000
"""How long a member stays live without a heartbeat (Redis's clock)."""
TAKEOVER_COUNT = 100
"""Pending entries claimed per ``take_over`` call."""
FENCED = -1
"""An entry's status from a fenced write whose token is no longer the stream's (``fenced_commit.lua``)."""


WATCHED_READ_ATTEMPTS = 8
"""Fenced reads on a single Redis aborted in a row (a watched lease changed each time) before ``read`` gives up with
redis-py's ``WatchError`` (the reader retries after a pause); renewals change the leases once a third of a TTL."""


def renew_interval_ms(ttl_ms: int) -> int:
    """How often a holder renews (or a member heartbeats): a third of the TTL, so one late call loses nothing."""
    return max(1, ttl_ms // 3)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raise_any(replies: list[Any]) -> None:
    """Raise the first error reply among a pipeline's (or a transaction's) replies."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def by_slot(streams: Iterable[str], clustered: bool) -> list[list[str]]:
    """Streams grouped by cluster slot (``nodes.by_slot``: a stream's lease and companions share its slot), so one
    script each; on a single Redis, all of them in one group."""
    if not clustered:
        return [names] if (names := list(streams)) else []
    return nodes.by_slot(streams)


class Lease(NamedTuple):
    """A live lease: who owns a stream, under which token, whether it is being handed over, how long it has."""

    stream: str
    owner: str
    token: int
    releasing: bool
    ttl_ms: int


class Read(NamedTuple):
    """What a fenced read found: entries by stream, streams fenced out, and the idle ones' last entry ids."""

    entries: dict[str, list[Any]]
    """(entry id, fields) by stream, oldest first."""
    lost: set[str]
    """Streams whose token is no longer current: nothing was read from them."""
    idle: dict[str, bytes]
    """Streams with nothing new, and their last entry id: XREAD BLOCK from there waits for the next entry."""


class Takeover(NamedTuple):
    """One page of a takeover: entries claimed oldest first, ids found deleted, where the next page starts."""

    entries: list[tuple[bytes, list[bytes], int]]
    """(entry id, fields, delivery count), oldest first."""
    deleted: list[bytes]
    """Entries that were pending but are gone from the stream (trimmed): nothing to handle."""
    after: str | None
    """The ``start`` of the next page; ``None`` when this page was the last."""


class Leases:
    """The lease table of one ordered group: who owns which stream, under which fencing token."""

    def __init__(self, client: Redis, keys: Keys, group: str, *, ttl_ms: int = LEASE_TTL_MS) -> None:
        if ttl_ms < 3:
            raise ValueError(f"lease ttl_ms must be at least 3 (got {ttl_ms}): a holder renews every ttl_ms / 3")
        self.client = client
        self.keys = keys
        self.group = group
        self.ttl_ms = ttl_ms
        self.clustered = nodes.is_cluster(client)
        self._lease_keys: dict[str, str] = {}

    def key(self, stream: str) -> str:
        """The lease key of a stream (what a fenced script gets as its lease KEY; made once: every read names
        every owned stream's)."""
        key = self._lease_keys.get(stream)
        if key is None:
            key = self._lease_keys[stream] = self.keys.lease(self.group, stream)
        return key

    async def acquire(self, stream: str, member: str) -> int | None:
        """Take a free stream; return its new fencing token (the holder's own, if it holds it already), or
        ``None`` while another member holds it, releasing or not."""
        return (await self.acquire_many([stream], member)).get(stream)

    async def acquire_many(self, streams: Iterable[str], member: str,
                           line: Line | nodes.ClusterLine | None = None) -> dict[str, int]:
        """Take the free streams among ``streams`` (``acquire`` each), one call per cluster slot (on ``line``, if
        given, a cluster's slots at once); return the tokens of those taken (or held already)."""
        groups = by_slot(streams, self.clustered)
        calls = [([k for s in names for k in (self.key(s), self.keys.fence(self.group, s))], [member, self.ttl_ms])
                 for names in groups]
        taken: dict[str, int] = {}
        for names, tokens in zip(groups, await self._per_slot(scripts.LEASE, calls, line), strict=True):
            taken.update((s, int(t)) for s, t in zip(names, tokens, strict=True) if int(t))
        return taken

    async def _per_slot(self, script: scripts.Script, calls: list[tuple[list[str], list[Any]]],
                        line: Line | nodes.ClusterLine | None) -> list[Any]:
        """Run ``script`` once per (keys, args), each call's keys in one slot: on a cluster with a ``ClusterLine``,
        pipelined per node, the nodes at once; else one call after another (a single Redis has one call), on
        ``line`` if given."""
        if isinstance(line, nodes.ClusterLine):
            return await nodes.eval_many(line, script, calls)
        if line is not None:
            return [await script.on(line, keys, args) for keys, args in calls]
        return [await script(self.client, keys, args) for keys, args in calls]

    async def renew(self, tokens: Mapping[str, int], member: str,
                    line: Line | nodes.ClusterLine | None = None) -> set[str]:
        """Extend the leases ``member`` holds (stream → token), one call per cluster slot (on ``line``, if given,
        a cluster's slots at once); return those lost."""
        groups = by_slot(tokens, self.clustered)
        calls = [([self.key(s) for s in streams], [member, self.ttl_ms, *(tokens[s] for s in streams)])
                 for streams in groups]
        lost: set[str] = set()
        for streams, kept in zip(groups, await self._per_slot(scripts.LEASE_RENEW, calls, line), strict=True):
            lost.update(s for s, ok in zip(streams, kept, strict=True) if not ok)
        return lost

    async def read(self, tokens: Mapping[str, int], member: str, count: int,
                   line: Line | nodes.ClusterLine | None = None, last: Mapping[str, bytes] | None = None, *,
                   few: bool = False) -> Read:
        """Read up to ``count`` new entries of each stream ``member`` holds (stream → token) as its consumer.

        On a single Redis, a transaction on ``line`` (a connection of its own for the call if none is given)
        watched over the leases (``_watched_read``); ``last`` is the last entry id ``member`` read from each stream,
        where one is known, so that an idle stream's id needs no extra command. On a cluster, ``fenced_read.lua`` once
        per slot (on ``line``, if given, the slots at once). ``few``: a read of one or a few streams (those a wake-up
        named after a quiet spell): ``fenced_read.lua`` on a single Redis too, one round trip where the transaction
        takes two (its per-stream work and Lua tables cost little for so few)."""
        if not self.clustered and not isinstance(line, nodes.ClusterLine) and not few:
            if line is not None:
                return await self._watched_read(tokens, member, count, line, last or {})
            line = Line(self.client)
            try:
                return await self._watched_read(tokens, member, count, line, last or {})
            finally:
                await line.close()
        entries: dict[str, list[Any]] = {}
        lost: set[str] = set()
        idle: dict[str, bytes] = {}
        groups = by_slot(tokens, self.clustered)
        calls = [([k for s in streams for k in (s, self.key(s))],
                  [self.group, member, count, *(tokens[s] for s in streams)]) for streams in groups]
        for streams, replies in zip(groups, await self._per_slot(scripts.FENCED_READ, calls, line), strict=True):
            for stream, reply in zip(streams, replies, strict=True):
                if reply is None:
                    lost.add(stream)
                elif isinstance(reply, bytes):
                    idle[stream] = reply
                else:
                    entries[stream] = reply
        return Read(entries, lost, idle)

    async def _watched_read(self, tokens: Mapping[str, int], member: str, count: int, line: Line,
                            last: Mapping[str, bytes]) -> Read:
        """The fenced read as a transaction, its XREADGROUP in no script: a script's XREADGROUP reply goes through
        Lua tables both ways, which cost Redis about 2.7 µs per entry read (``bench.drain --commandstats``).

        One round trip WATCHes the leases, reads their tokens (``tokens.lua``: one reply for all, where an HGET
        each cost the worker a reply to read per owned stream) and queues, after MULTI, the XREADGROUP of every
        stream (and an XREVRANGE for the last id of those without a ``last``); the next sends EXEC only if every
        token was current (else DISCARD, and again without the lost streams). A lease changed in between (renewed,
        expired, taken) makes EXEC read nothing, and the read is made again. Nothing can run unwatched: on a
        connection lost between the two, EXEC finds no MULTI and fails."""
        lost: set[str] = set()
        live = list(tokens)
        aborted = 0
        while live:
            unknown = [s for s in live if s not in last]
            leases = [self.key(s) for s in live]
            try:
                replies = await line.call_many([
                    ("WATCH", *leases), ("EVALSHA", scripts.TOKENS.sha, len(leases), *leases), ("MULTI",),
                    ("XREADGROUP", "GROUP", self.group, member, "COUNT", count, "STREAMS", *live, *(">" for _ in live)),
                    *(("XREVRANGE", s, "+", "-", "COUNT", 1) for s in unknown),
                ])
                if isinstance(replies[1], rex.NoScriptError):  # (a Redis restarted or flushed): load it, read again
                    await line.call("DISCARD")
                    await line.call("SCRIPT", "LOAD", scripts.TOKENS.source)
                    continue
                _raise_any(replies)
                stale = {s for s, t in zip(live, replies[1], strict=True) if t is None or int(t) != tokens[s]}
                done = await line.call("DISCARD" if stale else "EXEC")
            except BaseException:
                await line.close()  # (never left inside a transaction: the next command would only be queued)
                raise
            if stale:
                lost |= stale
                live = [s for s in live if s not in stale]
                continue
            if done is None:  # a watched lease changed before EXEC: nothing was read
                aborted += 1
                if aborted >= WATCHED_READ_ATTEMPTS:
                    raise rex.WatchError(f"the leases changed under {aborted} fenced reads in a row")
                continue
            _raise_any(done)
            read, *ends = done
            pairs = read.items() if isinstance(read, dict) else read or ()  # RESP3: a map; RESP2: pairs
            entries: dict[str, list[Any]] = {_text(s): got for s, got in pairs if got}
            ids = dict(last)
            ids.update((s, end[0][0] if end else b"0-0") for s, end in zip(unknown, ends, strict=True))
            return Read(entries, lost, {s: ids[s] for s in live if s not in entries})
        return Read({}, lost, {})

    async def release(self, stream: str, member: str, token: int) -> bool:
        """Give a stream up at once; False if ``member`` no longer held it under ``token``."""
        return bool(await scripts.LEASE_RELEASE(self.client, [self.key(stream)], [member, token]))

    async def hand_over(self, stream: str, member: str, token: int) -> bool:
        """Mark a held stream releasing (its owner was told to give it up and finishes the entry in hand first);
        False if ``member`` no longer held it under ``token``."""
        return stream in await self.hand_over_many({stream: token}, member)

    async def hand_over_many(self, tokens: Mapping[str, int], member: str,
                             line: Line | nodes.ClusterLine | None = None) -> set[str]:
        """``hand_over`` the streams ``member`` holds (stream → token), one call per cluster slot (on ``line``, if
        given, a cluster's slots at once); return those marked (the others were no longer held)."""
        groups = by_slot(tokens, self.clustered)
        calls = [([self.key(s) for s in names], [member, *(tokens[s] for s in names)]) for names in groups]
        marked: set[str] = set()
        for names, done in zip(groups, await self._per_slot(scripts.LEASE_HANDOVER, calls, line), strict=True):
            marked.update(s for s, ok in zip(names, done, strict=True) if ok)
        return marked

    async def owners(self, streams: Iterable[str]) -> dict[str, Lease]:
        """The live leases of the given streams (free streams are absent)."""
        names = list(streams)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in names:
                pipe.hmget(self.key(stream), "owner", "token", "releasing")
                pipe.pttl(self.key(stream))
            replies = await pipe.execute()
        leases = {}
        for i, stream in enumerate(names):
            (owner, token, releasing), ttl_ms = replies[2 * i], replies[2 * i + 1]
            if owner is not None and token is not None and ttl_ms > 0:
                leases[stream] = Lease(stream, _text(owner), int(token), releasing is not None, int(ttl_ms))
        return leases

    async def take_over(
        self, stream: str, member: str, token: int, *, after: str = "-", count: int = TAKEOVER_COUNT,
        own: bool = False,
    ) -> Takeover | None:
        """Claim, oldest first, up to ``count`` entries pending in the group on ``stream`` (after ``after``) for
        ``member``, under ``token``; ``None`` when ``token`` is no longer the stream's. Call again with
        ``after=page.after`` until it is ``None``, and handle these entries before reading new ones. ``own``: the
        member takes back what its own failed read may have left pending (its entries keep their delivery count:
        no handler has seen them)."""
        reply = await scripts.TAKEOVER(
            self.client,
            [stream, self.key(stream), self.keys.failures(stream)],
            [self.group, member, token, after, count, 1 if own else 0],
        )
        if reply is None:
            return None
        claimed, deleted, last = reply
        entries = [(entry_id, fields, int(n)) for entry_id, fields, n in claimed]
        more = len(claimed) + len(deleted) >= count
        return Takeover(entries, list(deleted), "(" + _text(last) if more else None)


class Members:
    """The registry of an ordered group's live members, on Redis's clock."""

    def __init__(self, client: Redis, keys: Keys, group: str, *, ttl_ms: int = MEMBER_TTL_MS) -> None:
        self.client = client
        self.key = keys.members(group)
        self.ttl_ms = ttl_ms

    async def heartbeat(self, member: str) -> list[str]:
        """Record that ``member`` is alive (drop members silent for ``ttl_ms``); return the live ones, sorted."""
        return sorted(_text(m) for m in await scripts.MEMBERS(self.client, [self.key], [self.ttl_ms, member]))

    async def live(self) -> list[str]:
        """The members heard from within ``ttl_ms``, sorted (writes nothing)."""
        return sorted(_text(m) for m in await scripts.MEMBERS(self.client, [self.key], [self.ttl_ms, ""]))

    async def leave(self, member: str) -> None:
        """Remove ``member`` at once (a clean stop), so its streams move without waiting for its TTL."""
        await self.client.zrem(self.key, member)
