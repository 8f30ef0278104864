"""The gauges read from Redis rather than counted: a group's lag, pending entries and oldest pending age per topic
and priority, the namespace's dead letters, and its breakers.

One process per group does it, fleet-wide, at a modest rate: the worker process holding the group's lease
(``Keys.sampler``, SET NX PX on Redis's clock) samples every ``interval_ms``; the others only renew their bid. The
namespace's gauges have a lease of their own, so they are not sampled once per group. Only the lease holder exports
these gauges, so dashboards and alerts aggregate them without the instance label (max or sum by group).

The lease is taken, renewed and dropped by ``sampler.lua``, atomically. A round that fails exports nothing until
the next one succeeds: stale gauges would look like live ones. A lane whose lag Redis cannot tell (XINFO GROUPS
reports null lag after some deletions and trims) exports no lag rather than a made-up 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.breaker import CLOSED, HALF_OPEN, OPEN, list_breakers
from fabric.client import raise_if_cancelled
from fabric.errors import FabricError
from fabric.families import Series
from fabric.inspection import _text
from fabric.inspection import _timed as timed
from fabric.keys import Keys

__all__ = ["SAMPLE_INTERVAL_MS", "Sampler", "lease"]

log = logging.getLogger("fabric.sampler")

SAMPLE_INTERVAL_MS = 5_000
LEASE_INTERVALS = 3
"""A lease lives this many intervals: a sampler that died is replaced within about that long."""
BREAKER_STATES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


async def lease(client: Redis, key: str, owner: str, ttl_ms: int) -> bool:
    """Take or renew the lease ``key`` for ``owner``; True if ``owner`` holds it now."""
    return bool(await scripts.SAMPLER(client, [key], ["hold", owner, ttl_ms]))


class Sampler:
    """Samples one group's streams (``streams()``) while holding its lease; iterate it for the current series."""

    def __init__(self, client: Redis, keys: Keys, group: str, owner: str, streams: Callable[[], Sequence[str]], *,
                 interval_ms: int = SAMPLE_INTERVAL_MS, namespace_gauges: bool = True) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.owner = owner
        self.streams = streams
        self.interval_ms = interval_ms
        self.namespace_gauges = namespace_gauges
        self.series: list[Series] = []

    def __iter__(self) -> Iterator[Series]:
        return iter(self.series)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every ``interval_ms`` until ``stop``; Redis errors are logged and the next round tries again."""
        while not stop.is_set():
            try:
                await self.sample()
            except (FabricError, rex.RedisError, OSError) as exc:
                raise_if_cancelled(exc)
                self.series = []
                log.warning("sampling group %s for metrics failed (next try in %d ms): %s", self.group,
                            self.interval_ms, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_ms / 1000)
        with contextlib.suppress(rex.RedisError, OSError):
            await self._give_up()

    async def sample(self) -> None:
        """One round: the group's gauges if we hold its lease, the namespace's if we hold that one."""
        ttl = self.interval_ms * LEASE_INTERVALS
        series: list[Series] = []
        if await lease(self.client, self.keys.sampler(self.group), self.owner, ttl):
            series += await self._group_series()
        if self.namespace_gauges and await lease(self.client, self.keys.sampler(), self.owner, ttl):
            series += await self._namespace_series()
        self.series = series

    async def _give_up(self) -> None:
        """Hand the leases on at once (a draining worker): the next sampler need not wait for them to expire."""
        for key in (self.keys.sampler(self.group), self.keys.sampler()):
            await scripts.SAMPLER(self.client, [key], ["drop", self.owner])

    async def _group_series(self) -> list[Series]:
        streams = list(self.streams())
        now_ms, replies = await timed(self.client, [c for s in streams for c in (("xinfo_groups", s),
                                                                                 ("xpending", s, self.group))])
        lanes: dict[tuple[str, str], list[int | None]] = {}  # (topic, priority) -> [lag, pending, oldest ms]
        for i, stream in enumerate(streams):
            groups, pending = replies[2 * i], replies[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(pending, Exception):
                continue  # the stream or group went away since the worker joined: nothing to count there
            ref = self.keys.parse_stream(stream)
            lane = lanes.setdefault((ref.topic, ref.priority.label), [0, 0, now_ms])
            for g in groups:
                if _text(g["name"]) == self.group:
                    lag = g.get("lag")
                    lane[0] = None if lag is None or lane[0] is None else lane[0] + int(lag)
                    lane[1] = int(g["pending"]) + (lane[1] or 0)
            if pending and pending.get("min"):
                lane[2] = min(lane[2] or now_ms, int(_text(pending["min"]).split("-")[0]))
        out = []
        for (topic, priority), (lag, count, oldest_ms) in sorted(lanes.items()):
            labels = (self.group, topic, priority)
            if lag is not None:
                out.append(Series("fabric_consumer_lag", labels, lag))
            out += [Series("fabric_pending_events", labels, count or 0),
                    Series("fabric_oldest_pending_age_seconds", labels, max(0, now_ms - (oldest_ms or now_ms)) / 1000)]
        return out

    async def _namespace_series(self) -> list[Series]:
        dlqs = sorted(await self.client.smembers(self.keys.dlq_registry()))
        _, lengths = await timed(self.client, [("xlen", d) for d in dlqs])
        depth = sum(n for n in lengths if isinstance(n, int))
        out = [Series("fabric_dead_letters", (), depth)]
        for info in await list_breakers(self.client, self.keys, transitions=0):
            out.append(Series("fabric_breaker_state", (info.name,), BREAKER_STATES.get(info.state, 0)))
            out.append(Series("fabric_breaker_transitions_total", (info.name,), info.generation))
        return out
