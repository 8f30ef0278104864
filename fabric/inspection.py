"""Looking without touching: a namespace's streams, groups, consumers and pending entries, and its health.

Streams are found through the topic registries (``ns:topic:TOPIC``; every topic by SCAN), then asked about in
pipelined batches (XINFO STREAM and GROUPS, then XINFO CONSUMERS or XPENDING where needed), so thousands of
streams cost a handful of round trips. Times are Unix milliseconds and ages milliseconds on Redis's clock (TIME),
never this host's; an entry id starts with the Unix ms of its entry. Redis reports a group's lag as nil when it
cannot know it (entries deleted, a group started mid-stream): that stays ``None`` ("unknown"), never a guess.

A registry member whose stream no longer exists is listed with ``exists=False``, length 0 and no groups: the
registry still names it, and a worker joining it would create it again. A topic, group or consumer named in a
filter that does not exist raises ``NotFound``; one that exists but has no rows gives an empty list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis

from fabric.client import error_code, translated
from fabric.errors import FabricError, NotFound
from fabric.keys import Keys, Priority, StreamRef
from fabric.nodes import is_cluster

__all__ = [
    "ConsumerInfo", "GroupHealth", "GroupInfo", "GroupLag", "Health", "Ownership", "PendingEntry", "StreamInfo",
    "consumers", "groups", "health", "owned", "pending", "streams", "topics",
]

PIPELINE_CHUNK = 1_000
"""Commands per pipelined round trip: thousands of streams in a few, without one huge reply held at once."""
SCAN_COUNT = 1_000
MAX_IDLE_MS = 30_000
"""``health``: a consumer idle longer than this (no read, no claim) is not counted as consuming."""


class GroupLag(msgspec.Struct, frozen=True, kw_only=True):
    """One consumer group on one stream."""

    group: str
    consumers: int
    pending: int
    """Entries delivered and not yet acknowledged."""
    lag: int | None
    """Entries not yet delivered to the group; None when Redis cannot tell."""
    last_delivered_id: str
    last_delivered_ms: int | None
    """Unix ms of the last delivered id; None when nothing was delivered yet (id 0-0)."""


class StreamInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One stream: what it holds and how far each group is behind."""

    key: str
    topic: str
    priority: str
    symbol: str | None
    exists: bool
    """False when the topic registry names a stream that no longer exists."""
    length: int
    first_ms: int | None
    last_ms: int | None
    groups: list[GroupLag]
    pending: int
    """Pending entries, summed over the groups."""
    lag: int | None
    """Lag summed over the groups; None if any group's lag is unknown."""


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One consumer group on one topic, summed over the topic's streams it reads."""

    group: str
    topic: str
    streams: int
    consumers: int
    """Distinct consumer names over those streams."""
    pending: int
    lag: int | None
    last_delivered_ms: int | None
    """Unix ms of the newest last-delivered id over those streams."""


class ConsumerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One consumer of one group, over every stream it is known on."""

    group: str
    consumer: str
    topics: list[str]
    streams: int
    pending: int
    idle_ms: int
    """Since its last read or claim on any stream (the least XINFO CONSUMERS idle)."""
    inactive_ms: int | None
    """Since its last read or claim that delivered something; None on Redis before 7.2 (not reported there)."""
    last_seen_ms: int
    """Unix ms of its last read or claim (now − ``idle_ms``)."""
    last_delivery_ms: int | None
    """Unix ms of its last delivery (now − ``inactive_ms``); None when Redis does not report it."""
    owns: int = 0
    """Ordered groups: the streams it holds the live lease of (``owned`` lists them)."""


class Ownership(msgspec.Struct, frozen=True, kw_only=True):
    """Who owns one stream of an ordered group, under which fencing token, for how much longer."""

    group: str
    stream: str
    topic: str
    symbol: str | None
    owner: str
    token: int
    releasing: bool
    """Being handed over: its owner finishes the entry in hand, then releases it."""
    ttl_ms: int


class PendingEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An entry delivered to a consumer and not acknowledged yet."""

    stream: str
    topic: str
    group: str
    entry_id: str
    age_ms: int
    """Since the entry was added to its stream."""
    consumer: str
    idle_ms: int
    """Since it was last delivered (or claimed, or touched by a live worker)."""
    deliveries: int


class GroupHealth(msgspec.Struct, frozen=True, kw_only=True):
    """Whether one group is consuming: its consumers and how recently each was active."""

    group: str
    topics: list[str]
    streams: int
    consumers: int
    live_consumers: int
    """Consumers idle for less than the health check's ``max_idle_ms``."""
    idle_ms: int | None
    """The least idle of its consumers; None with no consumers."""
    pending: int
    lag: int | None


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of a health check: ``ok``, else the problems, one line each."""

    ok: bool
    problems: list[str]
    max_idle_ms: int
    groups: list[GroupHealth]


# ---- reading Redis ---------------------------------------------------------------------------------------


class _Stream(NamedTuple):
    ref: StreamRef
    info: dict[str, Any] | None  # XINFO STREAM; None when the stream no longer exists
    groups: list[dict[str, Any]]  # XINFO GROUPS


_Consumers = dict[tuple[str, str], list[dict[str, Any]]]  # (stream, group) -> XINFO CONSUMERS


def _checked(reply: Any) -> Any:
    """A pipelined reply, or the error it carries raised."""
    if isinstance(reply, Exception):
        raise reply
    return reply


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _id_ms(entry_id: bytes | str) -> int:
    return int(_text(entry_id).split("-")[0])


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _sum_known(values: Iterable[int | None]) -> int | None:
    """The sum, or None if any value is unknown."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


async def _pipelined(client: Redis, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``(method, *args)`` calls in pipelined batches; error replies are returned, not raised."""
    replies: list[Any] = []
    for start in range(0, len(calls), PIPELINE_CHUNK):
        async with client.pipeline(transaction=False) as pipe:
            for method, *args in calls[start : start + PIPELINE_CHUNK]:
                getattr(pipe, method)(*args)
            replies += await pipe.execute(raise_on_error=False)
    return replies


async def _timed(client: Redis, calls: Sequence[tuple[Any, ...]]) -> tuple[int, list[Any]]:
    """Redis's time in Unix ms just after the calls ran (in the same pipeline), and their replies. On a cluster
    TIME has no key to pipeline it with (the cluster pipeline refuses it): it is asked of one node after them."""
    if is_cluster(client):
        replies = await _pipelined(client, calls)
        seconds, micros = await client.time()
    else:
        replies = await _pipelined(client, [*calls, ("time",)])
        seconds, micros = _checked(replies.pop())
    return int(seconds) * 1000 + int(micros) // 1000, replies


async def topics(client: Redis, keys: Keys) -> list[str]:
    """Every topic of the namespace that has a registry (a stream was published to it), sorted."""
    found = {keys.topic_of_registry(key)
             async for key in client.scan_iter(match=keys.topic_registry_pattern(), count=SCAN_COUNT)}
    return sorted(found)


class _Scope(NamedTuple):
    """Where a listing looked, for messages: the words, and the options that list what is there."""

    words: str
    options: str


def _scope(keys: Keys, wanted_topics: Sequence[str]) -> _Scope:
    options = f"--namespace {keys.ns}" + "".join(f" --topic {t}" for t in wanted_topics)
    if not wanted_topics:
        return _Scope(f"namespace {keys.ns!r}", options)
    words = ("topic " if len(wanted_topics) == 1 else "topics ") + ", ".join(map(repr, wanted_topics))
    return _Scope(words, options)


async def _registered(client: Redis, keys: Keys, wanted_topics: Sequence[str]) -> list[StreamRef]:
    """The streams the registries of these topics (default: every topic) name, by topic, priority, symbol."""
    names = list(dict.fromkeys(wanted_topics)) or await topics(client, keys)
    replies = await _pipelined(client, [("smembers", keys.topic_registry(t)) for t in names])
    refs = []
    for topic, members in zip(names, replies, strict=True):
        if not _checked(members) and wanted_topics:  # (a registry found by SCAN may have gone since: skip it)
            raise NotFound(f"topic {topic!r} does not exist in namespace {keys.ns!r} (nothing was published to it): "
                           f"`fabric streams --namespace {keys.ns}` lists the topics")
        for member in members:
            try:
                refs.append(keys.parse_stream(member))
            except ValueError:
                continue  # not a stream key of this namespace: nothing there to inspect
    return sorted(refs, key=lambda r: (r.topic, -r.priority, r.symbol or ""))


async def _survey(client: Redis, keys: Keys, wanted_topics: Sequence[str]) -> list[_Stream]:
    """Every stream of the topics with its XINFO STREAM and XINFO GROUPS, in a few round trips."""
    refs = await _registered(client, keys, wanted_topics)
    calls = [(method, ref.key) for ref in refs for method in ("exists", "xinfo_stream", "xinfo_groups")]
    replies = await _pipelined(client, calls)
    found = []
    for i, ref in enumerate(refs):
        exists, info, groups_ = replies[3 * i : 3 * i + 3]
        if _checked(exists):
            found.append(_Stream(ref, _checked(info), _checked(groups_)))
        else:
            found.append(_Stream(ref, None, []))
    return found


def _only_groups(survey: list[_Stream], wanted: Sequence[str], scope: _Scope) -> list[_Stream]:
    """The streams with only the wanted groups (all without a filter); a group found on none is NotFound."""
    if not wanted:
        return survey
    streams_ = [s._replace(groups=[g for g in s.groups if _text(g["name"]) in wanted]) for s in survey]
    found = {_text(g["name"]) for s in streams_ for g in s.groups}
    for group in wanted:
        if group not in found:
            raise NotFound(f"group {group!r} does not exist on any stream of {scope.words}: "
                           f"`fabric groups {scope.options}` lists the groups there")
    return streams_


async def _consumers(client: Redis, streams_: Sequence[_Stream]) -> tuple[int, _Consumers]:
    """Redis's time, and XINFO CONSUMERS of every group on every stream, pipelined."""
    pairs = [(s.ref.key, _text(g["name"])) for s in streams_ for g in s.groups]
    now_ms, replies = await _timed(client, [("xinfo_consumers", key, group) for key, group in pairs])
    found: _Consumers = {}
    for pair, reply in zip(pairs, replies, strict=True):
        if isinstance(reply, Exception) and error_code(reply) == "NOGROUP":
            reply = []  # the group was destroyed since XINFO GROUPS: it has no consumers left
        found[pair] = _checked(reply)
    return now_ms, found


# ---- the listings ----------------------------------------------------------------------------------------


def _group_lag(reply: dict[str, Any]) -> GroupLag:
    last = _text(reply["last-delivered-id"])
    lag = reply.get("lag")
    return GroupLag(group=_text(reply["name"]), consumers=int(reply["consumers"]), pending=int(reply["pending"]),
                    lag=None if lag is None else int(lag), last_delivered_id=last,
                    last_delivered_ms=_id_ms(last) if last != "0-0" else None)


def _stream_info(stream: _Stream) -> StreamInfo:
    info = stream.info or {}
    first, last = info.get("first-entry"), info.get("last-entry")
    lags = [_group_lag(g) for g in stream.groups]
    ref = stream.ref
    return StreamInfo(key=ref.key, topic=ref.topic, priority=ref.priority.label, symbol=ref.symbol,
                      exists=stream.info is not None, length=int(info.get("length", 0)),
                      first_ms=_id_ms(first[0]) if first else None, last_ms=_id_ms(last[0]) if last else None,
                      groups=lags, pending=sum(g.pending for g in lags), lag=_sum_known(g.lag for g in lags))


async def streams(client: Redis, keys: Keys, *, topics: Sequence[str] = (), symbol: str | None = None,
                  priority: Priority | None = None) -> list[StreamInfo]:
    """Every stream of the topics (default: all), optionally of one symbol and priority."""
    survey = await _survey(client, keys, topics)
    return [_stream_info(s) for s in survey
            if (symbol is None or s.ref.symbol == symbol) and (priority is None or s.ref.priority == priority)]


def _group_info(group: str, topic: str, parts: list[tuple[GroupLag, list[dict[str, Any]]]]) -> GroupInfo:
    delivered = [g.last_delivered_ms for g, _ in parts if g.last_delivered_ms is not None]
    return GroupInfo(group=group, topic=topic, streams=len(parts),
                     consumers=len({c["name"] for _, cs in parts for c in cs}),
                     pending=sum(g.pending for g, _ in parts), lag=_sum_known(g.lag for g, _ in parts),
                     last_delivered_ms=max(delivered, default=None))


async def groups(client: Redis, keys: Keys, *, topics: Sequence[str] = (),
                 groups: Sequence[str] = ()) -> list[GroupInfo]:
    """One row per group and topic, summed over the topic's streams the group reads."""
    survey = _only_groups(await _survey(client, keys, topics), groups, _scope(keys, topics))
    _, per_stream = await _consumers(client, survey)
    rows: dict[tuple[str, str], list[tuple[GroupLag, list[dict[str, Any]]]]] = {}
    for stream in survey:
        for reply in stream.groups:
            lag = _group_lag(reply)
            rows.setdefault((lag.group, stream.ref.topic), []).append((lag, per_stream[stream.ref.key, lag.group]))
    return [_group_info(group, topic, parts) for (group, topic), parts in sorted(rows.items())]


def _consumer_info(group: str, name: str, parts: list[tuple[str, dict[str, Any]]], now_ms: int) -> ConsumerInfo:
    idle_ms = min(int(c["idle"]) for _, c in parts)
    # XINFO CONSUMERS has "inactive" from Redis 7.2 on (-1: never delivered anything)
    inactive = [int(c["inactive"]) for _, c in parts if int(c.get("inactive", -1)) >= 0]
    inactive_ms = min(inactive, default=None)
    return ConsumerInfo(group=group, consumer=name, topics=sorted({t for t, _ in parts}), streams=len(parts),
                        pending=sum(int(c["pending"]) for _, c in parts), idle_ms=idle_ms,
                        inactive_ms=inactive_ms, last_seen_ms=now_ms - idle_ms,
                        last_delivery_ms=None if inactive_ms is None else now_ms - inactive_ms)


async def consumers(client: Redis, keys: Keys, *, topics: Sequence[str] = (),
                    groups: Sequence[str] = ()) -> list[ConsumerInfo]:
    """One row per group and consumer, over every stream of the topics where the consumer is known."""
    survey = _only_groups(await _survey(client, keys, topics), groups, _scope(keys, topics))
    now_ms, per_stream = await _consumers(client, survey)
    topic_of = {s.ref.key: s.ref.topic for s in survey}
    rows: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for (stream, group), replies in per_stream.items():
        for reply in replies:
            rows.setdefault((group, _text(reply["name"])), []).append((topic_of[stream], reply))
    owns = Counter((o.group, o.owner) for o in await _ownerships(client, keys, survey))
    return [msgspec.structs.replace(_consumer_info(group, name, parts, now_ms), owns=owns[group, name])
            for (group, name), parts in sorted(rows.items())]


async def owned(client: Redis, keys: Keys, *, topics: Sequence[str] = (),
                groups: Sequence[str] = ()) -> list[Ownership]:
    """Ordered groups: one row per stream with a live lease, by group and stream (streams nobody owns right now,
    and groups in the free-for-all mode, have none)."""
    survey = _only_groups(await _survey(client, keys, topics), groups, _scope(keys, topics))
    return await _ownerships(client, keys, survey)


async def _ownerships(client: Redis, keys: Keys, survey: list[_Stream]) -> list[Ownership]:
    pairs = [(s.ref, _text(g["name"])) for s in survey for g in s.groups]
    calls = [c for ref, group in pairs for c in (("hmget", keys.lease(group, ref.key), "owner", "token", "releasing"),
                                                 ("pttl", keys.lease(group, ref.key)))]
    replies = await _pipelined(client, calls)
    rows = []
    for i, (ref, group) in enumerate(pairs):
        (owner, token, releasing), ttl_ms = _checked(replies[2 * i]), _checked(replies[2 * i + 1])
        if owner is not None and token is not None and ttl_ms > 0:
            rows.append(Ownership(group=group, stream=ref.key, topic=ref.topic, symbol=ref.symbol, owner=_text(owner),
                                  token=int(token), releasing=releasing is not None, ttl_ms=int(ttl_ms)))
    return sorted(rows, key=lambda o: (o.group, o.stream))


def _pending_entry(ref: StreamRef, group: str, reply: dict[str, Any], now_ms: int) -> PendingEntry:
    entry_id = _text(reply["message_id"])
    return PendingEntry(stream=ref.key, topic=ref.topic, group=group, entry_id=entry_id,
                        age_ms=now_ms - _id_ms(entry_id), consumer=_text(reply["consumer"]),
                        idle_ms=int(reply["time_since_delivered"]), deliveries=int(reply["times_delivered"]))


async def _check_consumer(client: Redis, survey: list[_Stream], consumer: str, scope: _Scope) -> None:
    _, per_stream = await _consumers(client, survey)
    if not any(_text(c["name"]) == consumer for replies in per_stream.values() for c in replies):
        raise NotFound(f"consumer {consumer!r} is not known to any group on {scope.words}: "
                       f"`fabric consumers {scope.options}` lists the consumers there")


async def pending(client: Redis, keys: Keys, *, topics: Sequence[str] = (), groups: Sequence[str] = (),
                  consumer: str | None = None, limit: int = 20) -> list[PendingEntry]:
    """The ``limit`` oldest pending entries over every stream and group chosen, oldest first."""
    scope = _scope(keys, topics)
    survey = _only_groups(await _survey(client, keys, topics), groups, scope)
    if consumer is not None:
        await _check_consumer(client, survey, consumer, scope)
    # each stream's oldest `limit` are enough: the oldest `limit` overall are among them
    pairs = [(s.ref, _text(g["name"])) for s in survey for g in s.groups if int(g["pending"])]
    now_ms, replies = await _timed(client, [("xpending_range", ref.key, group, "-", "+", limit, consumer)
                                            for ref, group in pairs])
    entries = [_pending_entry(ref, group, reply, now_ms)
               for (ref, group), found in zip(pairs, replies, strict=True) for reply in _checked(found)]
    entries.sort(key=lambda e: (_id_order(e.entry_id), e.stream, e.group))
    return entries[:limit]


# ---- health ----------------------------------------------------------------------------------------------


def _group_health(survey: list[_Stream], per_stream: _Consumers, max_idle_ms: int) -> dict[str, GroupHealth]:
    """Every group found, summed over all its streams."""
    topic_of = {s.ref.key: s.ref.topic for s in survey}
    lags: dict[str, list[GroupLag]] = {}
    for stream in survey:
        for reply in stream.groups:
            lag = _group_lag(reply)
            lags.setdefault(lag.group, []).append(lag)
    idle: dict[str, dict[str, int]] = {group: {} for group in lags}  # group -> consumer -> least idle
    seen_on: dict[str, set[str]] = {group: set() for group in lags}
    for (key, group), replies in per_stream.items():
        seen_on[group].add(topic_of[key])
        for c in replies:
            name = _text(c["name"])
            idle[group][name] = min(int(c["idle"]), idle[group].get(name, int(c["idle"])))
    return {group: GroupHealth(group=group, topics=sorted(seen_on[group]), streams=len(lags[group]),
                               consumers=len(idle[group]),
                               live_consumers=sum(1 for ms in idle[group].values() if ms < max_idle_ms),
                               idle_ms=min(idle[group].values(), default=None),
                               pending=sum(g.pending for g in lags[group]), lag=_sum_known(g.lag for g in lags[group]))
            for group in sorted(lags)}


def _problem(group: str, found: GroupHealth | None, max_idle_ms: int, scope: _Scope) -> str | None:
    """What keeps one expected group from being healthy, or None."""
    if found is None:
        return f"group {group!r} does not exist on any stream of {scope.words}: start a worker with --group {group}"
    if not found.consumers:
        return f"group {group!r} has no consumers: start a worker with --group {group}"
    if not found.live_consumers:
        return (f"group {group!r} has no consumer active in the last {max_idle_ms} ms (the least idle: "
                f"{found.idle_ms} ms): its workers are stopped or stuck")
    return None


def _missing(group: str) -> GroupHealth:
    return GroupHealth(group=group, topics=[], streams=0, consumers=0, live_consumers=0, idle_ms=None, pending=0,
                       lag=None)


async def health(client: Redis, keys: Keys, *, groups: Sequence[str] = (), topics: Sequence[str] = (),
                 max_idle_ms: int = MAX_IDLE_MS, url: str | None = None) -> Health:
    """Healthy when Redis answers and every expected group exists on the topics (default: any) with a consumer
    idle for less than ``max_idle_ms``. Never raises a fabric error: an unreachable Redis, wrong credentials or
    a missing topic are problems of the result. ``url`` only names the server in messages."""
    try:
        with translated(url):
            await client.ping()
            survey = await _survey(client, keys, topics)
            _, per_stream = await _consumers(client, survey)
    except FabricError as exc:
        return Health(ok=False, problems=[str(exc)], max_idle_ms=max_idle_ms, groups=[])
    found = _group_health(survey, per_stream, max_idle_ms)
    scope = _scope(keys, topics)
    problems = [p for g in dict.fromkeys(groups) if (p := _problem(g, found.get(g), max_idle_ms, scope))]
    shown = [found.get(g) or _missing(g) for g in dict.fromkeys(groups)] if groups else list(found.values())
    return Health(ok=not problems, problems=problems, max_idle_ms=max_idle_ms, groups=shown)
