"""Prometheus metrics: every family defined once here, read from what the workers and publishers already count.

Nothing is counted twice: a worker counts into ``WorkerStats`` and ``Tally``s (plain integers, no locks), a
publisher into ``Publisher.published``, and the sampler (``sampler.py``) keeps the gauges it reads from Redis.
``Metrics`` turns them into a ``Snapshot`` when asked; ``Collector`` yields Prometheus families from the snapshots
of this process and of the other processes of a supervisor (``snapshots.py``), and is registered on a registry the
caller passes in. Nothing happens at import time.

Labels stay low in cardinality: group, handler, topic, priority, breaker; never symbol or stream.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as _Collector

from fabric.events import Event
from fabric.handler import Context, HandlerFn, Middleware
from fabric.keys import Keys
from fabric.tally import BATCH_BUCKETS, SECONDS_BUCKETS, Tally

if TYPE_CHECKING:
    from fabric.publisher import Publisher
    from fabric.worker import Worker

__all__ = [
    "FAMILIES", "NAMES", "Collector", "Family", "HandlerTallies", "Metrics", "Series", "Snapshot", "Snapshots",
    "measured", "merge",
]


@dataclass(frozen=True)
class Family:
    """One metric family: its exposed name (counters end in ``_total``), kind, help and label names."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


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
           "group).", _LANE),
    Family("fabric_pending_events", "gauge", "Entries delivered to the group and not yet acknowledged (sampled).",
           _LANE),
    Family("fabric_oldest_pending_age_seconds", "gauge", "Age of the group's oldest pending entry (sampled).", _LANE),
    Family("fabric_dead_letters", "gauge", "Entries in the namespace's dead-letter streams (sampled).", ()),
    Family("fabric_breaker_state", "gauge", "Circuit breaker state: 0 closed, 1 half-open, 2 open (sampled).",
           ("breaker",)),
    Family("fabric_breaker_transitions_total", "counter", "Circuit breaker state changes (sampled from Redis).",
           ("breaker",)),
)}
NAMES = frozenset(FAMILIES)
"""Every exposed family name (histograms by their base name)."""

_WORKER_COUNTERS = (
    ("fabric_delivered_events_total", "delivered"), ("fabric_handled_events_total", "handled"),
    ("fabric_failed_events_total", "failed"), ("fabric_retried_events_total", "retried"),
    ("fabric_dead_lettered_events_total", "dead_lettered"), ("fabric_rejected_events_total", "rejected"),
    ("fabric_invalid_events_total", "invalid"), ("fabric_reclaimed_events_total", "reclaimed"),
    ("fabric_refused_commits_total", "refused"), ("fabric_trimmed_pending_events_total", "trimmed_pending"),
)


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


class HandlerTallies:
    """The histograms of one worker's handler, filled by the ``measured`` middleware."""

    def __init__(self) -> None:
        self.duration = Tally(SECONDS_BUCKETS)
        self.latency = Tally(SECONDS_BUCKETS)


def measured(tallies: HandlerTallies) -> Middleware:
    """Observe each successful or failed handler call's duration and, after success, the event's end-to-end
    latency (now minus its ``ts_ns``) into ``tallies``."""
    clock, wall = time.perf_counter, time.time_ns
    duration, latency = tallies.duration.observe, tallies.latency.observe

    def middleware(inner: HandlerFn) -> HandlerFn:
        async def handle(event: Event, ctx: Context) -> list[Event]:
            start = clock()
            try:
                results = await inner(event, ctx)
            finally:
                duration(clock() - start)
            latency((wall() - event.ts_ns) / 1e9)
            return results

        return handle

    return middleware


class Metrics:
    """The sources of one process (workers, publishers, samplers), read into a ``Snapshot`` on demand."""

    def __init__(self, keys: Keys | None = None) -> None:
        self.keys = keys or Keys()
        self._workers: list[tuple[Worker, HandlerTallies | None]] = []
        self._publishers: list[Publisher] = []
        self._gauges: list[Iterable[Series]] = []
        self._routes: dict[str, tuple[str, str]] = {}

    def watch_worker(self, worker: Worker, tallies: HandlerTallies | None = None) -> None:
        """Export a worker's counts, the events its handler published (and its histograms, when measured)."""
        self._workers.append((worker, tallies))

    def watch_publisher(self, publisher: Publisher) -> None:
        """Export the events a publisher wrote, by topic and priority."""
        self._publishers.append(publisher)

    def watch_gauges(self, source: Iterable[Series]) -> None:
        """Export series a sampler keeps up to date (iterated at every snapshot)."""
        self._gauges.append(source)

    def snapshot(self) -> Snapshot:
        """Everything counted so far in this process."""
        series: list[Series] = []
        for worker, tallies in self._workers:
            series += self._worker_series(worker, tallies)
        series += self._published()
        for source in self._gauges:
            series += source
        ready = sum(1 for w, _ in self._workers if w.ready)
        series.append(Series("fabric_workers_ready", (), ready))
        return Snapshot(pid=os.getpid(), written_s=time.time(), series=series)

    def _worker_series(self, worker: Worker, tallies: HandlerTallies | None) -> Iterator[Series]:
        labels = (worker.group, worker.handler_name)
        stats = worker.stats
        for name, field in _WORKER_COUNTERS:
            yield Series(name, labels, getattr(stats, field))
        yield _histogram("fabric_read_batch_size", (worker.group,), worker.read_sizes)
        if tallies is not None:
            yield _histogram("fabric_handler_duration_seconds", labels, tallies.duration)
            yield _histogram("fabric_end_to_end_latency_seconds", labels, tallies.latency)

    def _published(self) -> Iterator[Series]:
        totals: dict[tuple[str, str], int] = {}
        counts = [p.published for p in self._publishers] + [w.published for w, _ in self._workers]
        for published in counts:
            for stream, n in list(published.items()):
                route = self._routes.get(stream)
                if route is None:
                    ref = self.keys.parse_stream(stream)
                    route = self._routes[stream] = (ref.topic, ref.priority.label)
                totals[route] = totals.get(route, 0) + n
        for labels, n in totals.items():
            yield Series("fabric_published_events_total", labels, n)


def _histogram(name: str, labels: tuple[str, ...], tally: Tally) -> Series:
    return Series(name, labels, tally.sum, list(tally.counts))


def merge(snapshots: Iterable[Snapshot], *, gauges_from: Iterable[Snapshot] = ()) -> list[Series]:
    """Sum counters and histograms over ``snapshots`` (processes alive or not), and gauges over ``gauges_from``
    (live processes only: a dead one's lag or readiness is no longer true)."""
    totals: dict[tuple[str, tuple[str, ...]], Series] = {}

    def add(s: Series) -> None:
        key = (s.name, s.labels)
        found = totals.get(key)
        if found is None:
            totals[key] = Series(s.name, s.labels, s.value, list(s.counts))
        else:
            found.value += s.value
            if s.counts:
                found.counts = [a + b for a, b in zip(found.counts, s.counts, strict=True)]

    for snap in snapshots:
        for s in snap.series:
            if FAMILIES[s.name].kind != "gauge":
                add(s)
    for snap in gauges_from:
        for s in snap.series:
            if FAMILIES[s.name].kind == "gauge":
                add(s)
    return list(totals.values())


def _families(series: Iterable[Series]) -> Iterator[Metric]:
    by_name: dict[str, list[Series]] = {}
    for s in series:
        by_name.setdefault(s.name, []).append(s)
    for name, family in FAMILIES.items():
        found = by_name.get(name, [])
        if family.kind == "histogram":
            hist = HistogramMetricFamily(name, family.help, labels=family.labels)
            for s in found:
                hist.add_metric(list(s.labels), _cumulative(family.buckets, s.counts), s.value)
            yield hist
            continue
        if family.kind == "counter":
            metric: CounterMetricFamily | GaugeMetricFamily = CounterMetricFamily(
                name.removesuffix("_total"), family.help, labels=family.labels)
        else:
            metric = GaugeMetricFamily(name, family.help, labels=family.labels)
        for s in found:
            metric.add_metric(list(s.labels), s.value)
        yield metric


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, float(total)))
    return out


class Snapshots(Protocol):
    """Other processes' snapshots (``snapshots.SnapshotDirectory``)."""

    def read(self) -> tuple[list[Snapshot], list[Snapshot]]:
        """(snapshots to count, snapshots whose gauges hold now)."""
        ...


class Collector(_Collector):
    """Yields every family from this process's ``Metrics`` plus, under a supervisor, the snapshots its other
    processes wrote."""

    def __init__(self, local: Metrics | None = None, others: Snapshots | None = None) -> None:
        self.local = local
        self.others = others

    def collect(self) -> Iterator[Metric]:
        """The families, merged over processes."""
        counted: list[Snapshot] = []
        live: list[Snapshot] = []
        if self.local is not None:
            snap = self.local.snapshot()
            counted.append(snap)
            live.append(snap)
        if self.others is not None:
            more_counted, more_live = self.others.read()
            counted += more_counted
            live += more_live
        return _families(merge(counted, gauges_from=live))
