"""Every metric family fabric exposes, defined once; the series one process reports; and how the series of several
processes add up. (``metrics.py`` reads them from the workers and publishers; ``snapshots.py`` moves them between
processes.)

Labels stay low in cardinality: group, handler, topic, priority, breaker; never symbol or stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

from fabric.tally import BATCH_BUCKETS, SECONDS_BUCKETS

__all__ = ["FAMILIES", "NAMES", "Family", "Series", "Snapshot", "merge"]


@dataclass(frozen=True)
class Family:
    """One metric family: its exposed name (counters end in ``_total``), kind, help and label names."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    sampled: bool = False
    """Read from Redis by the group's one sampler, not counted by each process: true only while its process lives,
    and the same value wherever it is read (processes are merged by max, never summed)."""

    @property
    def live_only(self) -> bool:
        """A value that stops being true when its process exits (a gauge, or sampled)."""
        return self.kind == "gauge" or self.sampled


_WORKER = ("group", "handler")
_LANE = ("group", "topic", "priority")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("fabric_published_events_total", "counter", "Events written to Redis by publishers.", ("topic", "priority")),
    Family("fabric_delivered_events_total", "counter", "Entries taken for handling: new reads, reclaims, retries.",
           _WORKER),
    Family("fabric_handled_events_total", "counter", "Entries acknowledged after their handler succeeded.", _WORKER),
    Family("fabric_failed_events_total", "counter", "Deliveries whose handler failed.", _WORKER),
    Family("fabric_retried_events_total", "counter", "Failures scheduled for another delivery.", _WORKER),
    Family("fabric_dead_lettered_events_total", "counter", "Entries moved to a dead-letter stream.", _WORKER),
    Family("fabric_rejected_events_total", "counter", "Handler calls that raised Reject (dead-lettered).", _WORKER),
    Family("fabric_invalid_events_total", "counter", "Entries that failed validation: not a known, decodable event "
           "(dead-lettered).", _WORKER),
    Family("fabric_reclaimed_events_total", "counter", "Entries taken over from consumers idle too long.", _WORKER),
    Family("fabric_refused_commits_total", "counter", "Commits refused: another consumer had taken the entry over.",
           _WORKER),
    Family("fabric_trimmed_pending_events_total", "counter", "Pending entries trimmed from their stream before they "
           "were handled.", _WORKER),
    Family("fabric_handler_duration_seconds", "histogram", "Handler call duration.", _WORKER, SECONDS_BUCKETS),
    Family("fabric_end_to_end_latency_seconds", "histogram", "Time from an event's ts_ns to the end of its handling.",
           _WORKER, SECONDS_BUCKETS),
    Family("fabric_read_batch_size", "histogram", "Entries per read from Redis.", ("group",), BATCH_BUCKETS),
    Family("fabric_workers_ready", "gauge", "Worker processes connected, joined and not draining.", ()),
    Family("fabric_consumer_lag", "gauge", "Entries not yet delivered to the group (sampled by one process per "
           "group).", _LANE, sampled=True),
    Family("fabric_pending_events", "gauge", "Entries delivered to the group and not yet acknowledged (sampled).",
           _LANE, sampled=True),
    Family("fabric_oldest_pending_age_seconds", "gauge", "Age of the group's oldest pending entry (sampled).", _LANE,
           sampled=True),
    Family("fabric_dead_letters", "gauge", "Entries in the namespace's dead-letter streams (sampled).", (),
           sampled=True),
    Family("fabric_breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open (sampled).",
           ("breaker",), sampled=True),
    Family("fabric_breaker_transitions_total", "counter", "Circuit breaker state changes (sampled from Redis).",
           ("breaker",), sampled=True),
)}
NAMES = frozenset(FAMILIES)
"""Every exposed family name (histograms by their base name)."""

class Series(msgspec.Struct, array_like=True):
    """One labelled value of a family; histograms carry bucket counts (not cumulative) and a sum."""

    name: str
    labels: tuple[str, ...]
    value: float = 0.0
    counts: list[int] = []


class Snapshot(msgspec.Struct, kw_only=True):
    """What one process has counted, at ``written_s`` (Unix time)."""

    pid: int
    written_s: float
    series: list[Series]


def _add(totals: dict[tuple[str, tuple[str, ...]], Series], s: Series) -> None:
    key = (s.name, s.labels)
    found = totals.get(key)
    if found is None:
        totals[key] = Series(s.name, s.labels, s.value, list(s.counts))
    elif FAMILIES[s.name].sampled:
        found.value = max(found.value, s.value)
    else:
        found.value += s.value
        if s.counts:
            found.counts = [a + b for a, b in zip(found.counts, s.counts, strict=True)]


def merge(snapshots: Iterable[Snapshot], *, gauges_from: Iterable[Snapshot] = ()) -> list[Series]:
    """Sum what processes count (counters, histograms) over ``snapshots``, alive or not; take what is true only
    while a process lives (gauges, sampled values) from ``gauges_from``: summed, or for sampled ones the max (two
    samplers read the same Redis)."""
    totals: dict[tuple[str, tuple[str, ...]], Series] = {}
    for snap in snapshots:
        for s in snap.series:
            if not FAMILIES[s.name].live_only:
                _add(totals, s)
    for snap in gauges_from:
        for s in snap.series:
            if FAMILIES[s.name].live_only:
                _add(totals, s)
    return list(totals.values())
