"""Turns: one dispatcher at a time takes entries, for at most one slice per pass of the event loop.

Handlers that never wait (most of a trading pipeline's: a few microseconds of arithmetic) run without ever
giving the event loop a chance to read a socket. With ``concurrency`` dispatchers all ready, one pass of the
loop would run every one of them for a slice before polling I/O again, and a critical entry already waiting on
a socket would wait that long. So dispatchers take turns: the one holding the turn runs entries until its
slice is over or a handler waits on I/O; the turn passes on only after the loop has gone round (and polled
I/O) once, to the next dispatcher in line. A handler waiting on I/O holds no turn, so up to ``concurrency``
handlers still wait on I/O at once.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Turns"]


class Turns:
    """A turn passed between dispatchers once per event-loop pass, in arrival order."""

    def __init__(self) -> None:
        self._holder: object | None = None
        self._waiting: deque[tuple[object, asyncio.Future[None]]] = deque()
        self._marked = False

    def holds(self, who: object) -> bool:
        """True while ``who`` has the turn."""
        return self._holder is who

    async def take(self, who: object) -> None:
        """Wait for the turn."""
        if self._holder is None and not self._waiting:
            self._holder = who
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.append((who, fut))
            try:
                await fut
            except asyncio.CancelledError:
                if self._holder is who:  # granted as it was cancelled: hand it on at once
                    self._holder = None
                    self._grant()
                raise
        self._mark()

    def _mark(self) -> None:
        if not self._marked:
            self._marked = True
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        """The loop has gone round since the turn was given: its holder yielded or waits on I/O."""
        self._marked = False
        self._holder = None
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            who, fut = self._waiting.popleft()
            if not fut.done():
                self._holder = who
                fut.set_result(None)
                self._mark()
                return
