"""When a failed entry is tried again: backoff that grows with the delivery count, with jitter, and the timer
that holds parked entries until then (the worker keeps them fresh in Redis meanwhile, so a live worker's
retries are never taken over; a dead worker's are reclaimed by the others)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
from typing import Generic, TypeVar

__all__ = ["RetryTimer", "backoff_ms"]

T = TypeVar("T")


def backoff_ms(deliveries: int, base_ms: int, max_ms: int) -> float:
    """Delay before delivery ``deliveries + 1``: ``base * 2^(deliveries-1)`` capped at ``max``, then a uniform
    draw from its upper half (equal jitter: it still grows, and retries of many entries spread out)."""
    ceiling = float(min(max_ms, base_ms * 2 ** max(0, deliveries - 1)))
    return ceiling / 2 + random.random() * ceiling / 2


class RetryTimer(Generic[T]):
    """Items parked until a due time (monotonic seconds)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._closed = False

    def park(self, item: T, delay_s: float) -> None:
        """Hold ``item`` for ``delay_s`` seconds."""
        due = asyncio.get_running_loop().time() + delay_s
        heapq.heappush(self._heap, (due, next(self._seq), item))
        self._changed.set()

    async def due(self) -> list[T]:
        """Wait until at least one item is due; return all that are, or [] once closed."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            self._changed.clear()
            now = loop.time()
            if self._heap and self._heap[0][0] <= now:
                ready = []
                while self._heap and self._heap[0][0] <= now:
                    ready.append(heapq.heappop(self._heap)[2])
                return ready
            wait = self._heap[0][0] - now if self._heap else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
        return []

    def close(self) -> list[T]:
        """Drop and return every parked item; ``due`` returns [] from now on."""
        self._closed = True
        self._changed.set()
        items = [item for _, _, item in self._heap]
        self._heap.clear()
        return items
