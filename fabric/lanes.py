"""Priority lanes: the local queue between reading entries and handling them, and the rule that orders it.

The rule. Each priority has a lane and a weight (critical 8, high 4, normal 2, low 1 by default). Whenever a
handler slot frees up, the next entry comes from the non-empty lane chosen by smooth weighted round robin
(nginx's algorithm): every non-empty lane gains its weight in credit, the lane with the most credit is served
(ties go to the higher priority) and pays back the total weight of the non-empty lanes. So:

- when entries of several priorities wait, the highest one is served first and most often;
- a lower priority still gets its share: under sustained load on every lane, of every 15 entries handled
  8 are critical, 4 high, 2 normal and 1 low; a lane with nothing waiting gives its share to the others;
- each lane holds at most ``capacity`` entries, and the reader only reads the streams of lanes with room, so a
  flood of low-priority entries never keeps critical ones from being read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from fabric.keys import Priority

__all__ = ["DEFAULT_WEIGHTS", "Lanes"]

DEFAULT_WEIGHTS = (1, 2, 4, 8)  # low, normal, high, critical

T = TypeVar("T")


class Lanes(Generic[T]):
    """Bounded per-priority queues served by smooth weighted round robin."""

    def __init__(self, capacity: int, weights: Sequence[int] = DEFAULT_WEIGHTS) -> None:
        if len(weights) != len(Priority) or min(weights) < 1:
            raise ValueError("weights: give one positive integer per priority (low, normal, high, critical)")
        self.capacity = capacity
        self._weights = tuple(weights)
        self._queues: tuple[deque[T], ...] = tuple(deque() for _ in Priority)
        self._top_down = self._queues[::-1]
        self._credit = [0] * len(Priority)
        self._size = 0
        self._closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return self._size

    def room(self, priority: Priority) -> int:
        """How many more entries the lane of ``priority`` takes."""
        return self.capacity - len(self._queues[priority])

    def busy_below(self, priority: Priority) -> bool:
        """True while a lane of lower priority holds entries (the worker has more than this lane to work on)."""
        return any(self._queues[p] for p in range(int(priority)))

    def put(self, priority: Priority, item: T) -> None:
        """Queue an item (the reader checks ``room`` first; a reclaim may overfill by one batch)."""
        self._queues[priority].append(item)
        self._size += 1
        self._wake(1)

    def extend(self, priority: Priority, items: list[T]) -> None:
        """Queue several items of one priority (a read's worth)."""
        if items:
            self._queues[priority].extend(items)
            self._size += len(items)
            self._wake(len(items))

    @property
    def closed(self) -> bool:
        """True once ``close`` was called."""
        return self._closed

    async def wait(self) -> None:
        """Wait until an item is queued or the lanes are closed. One item wakes one waiter, not all of them
        (with 32 dispatchers waiting, waking every one for a single entry cost more than handling it)."""
        if self._size or self._closed:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake(1)  # woken as it was cancelled: pass the wake-up on
            raise

    def _wake(self, n: int) -> None:
        while n > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def _pick(self) -> int:
        best, total = -1, 0
        for p in range(len(self._queues) - 1, -1, -1):
            if self._queues[p]:
                self._credit[p] += self._weights[p]
                total += self._weights[p]
                if best < 0 or self._credit[p] > self._credit[best]:
                    best = p
        self._credit[best] -= total
        return best

    def get_nowait(self) -> T | None:
        """The next item by the rule, or None when every lane is empty."""
        size = self._size
        if not size:
            return None
        for queue in self._top_down:
            if queue:
                if len(queue) == size:  # one lane holds everything: no credit moves (it would pay back exactly
                    break               # what it gains)
                queue = self._queues[self._pick()]
                break
        self._size = size - 1
        item = queue.popleft()
        if len(queue) == self.capacity - 1:  # it had no room, now it has (an overfilled lane: once back under)
            self._room.set()
        return item

    async def get(self) -> T | None:
        """Wait for the next item; None once the lanes are closed."""
        while not self._closed:
            item = self.get_nowait()
            if item is not None:
                return item
            await self.wait()
        return None

    async def wait_room(self, priorities: Iterable[Priority]) -> None:
        """Wait until the lane of one of ``priorities`` has room."""
        wanted = set(priorities)
        while True:
            self._room.clear()
            if any(self.room(p) > 0 for p in wanted):
                return
            await self._room.wait()

    def close(self) -> list[T]:
        """Stop handing out items; return what was still queued."""
        self._closed = True
        self._wake(len(self._waiters))
        left = [item for q in self._queues for item in q]
        for q in self._queues:
            q.clear()
        self._size = 0
        return left
