"""One worker alone, draining a backlog: its CPU per event without a producer beside it, optionally profiled.

    python -m bench.drain [--events 200000] [--symbols 50] [--profile] [--commandstats] [--redis-url URL]
                          [--config JSON] [--metrics]

Publishes the backlog first, then times one in-process worker (no-op handler, acks, tuned GC as ``fabric worker``
runs) from start until every event is acknowledged, and reads the Redis server's CPU time before and after
(``INFO cpu``: what it spent per event, with whatever else it did meanwhile: use the server this command starts).
``--config '{"ordered": true}'``: more ``WorkerConfig`` fields, for instance the ordered mode. ``--metrics``: the
handler measured as ``fabric worker --metrics-port`` measures it (``fabric.metrics.measured``, the ``variant_metrics``
case's middleware), without serving the endpoints, to tell its cost per event. ``--profile`` prints
cProfile's top functions by own time (profiling slows everything down: read the shares, not the speed).
``--commandstats`` resets Redis's command statistics when the worker starts and prints, per command, its calls and
its µs per drained event (``INFO commandstats``: a script's row includes the commands it ran, which have rows too).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
import uuid

import msgspec
import uvloop
from redis.asyncio import Redis

from bench.workload import ticks
from fabric import Keys, Publisher, Worker, WorkerConfig, connect
from fabric.embedded import redis_url
from fabric.handler import as_handler
from fabric.metrics import HandlerTallies, measured
from fabric.runner import tune_gc


async def drain(url: str, events: int, symbols: int, profile: cProfile.Profile | None, config: str = "{}",
                commandstats: bool = False, metrics: bool = False) -> None:
    """Publish ``events`` ticks, then time one worker handling them all."""
    client = connect(url)
    keys = Keys(f"drain{uuid.uuid4().hex[:8]}")
    async with Publisher(client, keys=keys) as pub:
        await pub.publish_many(ticks(events, symbols))

    async def noop(event: object) -> None:
        return None

    fields = {"group": "drain", "topics": ["tick"], **json.loads(config)}
    worker = Worker(client, as_handler(noop), msgspec.convert(fields, WorkerConfig), keys=keys,
                    middleware=[measured(HandlerTallies())] if metrics else [])
    if profile:
        profile.enable()
    if commandstats:
        await client.config_resetstat()
    server = await _server_cpu_s(client)
    wall, cpu = time.perf_counter(), time.process_time()
    run = asyncio.create_task(worker.run())
    while worker.stats.handled < events:
        await asyncio.sleep(0.002)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server = await _server_cpu_s(client) - server
    stats = await client.info("commandstats") if commandstats else {}
    if profile:
        profile.disable()
    worker.stop()
    await run
    for key in [k async for k in client.scan_iter(f"{keys.ns}:*")]:
        await client.unlink(key)
    await client.aclose()
    print(f"drained {events:,} events: {events / wall:,.0f} events/s, worker CPU {cpu / events * 1e6:.2f} µs/event, "
          f"Redis CPU {server / events * 1e6:.2f} µs/event")
    for name, row in sorted(stats.items(), key=lambda kv: -kv[1]["usec"]):
        print(f"  {name.removeprefix('cmdstat_'):<24} {row['calls']:>9,} calls {row['usec'] / events:>7.2f} µs/event")


async def _server_cpu_s(client: Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main() -> None:
    """Parse the command line and run."""
    p = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--symbols", type=int, default=50)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--commandstats", action="store_true", help="Redis's µs per event, command by command")
    p.add_argument("--redis-url")
    p.add_argument("--config", default="{}", help="more WorkerConfig fields, as JSON")
    p.add_argument("--metrics", action="store_true", help="the handler measured, as with --metrics-port")
    args = p.parse_args()
    profile = cProfile.Profile() if args.profile else None
    tune_gc()
    with redis_url(args.redis_url) as url:
        uvloop.run(drain(url, args.events, args.symbols, profile, args.config, args.commandstats, args.metrics))
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
