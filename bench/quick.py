"""A first, quick measure of the core (the full suite with baselines and open-loop latency is bench's own
issue): publish-only throughput and producer CPU per event, then end to end through one in-process worker.

    python bench/quick.py [--events 100000] [--symbols 50] [--repeats 3]

Uses $FABRIC_REDIS_URL, else localhost:6379, else starts its own redis-server. Prints a table and one JSON
line (median and spread of the repeats, versions); every figure it prints is checked for loss first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
import uuid

import msgspec
import redis
import uvloop

from fabric import Keys, Publisher, Worker, WorkerConfig, connect
from fabric.embedded import redis_url
from fabric.events import Tick
from fabric.handler import as_handler

CHUNK = 1_000


def ticks(n: int, symbols: int) -> list[Tick]:
    return [Tick(symbol=f"SYM{i % symbols:03d}", bid=100.0 + i * 1e-4, ask=100.01 + i * 1e-4, bid_size=1.5,
                 ask_size=2.5, exchange="BENCH") for i in range(n)]


async def publish_only(url: str, events: list[Tick]) -> dict[str, float]:
    client = connect(url)
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    cpu, wall = time.process_time(), time.perf_counter()
    async with Publisher(client, keys=keys) as pub:
        await asyncio.gather(*(pub.publish_many(events[i : i + CHUNK]) for i in range(0, len(events), CHUNK)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stored = sum([await client.xlen(s) for s in await client.smembers(keys.topic_registry("tick"))])
    assert stored == len(events), f"lost events: {len(events) - stored}"
    await client.aclose()
    return {"events_per_s": len(events) / wall, "cpu_us_per_event": cpu / len(events) * 1e6}


async def end_to_end(url: str, events: list[Tick]) -> dict[str, float]:
    client = connect(url)
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    seen: set[str] = set()

    async def noop(event: Tick) -> None:
        seen.add(event.event_id)

    worker = Worker(client, as_handler(noop), WorkerConfig(group="bench", topics=["tick"], concurrency=64),
                    keys=keys)
    run = asyncio.create_task(worker.run())
    await worker.wait_joined()
    wall = time.perf_counter()
    async with Publisher(client, keys=keys) as pub:
        await asyncio.gather(*(pub.publish_many(events[i : i + CHUNK]) for i in range(0, len(events), CHUNK)))
    while worker.stats.handled < len(events):
        await asyncio.sleep(0.005)
    wall = time.perf_counter() - wall
    worker.stop()
    await run
    assert len(seen) == len(events), f"lost events: {len(events) - len(seen)}"
    await client.aclose()
    return {"events_per_s": len(events) / wall}


def summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in runs[0]}


async def main(args: argparse.Namespace, url: str) -> None:
    events = ticks(args.events, args.symbols)
    size = len(msgspec.msgpack.encode(events[0]))
    results = {
        "publish_only": summary([await publish_only(url, events) for _ in range(args.repeats)]),
        "end_to_end_in_process": summary([await end_to_end(url, events) for _ in range(args.repeats)]),
    }
    info = redis.Redis.from_url(url).info("server")
    print(f"{args.events} ticks ({size} bytes encoded) over {args.symbols} symbols, {args.repeats} repeats, "
          f"Redis {info['redis_version']}, Python {platform.python_version()}, {platform.machine()}")
    for scenario, figures in results.items():
        for name, f in figures.items():
            spread = f"(min {f['min']:,.1f}, max {f['max']:,.1f})"
            print(f"  {scenario:24s} {name:18s} median {f['median']:>12,.1f}  {spread}")
    print(json.dumps({"events": args.events, "symbols": args.symbols, "encoded_bytes": size,
                      "redis": info["redis_version"], "python": platform.python_version(), "results": results}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    with redis_url() as found:
        uvloop.run(main(arguments, found))
