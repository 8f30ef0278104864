"""How big each scenario is: the full run, and ``--quick`` (seconds, to check that everything runs and loses
nothing; its figures mean nothing)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.workload import SYMBOLS

__all__ = ["FULL", "QUICK", "Settings"]


@dataclass(frozen=True)
class Settings:
    """The sizes and rates of one run of the suite."""

    quick: bool
    repeats: int
    events: int
    """N for publish, end to end, the variants and the plain redis-py baseline."""
    latency_rates: tuple[int, ...]
    latency_s: float
    critical_rate: int
    priority_s: float
    low_backlog: int
    """Low-priority ticks published before the worker starts (refilled below a tenth): more than it handles
    during the measurement, so it stays saturated with no producer competing for the CPU."""
    memory_events: int
    benchmark_requests_p1: int
    benchmark_requests_p64: int
    symbols: int = SYMBOLS
    chunk: int = 1000
    """Events per ``publish_many`` call (all gathered at once, as a bulk producer would)."""
    plain_batch: int = 500
    worker_config: str = "{}"
    """WorkerConfig fields (JSON) for fabric's workers beyond group, topics and output topic; default: none."""

    def but(self, **changes: object) -> Settings:
        """A copy with some values changed (from the command line)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


FULL = Settings(quick=False, repeats=3, events=200_000, latency_rates=(5_000, 20_000), latency_s=10.0,
                critical_rate=1_000, priority_s=10.0, low_backlog=2_500_000, memory_events=100_000,
                benchmark_requests_p1=200_000, benchmark_requests_p64=1_000_000)
QUICK = Settings(quick=True, repeats=1, events=2_000, latency_rates=(5_000, 20_000), latency_s=0.5,
                 critical_rate=1_000, priority_s=0.5, low_backlog=5_000, memory_events=2_000,
                 benchmark_requests_p1=2_000, benchmark_requests_p64=20_000)
