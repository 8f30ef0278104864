"""Figures from samples: percentiles of latencies (sorted lists, no numpy) and median/min/max over repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["PERCENTILES", "latency_ms", "percentile", "spread", "summarize"]

PERCENTILES = {"p50": 50.0, "p99": 99.0, "p99_9": 99.9}


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_ms(samples_ns: Iterable[int]) -> dict[str, float]:
    """p50, p99, p99.9 and max of latencies given in nanoseconds, in milliseconds (all NaN when empty)."""
    ordered = sorted(samples_ns)
    if not ordered:
        return {**{name: math.nan for name in PERCENTILES}, "max": math.nan}
    figures = {name: percentile(ordered, pct) / 1e6 for name, pct in PERCENTILES.items()}
    figures["max"] = ordered[-1] / 1e6
    return figures


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the repeats of one figure."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every numeric figure the runs share (booleans and nested values are left out)."""
    names = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: spread([float(r[k]) for r in runs]) for k in names if all(k in r for r in runs)}
