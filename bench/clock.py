"""An open-loop sender: event i is due at ``t0 + i/rate`` (wall clock), whatever Redis or the worker do.

The event loop's timers tick in whole milliseconds, too coarse for 5,000 events a second, so the sender blocks
the event loop's own thread with ``time.sleep`` (precise to a few microseconds once Linux's timer slack is set to 1 µs)
until the next due time, publishes every event that is due by then in one ``publish_many`` task, never awaited
inline (a slow reply never delays the next send), and yields to the event loop a few times so the publisher
writes it, then sleeps again. Nothing else of the process needs the loop meanwhile: replies are read between
sends. Each event carries its *scheduled* time as ``ts_ns``, so a sender that falls behind sends the overdue
events at once and their lateness counts as latency (no coordinated omission). The sender's own lag (sent minus
scheduled) is reported beside it, to tell the harness's lateness from the fabric's.

Before the clock starts, the sender publishes its warm-up events (one tick per symbol, marked ``WARMUP``, which
the handlers skip) and waits for them: the connection, the publish script and the producer's session on every
stream are then in place, as in a producer that has been running, and the first measured events do not pay for
them (about 10 ms over the first 50 events at 5,000/s in a one-off before this warm-up).

(An earlier sender slept in a second thread and woke the loop with ``call_soon_threadsafe``: one more thread
wake-up per send, about 60 µs more of the sender's own lag at the median on the reference machine.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

from fabric import Priority
from fabric.events import Event

__all__ = ["OpenLoop", "precise_sleeps"]

MIN_STEP_NS = 200_000
"""The sender wakes at most every 200 µs (several events per wake-up above 5,000/s)."""
START_DELAY_NS = 50_000_000
FLUSH_YIELDS = 3
"""Loop iterations after each send: the publish task runs, wakes the publisher's sender task, which writes."""
PR_SET_TIMERSLACK = 29
"""prctl(2): a thread's timer slack, by which Linux may defer its timed sleeps (50 µs by default)."""


class Sends(Protocol):
    """What the open loop publishes with: fabric's ``Publisher``, or the plain baseline's pipeline."""

    async def publish_many(self, events: list[Any], priority: Any = None) -> Any: ...


class OpenLoop:
    """Publishes ``total`` events at ``rate`` a second on the clock; ``make(i, scheduled_ns)`` builds event i."""

    def __init__(self, pub: Sends, rate: float, total: int, make: Callable[[int, int], Event],
                 priority: Priority | None = None, warm: list[Event] | None = None) -> None:
        self.pub = pub
        self.warm = warm or []
        self.rate = rate
        self.total = total
        self.make = make
        self.priority = priority
        self.t0_ns = 0
        self.sent = 0
        self.failed = 0
        self.lag_ns: list[int] = []
        self._tasks: set[asyncio.Task[object]] = set()

    def scheduled_ns(self, i: int) -> int:
        """When event i is due, Unix nanoseconds."""
        return self.t0_ns + int(i * 1e9 / self.rate)

    async def run(self) -> None:
        """Send the warm-up and wait for it; then everything on schedule, then wait for every publish and count
        the failed events."""
        if self.warm:
            await self.pub.publish_many(self.warm, priority=self.priority)
        precise_sleeps()
        self.t0_ns = time.time_ns() + START_DELAY_NS
        wake = self.t0_ns
        while self.sent < self.total:
            delay = (wake - time.time_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)  # blocks the loop on purpose: a loop timer would wake up to 1 ms late
            self._fire()
            for _ in range(FLUSH_YIELDS):
                await asyncio.sleep(0)
            # The next unsent event's due time (at most one wake-up per MIN_STEP_NS, on the same grid): a late
            # wake-up never shifts the ones after it, and one past due sends everything overdue at once.
            wake = max(self.scheduled_ns(self.sent), wake + MIN_STEP_NS)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _fire(self) -> None:
        now = time.time_ns()
        due = min(self.total, int((now - self.t0_ns) * self.rate / 1e9) + 1) if now >= self.t0_ns else 0
        if due <= self.sent:
            return
        events = []
        for i in range(self.sent, due):
            scheduled = self.scheduled_ns(i)
            events.append(self.make(i, scheduled))
            self.lag_ns.append(now - scheduled)
        task = asyncio.get_running_loop().create_task(self.pub.publish_many(events, priority=self.priority))
        task.add_done_callback(functools.partial(self._done, n=len(events)))
        self._tasks.add(task)
        self.sent = due

    def _done(self, task: asyncio.Task[object], *, n: int) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            self.failed += n


def precise_sleeps() -> None:
    """Ask Linux to wake this thread's sleeps within a microsecond of their time, not within the default 50 µs of
    timer slack (a no-op where prctl is missing: the sender's own lag, reported, then shows it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
