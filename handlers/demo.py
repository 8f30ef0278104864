"""A first run: ticks for a few symbols through a worker that turns them into mid-price indicators.

``python -m handlers.demo`` uses ``$FABRIC_REDIS_URL``, else a Redis on localhost:6379, else starts its own
redis-server on a free port for the length of the run. (The full trading pipeline arrives as ``fabric demo``.)
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import uvloop

from fabric import FabricError, Keys, Publisher, Worker, WorkerConfig, connect
from fabric.embedded import redis_url
from fabric.events import Tick
from fabric.handler import as_handler
from handlers.quotes import mid_price

SYMBOLS = 20
TICKS_PER_SYMBOL = 500
RATE_PER_S = 5_000


async def demo(url: str) -> None:
    client = connect(url)
    keys = Keys(f"demo{random.randrange(1 << 30):x}")
    latencies: list[int] = []

    async def handle(tick: Tick) -> object:
        latencies.append(time.time_ns() - tick.ts_ns)
        return await mid_price(tick)

    worker = Worker(client, as_handler(handle, "handlers.quotes:mid_price"),
                    WorkerConfig(group="indicators", topics=["tick"], block_ms=100), keys=keys)
    task = asyncio.create_task(worker.run())
    await worker.wait_joined()
    async with Publisher(client, keys=keys) as pub:  # one tick per symbol first: the worker joins new symbols'
        await pub.publish_many([Tick(symbol=f"SYM{s:02d}", bid=99.0, ask=99.02) for s in range(SYMBOLS)])
    while worker.stats.handled < SYMBOLS:  # streams within discover_interval_ms; measure the steady state
        await asyncio.sleep(0.05)
    latencies.clear()
    total = SYMBOLS * TICKS_PER_SYMBOL + SYMBOLS
    started = time.perf_counter()
    started_loop = asyncio.get_running_loop().time()
    async with Publisher(client, keys=keys) as pub:
        for i in range(TICKS_PER_SYMBOL):  # a steady offered load, so latency measures the fabric, not a backlog
            await asyncio.sleep(max(0.0, started_loop + i * SYMBOLS / RATE_PER_S - asyncio.get_running_loop().time()))
            batch = [Tick(symbol=f"SYM{s:02d}", bid=100 + i * 0.01, ask=100.02 + i * 0.01) for s in range(SYMBOLS)]
            await pub.publish_many(batch)
    while worker.stats.handled + worker.stats.dead_lettered < total:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    outputs = sum([await client.xlen(s) for s in await client.smembers(keys.topic_registry("indicator"))])
    latencies.sort()
    print(f"published {SYMBOLS} warm-up ticks, then {total - SYMBOLS} over {SYMBOLS} symbols at {RATE_PER_S:,}/s; "
          f"handled {worker.stats.handled}, {outputs} indicators out, {worker.stats.dead_lettered} dead letters, "
          f"in {elapsed:.2f}s")
    print(f"tick-to-handler latency: p50 {latencies[len(latencies) // 2] / 1e6:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] / 1e6:.2f} ms")
    await client.aclose()


def main() -> None:
    try:
        with redis_url() as url:
            uvloop.run(demo(url))
    except FabricError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
