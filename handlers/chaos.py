"""What ``fabric demo --chaos`` does to a running pipeline: kill one worker process, take the exchange down.

- ``kill``: SIGKILL (no drain, no goodbye) to one supervised worker process, then wait until the supervisor has
  started its successor. What the dead process held stays pending in Redis and is taken over by its group.
- ``outage``: set ``handlers.broker.outage_key``, so every order the broker stage sends fails with
  ``ExchangeUnavailable``; once the "exchange" breaker has opened (or after ``OUTAGE_MAX_S`` if no order came),
  let the outage end ``OUTAGE_AFTER_TRIP_MS`` later. The key always carries an expiry: a demo that dies mid-outage
  leaves no exchange down behind it.

Each returns one line saying what happened, for the summary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

from redis.asyncio import Redis

from fabric.breaker import describe
from fabric.errors import FabricError, NotFound
from fabric.keys import Keys
from fabric.supervisor import Supervisor
from handlers.broker import outage_key

__all__ = ["OUTAGE_AFTER_TRIP_MS", "OUTAGE_MAX_S", "RESTART_TIMEOUT_S", "kill", "outage", "until"]

OUTAGE_MAX_S = 10.0
"""The longest an outage waits for the breaker to open (no order may reach the exchange meanwhile)."""
OUTAGE_AFTER_TRIP_MS = 1_000
"""How long the exchange stays down after the breaker opened."""
RESTART_TIMEOUT_S = 60.0
POLL_S = 0.05


async def until(check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``check`` every ``POLL_S`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def kill(supervisor: Supervisor, label: str) -> str:
    """SIGKILL the process of worker slot ``label`` (``portfolio[0]``) and wait for its restart."""
    pid = supervisor.running().get(label)
    if pid is None:
        return f"{label} was not running: nothing killed"
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    if not await until(lambda: supervisor.running().get(label) not in (None, pid), RESTART_TIMEOUT_S):
        raise FabricError(f"worker {label} was killed and not restarted within {RESTART_TIMEOUT_S:g} s: "
                          "see the worker log")
    return (f"killed {label} (pid {pid}) with SIGKILL; the supervisor restarted it as pid "
            f"{supervisor.running()[label]} {time.monotonic() - started:.1f} s later")


async def _opened(client: Redis, keys: Keys, breaker: str, generation: int) -> bool:
    try:
        info = await describe(client, keys, breaker, transitions=0)
    except NotFound:  # no broker has started yet
        return False
    return info.generation > generation and info.state != "CLOSED"


async def outage(client: Redis, keys: Keys, breaker: str) -> str:
    """Take the workers' exchange down until ``breaker`` opens, and a moment longer."""
    try:
        generation = (await describe(client, keys, breaker, transitions=0)).generation
    except NotFound:
        generation = 0
    key = outage_key(keys.ns)
    await client.set(key, "fabric demo --chaos", px=int((OUTAGE_MAX_S + 1) * 1000))
    started = time.monotonic()
    deadline = started + OUTAGE_MAX_S
    while not await _opened(client, keys, breaker, generation):
        if time.monotonic() > deadline:
            await client.delete(key)
            return (f"exchange down for {OUTAGE_MAX_S:g} s: no order reached it, so breaker {breaker} "
                    "stayed closed")
        await asyncio.sleep(POLL_S)
    opened_s = time.monotonic() - started
    await client.set(key, "fabric demo --chaos", px=OUTAGE_AFTER_TRIP_MS)
    return (f"exchange down: breaker {breaker} opened {opened_s:.1f} s later (orders waited in Redis), "
            f"the exchange came back {OUTAGE_AFTER_TRIP_MS / 1000:g} s after that")
