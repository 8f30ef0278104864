"""The benchmark's processes: ``python -m bench.procs ROLE --ns NAMESPACE [options]``, on uvloop.

Roles: ``producer`` (N ticks, created before timing, ``publish_many`` in chunks gathered concurrently),
``flooder`` (keeps a backlog of low-priority ticks), ``sender`` (open loop at a fixed rate, ``bench.clock``),
``worker`` (a fabric ``Worker`` with a recording handler, ``bench.recorder``), ``fleet`` (``fabric worker
--config`` with several processes under a supervisor, ``bench.fleet``), and the plain redis-py baseline's
``plain-producer``, ``plain-consumer`` and ``plain-sender`` (``bench.plain``). The Redis URL comes from
``$FABRIC_REDIS_URL``.
Each prints JSON lines (``bench.launcher``): ``ready`` when it may be measured against, ``result`` at the end.
SIGTERM ends a worker or flooder gracefully, with its report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import uvloop

from bench import fleet as fleet_role
from bench import plain
from bench.clock import OpenLoop
from bench.launcher import emit, stop_event
from bench.recorder import MODES, Recorder
from bench.stats import latency_ms
from bench.streams import registered, undelivered
from bench.workload import SYMBOLS, TOPIC, tick, ticks, warm_ticks
from fabric import Keys, Priority, Publisher, Worker, WorkerConfig, connect
from fabric.events import Tick
from fabric.handler import as_handler
from fabric.metrics import HandlerTallies, measured
from fabric.runner import tune_gc
from fabric.telemetry import exposed

__all__ = ["GROUP", "OUTPUT_TOPIC", "main"]

GROUP = "bench"
OUTPUT_TOPIC = "tick_out"
POLL_S = {"noop": 0.001, "outputs": 0.001, "latency": 0.05, "priority": 0.05}
"""Per mode, how often a worker checks whether it is done: the resolution of the end time where throughput is
measured; coarse where latency is (a 1 ms timer would keep the measured loop busy)."""
FLOOD_CHECK_S = 0.05
BACKLOG_STEP = 50_000


async def publish_chunks(pub: Publisher, events: list[Tick], chunk: int, priority: Priority | None) -> int:
    """Publish in chunks gathered concurrently (the publisher batches them); return how many failed."""
    parts = [events[i : i + chunk] for i in range(0, len(events), chunk)]
    outcomes = await asyncio.gather(*(pub.publish_many(p, priority=priority) for p in parts), return_exceptions=True)
    return sum(len(p) for p, o in zip(parts, outcomes, strict=True) if isinstance(o, BaseException))


async def producer(args: argparse.Namespace) -> dict[str, Any]:
    """Publish N ticks as fast as the publisher takes them; time and CPU of the publishing alone."""
    events = ticks(args.events, args.symbols)
    client = connect()
    t_start, cpu, wall = time.time(), time.process_time(), time.perf_counter()
    async with Publisher(client, keys=Keys(args.ns)) as pub:
        failed = await publish_chunks(pub, events, args.chunk, Priority.parse(args.priority))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.aclose()
    return {"published": len(events) - failed, "failed": failed, "t_start": t_start, "wall_s": wall, "cpu_s": cpu}


async def flooder(args: argparse.Namespace) -> dict[str, Any]:
    """Publish ``backlog`` low ticks at once, then refill to ``backlog`` whenever fewer than a tenth of it are
    left undelivered to the group, until SIGTERM. (A backlog that outlasts the measurement keeps the worker
    saturated without a producer competing with it for the CPU.)"""
    client, keys, stop = connect(), Keys(args.ns), stop_event()
    sent = failed = 0
    async with Publisher(client, keys=keys) as pub:
        for start in range(0, args.backlog, BACKLOG_STEP):  # a step at a time: no million objects to free later
            events = [tick(k, args.symbols) for k in range(start, min(start + BACKLOG_STEP, args.backlog))]
            failed += await publish_chunks(pub, events, args.chunk, Priority.LOW)
        sent = args.backlog
        gc.collect()  # nothing left for the collector to do while the measurement runs
        emit(backlog=args.backlog)
        streams = await registered(client, keys, TOPIC, Priority.LOW)
        while not stop.is_set():
            lag = await undelivered(client, streams, GROUP)
            if 0 <= lag < args.backlog // 10:
                want = args.backlog - lag
                failed += await publish_chunks(pub, [tick(sent + k, args.symbols) for k in range(want)],
                                               args.chunk, Priority.LOW)
                sent += want
            await _sleep_unless(stop, FLOOD_CHECK_S)
    await client.aclose()
    return {"published": sent - failed, "failed": failed}


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def sender(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop: ``rate`` ticks a second for ``duration`` seconds, each stamped with its scheduled time."""
    client = connect()
    total = round(args.rate * args.duration)

    def make(i: int, scheduled_ns: int) -> Tick:
        """Tick i, stamped with the time it was due."""
        return tick(i, args.symbols, ts_ns=scheduled_ns)

    async with Publisher(client, keys=Keys(args.ns)) as pub:
        loop = OpenLoop(pub, args.rate, total, make, Priority.parse(args.priority), warm_ticks(args.symbols))
        await loop.run()
    await client.aclose()
    return {"sent": loop.sent - loop.failed, "failed": loop.failed, "t_start": loop.t0_ns / 1e9,
            "lag_ms": latency_ms(loop.lag_ns)}


async def warm_up(client: Any, keys: Keys, symbols: int, priorities: list[Priority]) -> int:
    """One warm-up tick per symbol and priority: creates the streams so the worker joins them before timing."""
    async with Publisher(client, keys=keys) as pub:
        for p in priorities:
            await pub.publish_many(warm_ticks(symbols), priority=p)
    return symbols * len(priorities)


async def until(done: Callable[[], bool], stop: asyncio.Event, run: asyncio.Task[None], poll_s: float) -> bool:
    """Poll ``done`` every ``poll_s``; False if stopped (SIGTERM) or the worker ended first."""
    while not done():
        if stop.is_set() or run.done():
            return False
        await asyncio.sleep(poll_s)
    return True


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, join, report ready; handle until ``expect`` events are acknowledged (or SIGTERM); drain."""
    client, keys, stop = connect(), Keys(args.ns), stop_event()
    warm = await warm_up(client, keys, args.symbols, [Priority.parse(p) for p in args.warm.split(",")])
    rec = Recorder()
    fields = {"group": GROUP, "topics": [TOPIC], **json.loads(args.config)}
    if args.mode == "outputs":
        fields["output_topic"] = OUTPUT_TOPIC
    config = msgspec.convert(fields, WorkerConfig)
    tallies = HandlerTallies() if args.metrics else None  # as `fabric worker --metrics-port` runs it
    w = Worker(client, as_handler(MODES[args.mode](rec), f"bench.{args.mode}"), config, keys=keys,
               middleware=[measured(tallies)] if tallies else [])
    exposing = contextlib.AsyncExitStack()
    if tallies:
        await exposing.enter_async_context(exposed(w, tallies, port=0, host="127.0.0.1"))
    run = asyncio.create_task(w.run())
    poll_s = POLL_S[args.mode]
    if await until(lambda: w.stats.handled >= warm, stop, run, 0.01):
        emit(ready={"streams": len(w.streams), "warm": warm})
    cpu = time.process_time()
    if args.mode in ("priority", "latency"):  # (their sender's warm-up ticks are handled too, not counted)
        reached = await until(lambda: len(rec.seen) >= args.expect, stop, run, poll_s)
    else:
        reached = await until(lambda: w.stats.handled >= warm + args.expect, stop, run, poll_s)
    t_done, cpu = time.time(), time.process_time() - cpu
    w.stop()
    await run
    await exposing.aclose()
    await client.aclose()
    return {"reached": reached, "t_done": t_done, "cpu_s": cpu, "stats": msgspec.structs.asdict(w.stats),
            "config": msgspec.to_builtins(config), **rec.report()}


async def fleet(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then run ``fabric worker --config`` with ``--processes`` worker processes (``bench.fleet``)."""
    client = connect()
    warm = await warm_up(client, Keys(args.ns), args.symbols, [Priority.parse(p) for p in args.warm.split(",")])
    await client.aclose()
    return await fleet_role.fleet(args, GROUP, warm)


ROLES: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "producer": producer, "flooder": flooder, "sender": sender, "worker": worker, "fleet": fleet,
    "plain-producer": plain.produce, "plain-consumer": plain.consume, "plain-sender": plain.send,
}


def parser() -> argparse.ArgumentParser:
    """The command line of every role."""
    top = argparse.ArgumentParser(prog="python -m bench.procs", description=__doc__.splitlines()[0])
    roles = top.add_subparsers(dest="role", required=True)
    for name in ROLES:
        p = roles.add_parser(name)
        p.add_argument("--ns", required=True, help="namespace (key prefix) of this run")
        p.add_argument("--symbols", type=int, default=SYMBOLS)
        p.add_argument("--events", type=int, default=0, help="producers: how many")
        p.add_argument("--chunk", type=int, default=1000, help="producers: events per publish_many / pipeline")
        p.add_argument("--priority", default="normal", help="producer, sender: the priority to publish at")
        p.add_argument("--rate", type=float, default=1000.0, help="sender: events a second")
        p.add_argument("--duration", type=float, default=1.0, help="sender: seconds")
        p.add_argument("--backlog", type=int, default=10_000, help="flooder: undelivered low ticks to keep")
        p.add_argument("--mode", choices=sorted(MODES), default="noop", help="worker: which handler")
        p.add_argument("--expect", type=int, default=0, help="consumers: events to handle before stopping")
        p.add_argument("--warm", default="normal", help="worker: priorities to warm up, comma-separated")
        p.add_argument("--config", default="{}", help="worker, fleet: more WorkerConfig fields, as JSON")
        p.add_argument("--processes", type=int, default=2, help="fleet: worker processes")
        p.add_argument("--metrics", type=int, default=0, help="worker: 1 to count and serve metrics")
    return top


def main(argv: list[str] | None = None) -> None:
    """Run one role; its result (or error) is the last line on stdout."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.role == "worker":
        tune_gc()  # as `fabric worker` does (fabric.runner)
    try:
        result = uvloop.run(ROLES[args.role](args))
    except Exception as exc:
        traceback.print_exc()
        emit(error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    emit(result=result)


if __name__ == "__main__":
    main()
