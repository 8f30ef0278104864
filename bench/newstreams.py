"""How long a new symbol's first event waits: from its publish to its handler, when its stream is new to Redis.

    python -m bench.newstreams [--symbols 20] [--redis-url URL]

A worker with fabric's defaults (``discover_interval_ms`` and ``block_ms`` 1 s) runs on one symbol's stream;
then each of ``--symbols`` new symbols gets one tick, published once the previous one was handled, a random
moment (up to ``GAP_S``) apart, so that it lands anywhere in the worker's discovery round and blocked read. For
each mode (unordered, ordered) it prints the time from each first tick's publish to its handler, and the same
for a tick on a stream the worker already reads (the steady case, for scale). The worker and the producer share
this process's event loop (as in ``bench.drain``); the figures are wall-clock milliseconds.

What it measures: a new stream's topic is announced when it is added to its registry (``fabric.registry``), the
worker joins the stream then (an ordered worker also takes its lease), and ends its lane's blocked read so the
next read includes it. Without the announcement a stream waited for the next discovery (up to
``discover_interval_ms``), and without the unblock for the lane's read to end (up to ``block_ms``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

import msgspec
import uvloop

from fabric import Keys, Publisher, Worker, WorkerConfig, connect
from fabric.embedded import redis_url
from fabric.events import Tick
from fabric.handler import as_handler

__all__ = ["first_events"]

GAP_S = 0.5
"""The most a tick waits after the previous one was handled (uniformly random, so it lands anywhere)."""
HANDLED_WITHIN_S = 30.0
MODES = {"unordered": {}, "ordered": {"ordered": True}}


async def first_events(url: str, symbols: int, config: dict[str, object], seed: int = 7) -> dict[str, list[float]]:
    """Milliseconds from publish to handler: of each new symbol's first tick (``new``), and of one more tick on
    an already read stream after each (``steady``)."""
    client = connect(url)
    keys = Keys(f"newstreams{uuid.uuid4().hex[:8]}")
    handled: dict[str, float] = {}
    rng = random.Random(seed)

    async def record(tick: Tick) -> None:
        handled[tick.event_id] = time.perf_counter()

    async def publish_and_wait(pub: Publisher, symbol: str) -> float:
        await asyncio.sleep(rng.uniform(0, GAP_S))
        tick = Tick(symbol=symbol, bid=1.0, ask=1.1)
        sent = time.perf_counter()
        await pub.publish(tick)
        deadline = sent + HANDLED_WITHIN_S
        while tick.event_id not in handled:
            if time.perf_counter() > deadline:
                raise SystemExit(f"bench.newstreams: {symbol}'s tick was not handled within {HANDLED_WITHIN_S:g} s")
            await asyncio.sleep(0.0002)
        return (handled[tick.event_id] - sent) * 1000

    worker = Worker(client, as_handler(record), msgspec.convert({"group": "g", "topics": ["tick"], **config},
                                                                 WorkerConfig), keys=keys)
    found: dict[str, list[float]] = {"new": [], "steady": []}
    async with Publisher(client, keys=keys) as pub:
        await pub.publish(Tick(symbol="BASE", bid=1.0, ask=1.1))
        run = asyncio.create_task(worker.run())
        await worker.wait_joined()
        await publish_and_wait(pub, "BASE")
        for i in range(symbols):
            found["new"].append(await publish_and_wait(pub, f"NEW{i:03d}"))
            found["steady"].append(await publish_and_wait(pub, "BASE"))
        worker.stop()
        await run
    for key in [k async for k in client.scan_iter(f"{keys.ns}:*")]:
        await client.unlink(key)
    await client.aclose()
    return found


def _row(label: str, ms: list[float]) -> str:
    ms = sorted(ms)
    return (f"{label:<32} p50 {statistics.median(ms):8.2f} ms   p90 {ms[int(0.9 * (len(ms) - 1))]:8.2f} ms   "
            f"max {ms[-1]:8.2f} ms")


def main() -> None:
    """Parse the command line and run."""
    p = argparse.ArgumentParser(prog="python -m bench.newstreams", description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=20, help="new symbols, one first tick each (default 20)")
    p.add_argument("--redis-url")
    args = p.parse_args()
    with redis_url(args.redis_url) as url:
        for mode, config in MODES.items():
            found = uvloop.run(first_events(url, args.symbols, config))
            print(_row(f"{mode}: a new stream's first", found["new"]))
            print(_row(f"{mode}: a read stream's", found["steady"]))


if __name__ == "__main__":
    main()
