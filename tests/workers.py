"""Running workers inside a test: always stopped, never left hanging, crashes reported."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fabric import Worker

STOP_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run workers in this loop until the block ends, then stop them and wait; a crash fails the test."""
    tasks = [asyncio.create_task(w.run(), name=f"worker-{w.consumer}") for w in workers]
    try:
        for w, t in zip(workers, tasks, strict=True):
            joined = asyncio.create_task(w.wait_joined())
            await asyncio.wait({joined, t}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            joined.cancel()
            await asyncio.gather(joined, return_exceptions=True)
            if t.done():
                break
        yield tasks
    finally:
        for w in workers:
            w.stop()
        await stopped(tasks)


async def stopped(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for ``run()`` tasks after ``stop()``: fail (never hang) if one does not return, raise its crash."""
    _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
    for t in stuck:
        t.cancel()
    if stuck:
        await asyncio.wait(stuck, timeout=STOP_TIMEOUT_S)
        raise AssertionError(f"{len(stuck)} worker run() did not return within {STOP_TIMEOUT_S}s of stop()")
    for t in tasks:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
