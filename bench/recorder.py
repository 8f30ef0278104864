"""The benchmark's handlers: no work beyond recording what they saw (ids, latencies, lanes), so the figures
measure the fabric and not the handler."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.stats import latency_ms
from bench.workload import WARMUP
from fabric import Context
from fabric.events import Tick

__all__ = ["MODES", "Recorder"]


class Recorder:
    """What a worker's handler saw: unique event ids, latencies, and in priority mode the low lane's progress.

    Ids go into lists, made unique only in ``report``: a set of a million ids rehashes itself as it grows,
    stalling the worker's event loop for tens of milliseconds, which the latency figures would then show."""

    def __init__(self) -> None:
        self.warm = 0
        self.calls = 0
        self.seen: list[str] = []
        self.latencies: list[int] = []
        self.t_first: float | None = None
        self.low_seen: list[str] = []
        self.low_at_first_critical = 0
        self.low_at_last_critical = 0
        self.t_first_critical = 0.0
        self.t_last_critical = 0.0

    def _count(self, event: Tick) -> bool:
        """Count a call; False for a warm-up tick (not measured)."""
        if event.exchange == WARMUP:
            self.warm += 1
            return False
        self.calls += 1
        if self.t_first is None:
            self.t_first = time.time()
        return True

    async def noop(self, event: Tick) -> None:
        """Record the id."""
        if self._count(event):
            self.seen.append(event.event_id)

    async def outputs(self, event: Tick) -> Tick | None:
        """Record the id and return one new tick (published with the ack, to the worker's output topic)."""
        if not self._count(event):
            return None
        self.seen.append(event.event_id)
        return Tick(symbol=event.symbol, bid=event.bid, ask=event.ask, bid_size=event.bid_size,
                    ask_size=event.ask_size, exchange=event.exchange)

    async def latency(self, event: Tick) -> None:
        """Record the id and the time since the event was scheduled."""
        now = time.time_ns()
        if self._count(event):
            self.latencies.append(now - event.ts_ns)
            self.seen.append(event.event_id)

    async def priority(self, event: Tick, ctx: Context) -> None:
        """Critical: record latency; anything else: count it as the low lane's progress."""
        now = time.time_ns()
        if not self._count(event):
            return
        if ctx.priority != "critical":
            self.low_seen.append(event.event_id)
            return
        if not self.latencies:
            self.low_at_first_critical = len(self.low_seen)
            self.t_first_critical = now / 1e9
        self.latencies.append(now - event.ts_ns)
        self.seen.append(event.event_id)
        self.low_at_last_critical = len(self.low_seen)
        self.t_last_critical = now / 1e9

    def report(self) -> dict[str, Any]:
        """What was seen, as plain JSON values."""
        unique, low_unique = len(set(self.seen)), len(set(self.low_seen))
        out: dict[str, Any] = {"unique": unique, "duplicates": self.calls - unique - low_unique,
                               "warm": self.warm, "t_first": self.t_first}
        if self.latencies:
            out["latency_ms"] = latency_ms(self.latencies)
        if self.low_seen:
            out["low"] = {"unique": low_unique, "at_first_critical": self.low_at_first_critical,
                          "at_last_critical": self.low_at_last_critical,
                          "critical_window_s": self.t_last_critical - self.t_first_critical}
        return out


MODES: dict[str, Callable[[Recorder], Callable[..., Awaitable[Any]]]] = {
    "noop": lambda r: r.noop,
    "outputs": lambda r: r.outputs,
    "latency": lambda r: r.latency,
    "priority": lambda r: r.priority,
}
"""Worker modes: the handler each uses."""
