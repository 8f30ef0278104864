"""Histogram counts kept in plain Python on the hot path, turned into Prometheus histograms only when scraped.

A ``Tally.observe`` is one bisect and two additions (about 0.1 µs); prometheus-client's ``Histogram.observe``
takes a lock and costs about 0.8 µs, and 1.7 µs in its multiprocess mode, where every call writes a memory-mapped
file (``python -m bench.observe`` measures all three). A worker observes two values per event, so the difference is
a tenth of its whole per-event cost. This module imports nothing from prometheus-client: the read/ack core uses it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["BATCH_BUCKETS", "SECONDS_BUCKETS", "Tally"]

SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
"""Upper bounds for durations and latencies, from 100 µs (a fast handler) to 10 s."""
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0)
"""Upper bounds for entries per read."""


class Tally:
    """Counts of observed values per bucket (``counts[i]``: values ≤ ``bounds[i]``, not cumulative; the last: the
    rest) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def add(self, other: Tally) -> None:
        """Add another tally's counts (same bounds) to this one."""
        if other.bounds != self.bounds:
            raise ValueError("cannot add tallies with different bucket bounds")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum
