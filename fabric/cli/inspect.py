"""Commands that look without touching: ``streams``, ``groups``, ``consumers``, ``pending``, ``health``.

Each parses its filters, calls one function of ``fabric.inspection`` and prints a table, or JSON with ``--json``
(a list of objects; times as Unix ``*_ms``, ages and idle times as ``*_ms``, null for unknown). None of them
starts a private Redis: an empty one would show nothing. A ``--topic``, ``--group`` or ``--consumer`` naming
nothing that exists exits 5; one that exists but has no rows prints an empty table (``[]``) and exits 0.
``health`` is for probes: it exits 1 for every reason not to be healthy, an unreachable Redis and wrong
credentials included (only bad options or a bad config file exit 2, as for every command).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, TypeVar

import typer

from fabric import inspection
from fabric.cli.options import (
    ConfigFile,
    Exit,
    Json,
    Namespace,
    RedisUrl,
    app,
    example,
    fail,
    on_redis,
    run,
    settings,
)
from fabric.cli.output import age, emit_json, table, timestamp
from fabric.client import connect, redact
from fabric.keys import Keys, Priority

__all__ = ["consumers", "groups", "health", "pending", "streams"]

T = TypeVar("T")

Topics = Annotated[list[str] | None, typer.Option("--topic", metavar="TOPIC",
                                                  help="Only this topic (repeat for several).")]
Groups = Annotated[list[str] | None, typer.Option("--group", metavar="GROUP",
                                                  help="Only this consumer group (repeat for several).")]
MaxIdle = Annotated[int, typer.Option(min=1, help="A consumer idle this long (no read, no claim) is not consuming.")]


def _lag(value: int | None) -> int | str:
    return "unknown" if value is None else value


def _priority(value: str | None) -> Priority | None:
    try:
        return Priority.parse(value) if value is not None else None
    except ValueError as exc:
        fail(str(exc), Exit.USAGE)


@app.command(epilog=example("fabric streams", "fabric streams --topic tick --priority high",
                            "fabric streams --symbol BTC/USD --json"))
def streams(
    topic: Topics = None,
    symbol: Annotated[str | None, typer.Option(help="Only this symbol's streams.")] = None,
    priority: Annotated[str | None, typer.Option(help="Only this priority: low, normal, high or critical.")] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    as_json: Json = False,
) -> None:
    """Every stream: topic, priority, symbol, length, first and last entry, groups, lag and pending."""
    prio = _priority(priority)
    s = settings(config_file, redis_url, namespace)
    rows = on_redis(s.url, lambda c: inspection.streams(c, s.keys, topics=topic or (), symbol=symbol, priority=prio))
    if as_json:
        emit_json(rows)
        return
    table(["topic", "priority", "symbol", "length", "first entry", "last entry", "groups", "lag", "pending"],
          [[r.topic, r.priority, r.symbol, r.length, timestamp(r.first_ms) if r.exists else "(stream gone)",
            timestamp(r.last_ms),
            [g.group for g in r.groups], _lag(r.lag), r.pending] for r in rows], empty="(no streams)")


@app.command(epilog=example("fabric groups", "fabric groups --topic tick --group indicators --json"))
def groups(
    topic: Topics = None,
    group: Groups = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    as_json: Json = False,
) -> None:
    """Every consumer group per topic: streams, consumers, pending, lag and last delivery."""
    s = settings(config_file, redis_url, namespace)
    rows = on_redis(s.url, lambda c: inspection.groups(c, s.keys, topics=topic or (), groups=group or ()))
    if as_json:
        emit_json(rows)
        return
    table(["group", "topic", "streams", "consumers", "pending", "lag", "last delivered"],
          [[r.group, r.topic, r.streams, r.consumers, r.pending, _lag(r.lag), timestamp(r.last_delivered_ms)]
           for r in rows], empty="(no groups)")


@app.command(epilog=example("fabric consumers", "fabric consumers --group indicators --json",
                            "fabric consumers --group bars --owned"))
def consumers(
    topic: Topics = None,
    group: Groups = None,
    owned: Annotated[bool, typer.Option(
        "--owned", help="Ordered groups: one row per stream, with its owner, fencing token and lease time left.")
    ] = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    as_json: Json = False,
) -> None:
    """Every consumer per group: pending, idle time, last seen, (Redis 7.2+) last delivery, and in ordered groups
    how many streams it owns (--owned: which)."""
    s = settings(config_file, redis_url, namespace)
    if owned:
        leases = on_redis(s.url, lambda c: inspection.owned(c, s.keys, topics=topic or (), groups=group or ()))
        if as_json:
            emit_json(leases)
            return
        table(["group", "stream", "owner", "token", "lease left", "handing over"],
              [[o.group, o.stream, o.owner, o.token, age(o.ttl_ms), "yes" if o.releasing else ""] for o in leases],
              empty="(no owned streams: no ordered group has a live member)")
        return
    rows = on_redis(s.url, lambda c: inspection.consumers(c, s.keys, topics=topic or (), groups=group or ()))
    if as_json:
        emit_json(rows)
        return
    table(["group", "consumer", "topics", "streams", "owns", "pending", "idle", "last seen", "last delivery"],
          [[r.group, r.consumer, r.topics, r.streams, r.owns, r.pending, age(r.idle_ms), timestamp(r.last_seen_ms),
            timestamp(r.last_delivery_ms)] for r in rows], empty="(no consumers)")


@app.command(epilog=example("fabric pending", "fabric pending --topic tick --group indicators --limit 50",
                            "fabric pending --consumer worker-1 --json"))
def pending(
    topic: Topics = None,
    group: Groups = None,
    consumer: Annotated[str | None, typer.Option(help="Only entries held by this consumer.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many of the oldest to show.")] = 20,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    as_json: Json = False,
) -> None:
    """The oldest entries delivered and not yet acknowledged, oldest first: age, consumer, idle, deliveries."""
    s = settings(config_file, redis_url, namespace)
    rows = on_redis(s.url, lambda c: inspection.pending(c, s.keys, topics=topic or (), groups=group or (),
                                                      consumer=consumer, limit=limit))
    if as_json:
        emit_json(rows)
        return
    table(["stream", "group", "entry id", "age", "consumer", "idle", "deliveries"],
          [[r.stream, r.group, r.entry_id, age(r.age_ms), r.consumer, age(r.idle_ms), r.deliveries] for r in rows],
          empty="(nothing pending)")


@app.command(epilog=example("fabric health", "fabric health --group indicators --topic tick",
                            "fabric health --group indicators --group signals --max-idle-ms 10000 --json"))
def health(
    group: Annotated[list[str] | None, typer.Option(metavar="GROUP", help="A group that must be consuming (repeat).")]
    = None,
    topic: Annotated[list[str] | None, typer.Option(metavar="TOPIC", help="Look for the groups on this topic only "
                                                                          "(repeat for several).")] = None,
    max_idle_ms: MaxIdle = inspection.MAX_IDLE_MS,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Unhealthy if Redis has not answered by then.")] = 5.0,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    as_json: Json = False,
) -> None:
    """Exit 0 when Redis answers and every --group has a consumer active within --max-idle-ms, else 1 with one
    line saying why (an unreachable Redis and wrong credentials included)."""
    s = settings(config_file, redis_url, namespace)
    # Redis failures come back inside the report; only an unexpected error reaches run(), whose exit is 1 too
    report = run(lambda url: _health(url, s.keys, group or [], topic or [], max_idle_ms, timeout_s), s.url,
                 embedded=False)
    if as_json:
        emit_json(report)
    elif report.groups:
        table(["group", "topics", "streams", "consumers", "live", "idle", "pending", "lag"],
              [[g.group, g.topics, g.streams, g.consumers, g.live_consumers, age(g.idle_ms), g.pending, _lag(g.lag)]
               for g in report.groups])
    if not report.ok:
        fail("unhealthy: " + "; ".join(report.problems), Exit.FAILED)
    if not as_json:
        typer.echo(f"healthy: Redis answers; {len(report.groups)} group(s) "
                   + ("consuming" if group else "found"))


async def _health(url: str, keys: Keys, groups_: list[str], topics: list[str], max_idle_ms: int,
                  timeout_s: float) -> inspection.Health:
    client = connect(url)
    try:
        async with asyncio.timeout(timeout_s):  # a probe must answer: a Redis that accepts and stalls is unhealthy
            return await inspection.health(client, keys, groups=groups_, topics=topics, max_idle_ms=max_idle_ms,
                                           url=url)
    except TimeoutError:
        problem = f"Redis at {redact(url)} did not answer within {timeout_s:g}s: is it overloaded or paused?"
        return inspection.Health(ok=False, problems=[problem], max_idle_ms=max_idle_ms, groups=[])
    finally:
        await client.aclose()
