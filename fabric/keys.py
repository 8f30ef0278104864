"""Every Redis key fabric uses, built here and nowhere else.

``ns`` is the namespace (``fabric`` by default; tests use a fresh one each). ``TAG`` is the hash tag that
decides the Redis Cluster slot: ``{SYMBOL}`` for events with a symbol, ``{~TOPIC}`` for those without. One
symbol's streams of every topic and priority, their failure records, their dead letters and the dedup marks
of their events all live in one slot, so each per-entry script touches one slot; different symbols spread
over a cluster. (Calls that span tags on a single Redis, such as a publish batch of many symbols, are split by
slot on a cluster; the layout stays as it is.)

=================================  ===========  ==========================  ===================================
key                                type         written by                  read by
=================================  ===========  ==========================  ===================================
``ns:s:TOPIC:PRIORITY:TAG``        stream       publisher (publish.lua),    worker (XREADGROUP, XAUTOCLAIM),
                                                worker outputs (commit.lua) retention (trim.lua), CLI
``ns:p:TOPIC:PRIORITY:TAG``        hash, TTL    publish.lua: field          publish.lua (a resend of a batch
                                                PRODUCER → last sequence    that landed adds nothing)
``ns:d:TOPIC:TAG:EVENT_ID``        string, TTL  publish.lua, when           publish.lua (event_id dedup,
                                                dedup_window_ms > 0         opt-in)
``ns:f:TOPIC:PRIORITY:TAG``        hash         worker on failure           worker when dead-lettering;
                                                (fail.lua)                  field ``GROUP/ENTRY_ID``
``ns:dlq:TAG``                     stream       deadletter.lua              deadletter module, CLI
``ns:topic:TOPIC``                 set          publisher, first time it    worker discovery, CLI; inspection
                                                writes a stream             lists topics by SCAN ns:topic:*
``ns:dlqs``                        set          worker, before its first    deadletter module, CLI
                                                dead letter to a dlq key
``ns:counters``                    hash         worker, retention           CLI, metrics
``ns:b:NAME:{~breaker_state_...}`` hash         breaker.lua                 breaker.lua, workers, CLI
``ns:bw:NAME:{~breaker_state...}`` hash         breaker.lua: calls and      breaker.lua (failure rate over
                                                failures per second         the window)
``ns:breakers``                    set          workers and CLI, before a   CLI (``fabric breaker list``)
                                                breaker's first use
``ns:sampler:GROUP``               string, TTL  the worker process that     the same (SET NX PX renews it):
                                                samples the group's lag     one sampler per group, fleet-wide
``ns:sampler:~namespace``          string, TTL  the worker process that     the same: one sampler of dead
                                                samples namespace gauges    letters and breakers, fleet-wide
``ns:lease:GROUP:TOPIC:PRI:TAG``   hash, TTL    lease*.lua: ``owner``,      lease*.lua; fenced reads and
                                                ``token``, ``releasing``    writes (fenced_*.lua,
                                                (holder handing over)       takeover.lua) compare ``token``;
                                                                            ownership module, CLI
``ns:fence:GROUP:TOPIC:PRI:TAG``   string       lease.lua: INCR, the last   lease.lua
                                                token issued; no TTL, so
                                                a token is never reused
``ns:members:GROUP``               zset         members.lua: member →       members.lua (live: seen
                                                last heartbeat ms (Redis's  within the TTL), balancer,
                                                clock)                      CLI
=================================  ===========  ==========================  ===================================

Breakers live in the slot of the system stream their transitions are written to
(``ns:s:breaker_state_changed:critical:{~breaker_state_changed}``), so a transition and its event are one script.
Every transition is also announced on the pub/sub channel ``ns:breakers:changed`` (the breaker's name). Whoever adds
a stream to a topic's registry (a producer, a worker for its outputs) announces the topic on ``ns:streams:new``, so
that the topic's workers join the stream at once.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

__all__ = ["Keys", "Priority", "StreamRef", "check_name", "check_symbol"]

BREAKER_TOPIC = "breaker_state_changed"
"""The topic of ``BreakerStateChanged`` events (its default topic)."""
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
_SYMBOL = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")
_STREAM = re.compile(r"^(?P<ns>.+):s:(?P<topic>[^:]+):(?P<priority>[a-z]+):\{(?P<tag>[^}]+)\}$")


class Priority(enum.IntEnum):
    """Delivery priority; a higher value is served first (see ``lanes.py`` for the rule)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """Accept ``"high"``, ``"HIGH"``, ``2`` or a ``Priority``."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise ValueError(f"unknown priority {value!r}: use one of {names}") from None

    @property
    def label(self) -> str:
        """The lower-case name used in keys and output."""
        return self.name.lower()


class StreamRef(NamedTuple):
    """What a stream key stands for."""

    key: str
    topic: str
    priority: Priority
    symbol: str | None


def check_name(kind: str, value: str) -> str:
    """Validate a topic, group or consumer name; return it."""
    if not _NAME.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use 1-100 characters of letters, digits, '_', '.', '-'")
    return value


def check_symbol(value: str) -> str:
    """Validate a symbol (letters, digits, ``_ . - /``); return it."""
    if not _SYMBOL.match(value):
        raise ValueError(f"invalid symbol {value!r}: use 1-64 characters of letters, digits, '_', '.', '-', '/'")
    return value


class Keys:
    """Builds and parses the key names of one namespace."""

    def __init__(self, ns: str = "fabric") -> None:
        self.ns = check_name("namespace", ns)
        self._streams: dict[tuple[str, Priority, str | None], str] = {}

    @staticmethod
    def tag(topic: str, symbol: str | None) -> str:
        """The hash tag (with braces) that places a stream and its companions in one cluster slot."""
        return "{" + symbol + "}" if symbol else "{~" + topic + "}"

    def stream(self, topic: str, priority: Priority, symbol: str | None) -> str:
        """The stream of one topic, priority and symbol (cached: this is on the publish hot path)."""
        k = (topic, priority, symbol)
        key = self._streams.get(k)
        if key is None:
            check_name("topic", topic)
            if symbol is not None:
                check_symbol(symbol)
            key = f"{self.ns}:s:{topic}:{priority.label}:{self.tag(topic, symbol)}"
            self._streams[k] = key
        return key

    def parse_stream(self, key: str | bytes) -> StreamRef:
        """Recover topic, priority and symbol from a stream key."""
        text = key.decode() if isinstance(key, bytes) else key
        m = _STREAM.match(text)
        if not m or m["ns"] != self.ns or m["priority"].upper() not in Priority.__members__:
            raise ValueError(f"{text!r} is not a fabric stream key of namespace {self.ns!r}")
        tag = m["tag"]
        symbol = None if tag.startswith("~") else tag
        return StreamRef(text, m["topic"], Priority[m["priority"].upper()], symbol)

    @staticmethod
    def tag_of(stream_key: str) -> str:
        """The hash tag (with braces) of a stream key."""
        return stream_key[stream_key.rindex("{") :]

    def dedup(self, stream_key: str, event_id: str) -> str:
        """The idempotency mark of one event published to a topic, in its stream's slot."""
        topic = stream_key[len(self.ns) + 3 : stream_key.index(":", len(self.ns) + 3)]
        return f"{self.ns}:d:{topic}:{self.tag_of(stream_key)}:{event_id}"

    def producers(self, stream_key: str) -> str:
        """The hash of the last sequence number each producer session wrote to a stream (idempotent resends)."""
        return f"{self.ns}:p:" + stream_key[len(self.ns) + 3 :]

    def failures(self, stream_key: str) -> str:
        """The hash of failure records for a stream's entries (field ``GROUP/ENTRY_ID``)."""
        return f"{self.ns}:f:" + stream_key[len(self.ns) + 3 :]

    def dlq(self, stream_key: str) -> str:
        """The dead-letter stream for entries of a stream (shared by the stream's slot)."""
        return f"{self.ns}:dlq:{self.tag_of(stream_key)}"

    def topic_registry(self, topic: str) -> str:
        """The set of stream keys that exist for a topic."""
        return f"{self.ns}:topic:{topic}"

    def topic_registry_pattern(self) -> str:
        """The SCAN pattern that matches every topic registry of the namespace (the topic follows ``ns:topic:``)."""
        return f"{self.ns}:topic:*"

    def topic_of_registry(self, key: str | bytes) -> str:
        """The topic a topic registry key is for (the inverse of ``topic_registry``)."""
        text = key.decode() if isinstance(key, bytes) else key
        prefix = self.topic_registry("")
        if not text.startswith(prefix):
            raise ValueError(f"{text!r} is not a topic registry of namespace {self.ns!r}")
        return text[len(prefix) :]

    def dlq_registry(self) -> str:
        """The set of dead-letter stream keys."""
        return f"{self.ns}:dlqs"

    def breaker(self, name: str) -> str:
        """The state hash of a circuit breaker."""
        return f"{self.ns}:b:{check_name('breaker', name)}:{self.tag(BREAKER_TOPIC, None)}"

    def breaker_window(self, name: str) -> str:
        """The per-second call and failure counts of a circuit breaker."""
        return f"{self.ns}:bw:{check_name('breaker', name)}:{self.tag(BREAKER_TOPIC, None)}"

    def breaker_registry(self) -> str:
        """The set of breaker names in use."""
        return f"{self.ns}:breakers"

    def breaker_channel(self) -> str:
        """The pub/sub channel a breaker's name is published on at each of its transitions (not a key)."""
        return f"{self.ns}:breakers:changed"

    def new_streams_channel(self) -> str:
        """The pub/sub channel a topic's name is published on when a stream is added to its registry (not a key):
        workers of the topic join the stream then, not at their next discovery."""
        return f"{self.ns}:streams:new"

    def breaker_events(self) -> str:
        """The system stream of ``BreakerStateChanged`` events."""
        return self.stream(BREAKER_TOPIC, Priority.CRITICAL, None)

    def sampler(self, group: str | None = None) -> str:
        """The lease of the process sampling a group's lag and pending entries (``None``: the namespace's dead
        letters and breakers) for the metrics, so that one process per group does it, not every worker."""
        return f"{self.ns}:sampler:" + ("~namespace" if group is None else check_name("group", group))

    def counters(self) -> str:
        """The hash of operational counters (trimmed-while-pending, dropped by hard cap)."""
        return f"{self.ns}:counters"

    def lease(self, group: str, stream_key: str) -> str:
        """The ownership lease of one stream in an ordered group (in the stream's slot, for fenced writes)."""
        return f"{self.ns}:lease:{check_name('group', group)}:" + stream_key[len(self.ns) + 3 :]

    def fence(self, group: str, stream_key: str) -> str:
        """The counter of fencing tokens issued for one stream in an ordered group (in the stream's slot)."""
        return f"{self.ns}:fence:{check_name('group', group)}:" + stream_key[len(self.ns) + 3 :]

    def members(self, group: str) -> str:
        """The registry of an ordered group's live members and their last heartbeat (ms, Redis's clock)."""
        return f"{self.ns}:members:{check_name('group', group)}"
