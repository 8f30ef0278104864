"""Start-up checks: can this Redis, as this user, serve a worker or a producer? If not, one line that says why.

Permissions. Each command a worker or producer will send is queued, with the keys it will name, between MULTI
and DISCARD: Redis checks a queued command's ACL (command, subcommand, keys, channels) as it queues it, so a
missing permission is refused there while nothing runs and nothing is written. That needs ``+multi +discard``
(deploy/acl grants them); a user without them is warned once and the check skipped (the first refused command
then fails at run time, as before). Scripts are checked as EVALSHA on their keys plus each command they run,
which Redis checks against the same user.

Eviction. A worker refuses a Redis whose ``maxmemory-policy`` is not ``noeviction``: evicting deletes stream
entries, pending lists and producers' sequence hashes without a word, which loses acknowledged events or
writes them twice. With ``noeviction`` a full Redis refuses writes instead, and fabric says so loudly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.client import Line, error_code, read_timeout_s, redact, resolve_url
from fabric.config import WorkerConfig
from fabric.errors import PermissionDenied, RedisMisconfigured
from fabric.keys import Keys, Priority
from fabric.nodes import is_cluster

__all__ = ["Probe", "check_eviction", "check_publisher", "check_worker", "publisher_needs", "refused",
           "worker_needs"]

log = logging.getLogger("fabric.preflight")

FIX = "grant them to the Redis user (deploy/acl/users.acl has least-privilege worker and producer users)"
PROBE_TOPIC = "preflight"
"""The topic a producer's check names when it is not told which topics it will publish to."""


class Probe(NamedTuple):
    """One command as fabric sends it, and the keys (or channels) it names, for the message."""

    args: tuple[str, ...]
    keys: tuple[str, ...] = ()


def _p(*args: str, keys: Sequence[str] = ()) -> Probe:
    return Probe(args, tuple(keys))


def _stream_of(keys: Keys, topic: str) -> str:
    return keys.stream(topic, Priority.NORMAL, None)


def publisher_needs(keys: Keys, topics: Sequence[str] = (PROBE_TOPIC,), *, dedup: bool = False) -> list[Probe]:
    """What a producer sends for each topic: publish.lua (and what it runs) and the topic's registry."""
    probes = [_p("PING"), _p("SCRIPT", "LOAD", scripts.PUBLISH.source)]
    for topic in topics:
        s = _stream_of(keys, topic)
        p = keys.producers(s)
        marks = [keys.dedup(s, "preflight")] if dedup else []
        probes += [
            _p("EVALSHA", scripts.PUBLISH.sha, str(2 + len(marks)), s, p, *marks, keys=(s, p, *marks)),
            _p("XADD", s, "*", "type", "x", keys=(s,)),
            _p("HGET", p, "x", keys=(p,)), _p("HSET", p, "x", "1", keys=(p,)), _p("HLEN", p, keys=(p,)),
            _p("HKEYS", p, keys=(p,)), _p("HDEL", p, "x", keys=(p,)), _p("PEXPIRE", p, "1", keys=(p,)),
            _p("TIME"),
            _p("SADD", keys.topic_registry(topic), s, keys=(keys.topic_registry(topic),)),
        ]
        probes += [_p("SET", m, "1", "NX", "PX", "1", keys=(m,)) for m in marks]
    return probes


def worker_needs(keys: Keys, config: WorkerConfig, consumer: str, *, cluster: bool = False) -> list[Probe]:
    """What a worker of ``config`` sends for each of its topics: discovery, reads, its scripts (and what they
    run), dead letters, and the extras its retention, retirement and breakers turn on (``cluster``: on a Redis
    Cluster, where the ordered mode reads with a script, not a watched transaction)."""
    g, c = config.group, consumer
    probes = [_p("PING"), _p("SCRIPT", "LOAD", scripts.ACK.source)]
    for topic in config.topics:
        s = _stream_of(keys, topic)
        f, d, reg = keys.failures(s), keys.dlq(s), keys.topic_registry(topic)
        probes += [
            _p("SMEMBERS", reg, keys=(reg,)), _p("SADD", reg, s, keys=(reg,)),
            _p("XGROUP", "CREATE", s, g, "0", "MKSTREAM", keys=(s,)),
            _p("XREADGROUP", "GROUP", g, c, "COUNT", "1", "STREAMS", s, ">", keys=(s,)),
            _p("EVALSHA", scripts.COMMIT.sha, "3", s, f, d, keys=(s, f, d)),
            _p("XACK", s, g, "0-1", keys=(s,)), _p("XADD", s, "*", "type", "x", keys=(s,)),
            _p("XPENDING", s, g, keys=(s,)), _p("XCLAIM", s, g, c, "0", "0-1", keys=(s,)),
            _p("XAUTOCLAIM", s, g, c, "0", "0-0", keys=(s,)), _p("XRANGE", s, "-", "+", keys=(s,)),
            _p("HGET", f, "x", keys=(f,)), _p("HSET", f, "x", "y", keys=(f,)), _p("HDEL", f, "x", keys=(f,)),
            _p("XADD", d, "*", "type", "x", keys=(d,)), _p("SADD", keys.dlq_registry(), d, keys=(keys.dlq_registry(),)),
            _p("HINCRBY", keys.counters(), "x", "1", keys=(keys.counters(),)), _p("TIME"),
        ]
        if config.ordered and not cluster:  # a single Redis's fenced read (``Leases.read``): a watched transaction
            lease = keys.lease(g, s)
            probes += [_p("WATCH", lease, keys=(lease,)), _p("HGET", lease, "token", keys=(lease,)), _p("EXEC"),
                       _p("XREVRANGE", s, "+", "-", "COUNT", "1", keys=(s,))]
        if topic in config.retention:
            probes += [_p("XTRIM", s, "MAXLEN", "0", keys=(s,)), _p("XINFO", "GROUPS", s, keys=(s,)),
                       _p("XLEN", s, keys=(s,))]
        if config.retire_idle_ms:
            probes += [_p("XINFO", "CONSUMERS", s, g, keys=(s,)), _p("XGROUP", "DELCONSUMER", s, g, c, keys=(s,)),
                       _p("EXISTS", s, keys=(s,))]
    for b in config.breakers:
        state, window, events, channel = (keys.breaker(b.name), keys.breaker_window(b.name), keys.breaker_events(),
                                          keys.breaker_channel())
        probes += [
            _p("SADD", keys.breaker_registry(), b.name, keys=(keys.breaker_registry(),)),
            _p("EVALSHA", scripts.BREAKER.sha, "3", state, window, events, keys=(state, window, events)),
            _p("HGETALL", state, keys=(state,)), _p("HSET", state, "x", "y", keys=(state,)),
            _p("HINCRBY", window, "x", "1", keys=(window,)), _p("PEXPIRE", window, "1", keys=(window,)),
            _p("XADD", events, "*", "type", "x", keys=(events,)),
            _p("PUBLISH", channel, b.name, keys=(channel,)), _p("SUBSCRIBE", channel, keys=(channel,)),
        ]
    return probes


async def refused(client: Redis, probes: Sequence[Probe]) -> list[str] | None:
    """The permissions Redis's ACL would refuse ``probes``, one phrase each (``+xadd``, ``keys a, b (HSET)``), none
    run; None when the check cannot run (the user may not MULTI/DISCARD). Other refusals (OOM at maxmemory, a
    renamed command, a key another cluster node serves) are not about permissions and are left to the commands
    themselves. On a cluster every primary is asked (each has its own ACLs; Redis checks a command's ACL before
    it redirects it, so every probe is checked on every node)."""
    lines = await _lines(client)
    try:
        found = await asyncio.gather(*(_refused_on(line, probes) for line in lines))
    finally:
        for line in lines:
            await line.close()
    if any(missing is None for missing in found):
        return None
    return list(dict.fromkeys(phrase for missing in found for phrase in missing or ()))


async def _refused_on(line: Line, probes: Sequence[Probe]) -> list[str] | None:
    missing: dict[str, None] = {}  # ordered, without repeats
    for probe in probes:
        if probe.args == ("EXEC",):  # (inside the check's MULTI it would run the probes: asked outside, it runs
            await _ask(line, probe, missing)  # nothing and answers "EXEC without MULTI", or NOPERM)
    try:
        await line.call("MULTI")
    except rex.ResponseError as exc:
        if _denied(exc):
            return None
        raise
    for probe in probes:
        if probe.args != ("EXEC",):
            await _ask(line, probe, missing)
    await line.call("DISCARD")
    return list(missing)


async def _ask(line: Line, probe: Probe, missing: dict[str, None]) -> None:
    try:
        await line.call(*probe.args)
    except rex.ResponseError as exc:
        # Redis checks ACLs before anything else that refuses a queued command (at maxmemory every one is refused
        # OOM; WATCH is refused inside MULTI): only NOPERM is a missing permission
        if _denied(exc):
            missing[_phrase(probe, exc)] = None


async def _lines(client: Redis) -> list[Line]:
    """A connection of its own to the Redis, or to each primary of a cluster (whose ACLs and config are each
    node's own)."""
    if not is_cluster(client):
        return [Line(client)]
    await client.initialize()
    timeout_s = read_timeout_s(client)
    return [Line.on(node.connection_class(**dict(node.connection_kwargs, socket_timeout=None)), timeout_s)
            for node in client.get_primaries()]  # type: ignore[attr-defined]


def _settings(client: Redis) -> dict[str, Any]:
    """The connection settings (host, port, username...) of the client, a single Redis's or a cluster's."""
    pool = getattr(client, "connection_pool", None)
    return dict(pool.connection_kwargs if pool is not None else client.get_connection_kwargs())  # type: ignore[no-untyped-call]


def _denied(exc: rex.ResponseError) -> bool:
    return isinstance(exc, rex.NoPermissionError) or error_code(exc) == "NOPERM"


def _where(client: Redis, url: str | None) -> str:
    if url is not None:
        return redact(resolve_url(url))
    if is_cluster(client):
        return f"the cluster of {client.get_default_node().name}"  # type: ignore[attr-defined]
    kwargs = _settings(client)
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _phrase(probe: Probe, exc: rex.ResponseError) -> str:
    """What a refused probe lacks: the command, a key or a channel (Redis says which kind, not which one)."""
    text = str(exc)
    name = probe.args[0] if probe.args[0] not in ("XGROUP", "XINFO", "SCRIPT") else " ".join(probe.args[:2])
    if "channel" in text:
        return f"channel {', '.join(probe.keys)} ({name})"
    if "key" in text:
        return f"keys {', '.join(probe.keys)} ({name})"
    return "+" + name.lower().replace(" ", "|")


async def _check(client: Redis, probes: Sequence[Probe], role: str, url: str | None) -> None:
    missing = await refused(client, probes)
    user = _settings(client).get("username") or "default"
    where = _where(client, url)
    if missing is None:
        log.warning("cannot check the Redis user %r's permissions at %s (it may not MULTI/DISCARD): a missing one "
                    "will fail at its first use; grant +multi +discard to check at start", user, where)
        return
    if missing:
        commands = " ".join(m for m in missing if m.startswith("+"))
        rest = [m for m in missing if not m.startswith("+")]
        what = "; ".join([*([f"commands {commands}"] if commands else []), *rest])
        raise PermissionDenied(f"the Redis user {user!r} at {where} lacks what a {role} needs: {what}: {FIX}")


async def check_publisher(client: Redis, keys: Keys, topics: Sequence[str] = (PROBE_TOPIC,), *,
                          dedup: bool = False, url: str | None = None) -> None:
    """Raise ``PermissionDenied`` naming everything a producer for ``topics`` may not do."""
    await _check(client, publisher_needs(keys, topics, dedup=dedup), "producer", url)


async def check_worker(client: Redis, keys: Keys, config: WorkerConfig, consumer: str, *,
                       url: str | None = None) -> None:
    """Raise ``PermissionDenied`` naming everything the worker may not do, or ``RedisMisconfigured`` if Redis
    evicts keys."""
    await _check(client, worker_needs(keys, config, consumer, cluster=is_cluster(client)),
                 f"worker of group {config.group!r}", url)
    await check_eviction(client, url=url)


async def check_eviction(client: Redis, *, url: str | None = None) -> None:
    """Raise ``RedisMisconfigured`` unless Redis's ``maxmemory-policy`` is ``noeviction``."""
    policy = await _eviction_policy(client)
    where = _where(client, url)
    if policy is None:
        log.warning("cannot read maxmemory-policy at %s (the user may run neither INFO nor CONFIG GET): make sure "
                    "it is noeviction, or grant +info to check at start", where)
    elif policy != "noeviction":
        raise RedisMisconfigured(
            f"Redis at {where} evicts keys when full (maxmemory-policy {policy}): it would silently drop stream "
            "entries and producers' sequence state, losing or doubling events; set maxmemory-policy noeviction "
            "(CONFIG SET maxmemory-policy noeviction, and in redis.conf) so that a full Redis refuses writes instead"
        )


async def _eviction_policy(client: Redis) -> str | None:
    """The ``maxmemory-policy`` (on a cluster: a primary's that evicts, if any), or None if it cannot be read."""
    lines = await _lines(client)
    try:
        policies = await asyncio.gather(*(_eviction_policy_on(line) for line in lines))
    finally:
        for line in lines:
            await line.close()
    known = [p for p in policies if p is not None]
    return next((p for p in known if p != "noeviction"), known[0] if known else None)


async def _eviction_policy_on(line: Line) -> str | None:
    for command in (("INFO", "memory"), ("CONFIG", "GET", "maxmemory-policy")):
        try:
            reply = await line.call(*command)
        except rex.ResponseError as exc:
            if _denied(exc):
                continue
            raise
        if isinstance(reply, bytes):  # INFO: "field:value" lines
            for row in reply.decode().splitlines():
                if row.startswith("maxmemory_policy:"):
                    return row.split(":", 1)[1].strip()
        elif isinstance(reply, list) and len(reply) == 2:  # CONFIG GET: [name, value] (RESP2)
            return bytes(reply[1]).decode()
        elif isinstance(reply, dict):  # RESP3
            return bytes(next(iter(reply.values()))).decode()
    return None
