"""Prometheus metrics, read from what the workers and publishers already count (the families: ``families.py``).

Nothing is counted twice: a worker counts into ``WorkerStats`` and ``Tally``s (plain integers, no locks), a
publisher into ``Publisher.published``, and the sampler (``sampler.py``) keeps the gauges it reads from Redis.
``Metrics`` turns them into a ``Snapshot`` when asked; ``Collector`` yields Prometheus families from the snapshots
of this process and of the other processes of a supervisor (``snapshots.py``), and is registered on a registry the
caller passes in. Nothing happens at import time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector as _Collector

from fabric.events import Event
from fabric.families import FAMILIES, NAMES, Series, Snapshot, merge
from fabric.handler import Context, HandlerFn, Middleware, blind_to_timeouts
from fabric.keys import Keys
from fabric.tally import SECONDS_BUCKETS, Tally

if TYPE_CHECKING:
    from fabric.publisher import Publisher
    from fabric.worker import Worker

__all__ = ["NAMES", "Collector", "HandlerTallies", "Metrics", "Snapshots", "measured"]


_WORKER_COUNTERS = (
    ("fabric_delivered_events_total", "delivered"), ("fabric_handled_events_total", "handled"),
    ("fabric_failed_events_total", "failed"), ("fabric_retried_events_total", "retried"),
    ("fabric_dead_lettered_events_total", "dead_lettered"), ("fabric_rejected_events_total", "rejected"),
    ("fabric_invalid_events_total", "invalid"), ("fabric_reclaimed_events_total", "reclaimed"),
    ("fabric_refused_commits_total", "refused"), ("fabric_trimmed_pending_events_total", "trimmed_pending"),
)


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

    return blind_to_timeouts(middleware)  # (a timeout and any other failure: measured alike)


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
