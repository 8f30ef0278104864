"""Where an event's latency goes, stage by stage, at a fixed open-loop rate; and the machine's own floor.

    python -m bench.latency [--rate 5000] [--seconds 5] [--redis-url URL]

A sender process (``bench.clock.OpenLoop``, as in the ``latency_*`` cases) publishes ticks over 50 symbols to a
worker process (fabric's ``Worker``, defaults, a no-op handler). Both stamp every event on the wall clock (one
machine, one clock): the sender when the event was due (its ``ts_ns``), when it was made, and when the
publisher packed its batch; the worker when its read's reply was taken and when the handler ran. The stages:

- ``harness``    made - due: the sender's own lateness (its sleep, its wake-up);
- ``publisher``  packed - made: ``publish_many`` to the publisher's sender task;
- ``redis``      taken - packed: the write, Redis running publish.lua and answering the worker's blocked
                 XREADGROUP, and the worker's wake-up and read;
- ``worker``     handled - taken: from the read to the handler (lanes, dispatch, decode);
- ``total``      handled - due, what the ``latency_*`` cases report.

To stamp, it wraps two private methods (``Publisher._pack``, ``Worker._take``), which adds a little work to
each; the stages show where the time goes, the suite's cases what it totals.

``ping`` is the floor under all of it: a blocking socket sends PING at the same rate, paced the same way, and
times each reply. Its round trip is two wake-ups (Redis's, then the client's) and almost no work; on a virtual
machine whose idle cores halt, a wake-up costs far more than the work around it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import uvloop

from bench.clock import OpenLoop, precise_sleeps
from bench.server import redis_target
from bench.workload import SYMBOLS, tick
from fabric import Keys, Publisher, Worker, WorkerConfig, connect
from fabric.events import Event, Tick
from fabric.handler import as_handler

__all__ = ["ping", "stages"]

STAGES = ("harness", "publisher", "redis", "worker", "total")
START_S = 10.0


def _worker(url: str, ns: str, expect: int, out: Any) -> None:
    async def main() -> None:
        client = connect(url)
        taken: dict[tuple[str, bytes], int] = {}
        take = Worker._take

        def stamped(self: Worker, priority: Any, reply: Any) -> int:
            now = time.time_ns()
            for name, entries in reply.items() if isinstance(reply, dict) else reply:
                stream = name.decode() if isinstance(name, bytes) else name
                for entry_id, _ in entries:
                    taken[(stream, entry_id)] = now
            return take(self, priority, reply)

        Worker._take = stamped  # type: ignore[method-assign]
        seen: list[tuple[str, int, int, int]] = []

        async def handler(event: Event, ctx: Any) -> None:
            seen.append((event.event_id, event.ts_ns, taken.pop((ctx.stream, ctx.entry_id.encode()), 0),
                         time.time_ns()))

        keys = Keys(ns)
        async with Publisher(client, keys=keys) as pub:  # the streams exist before the worker joins them
            await pub.publish_many([tick(i, SYMBOLS, exchange="WARMUP") for i in range(SYMBOLS)])
        worker = Worker(client, as_handler(handler), WorkerConfig(group="latency", topics=["tick"]), keys=keys)
        run = asyncio.create_task(worker.run())
        await _until(lambda: worker.stats.handled >= SYMBOLS)
        seen.clear()
        out.put("ready")
        await _until(lambda: len(seen) >= expect, 60 + expect / 1000)
        worker.stop()
        await run
        await client.aclose()
        out.put(seen)

    uvloop.run(main())


def _sender(url: str, ns: str, rate: float, total: int, out: Any) -> None:
    async def main() -> None:
        client = connect(url)
        made: dict[str, int] = {}
        packed: dict[str, int] = {}
        pack = Publisher._pack

        def stamped(self: Publisher, batch: Any) -> bytes:
            now = time.time_ns()
            for request in batch.requests:
                for item in request.items:
                    packed[item[3]] = now
            return pack(self, batch)

        Publisher._pack = stamped  # type: ignore[method-assign]

        def make(i: int, scheduled_ns: int) -> Tick:
            t = tick(i, SYMBOLS, ts_ns=scheduled_ns)
            made[t.event_id] = time.time_ns()
            return t

        async with Publisher(client, keys=Keys(ns)) as pub:
            await OpenLoop(pub, rate, total, make).run()
        await client.aclose()
        out.put((made, packed))

    uvloop.run(main())


async def _until(done: Callable[[], bool], timeout_s: float = START_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit("bench.latency: the worker did not get there in time")
        await asyncio.sleep(0.01)


def stages(url: str, rate: float, seconds: float) -> dict[str, list[int]]:
    """Each stage's durations (ns), one per event, from a run at ``rate`` for ``seconds``."""
    ns, total = f"latency{uuid.uuid4().hex[:8]}", round(rate * seconds)
    ctx = mp.get_context("spawn")
    from_worker, from_sender = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=_worker, args=(url, ns, total, from_worker))
    worker.start()
    if from_worker.get(timeout=60) != "ready":
        raise SystemExit("bench.latency: the worker did not start")
    sender = ctx.Process(target=_sender, args=(url, ns, rate, total, from_sender))
    sender.start()
    made, packed = from_sender.get(timeout=120 + seconds)
    seen = from_worker.get(timeout=120 + seconds)
    sender.join()
    worker.join()
    found: dict[str, list[int]] = {name: [] for name in STAGES}
    for event_id, due, taken, handled in seen:
        m, p = made[event_id], packed[event_id]
        if not taken:
            raise SystemExit(f"bench.latency: event {event_id} was handled without its read being stamped")
        for name, value in zip(STAGES, (m - due, p - m, taken - p, handled - taken, handled - due), strict=True):
            found[name].append(value)
    return found


def ping(url: str, rate: float, seconds: float) -> list[int]:
    """Round trips (ns) of a PING sent at ``rate`` for ``seconds`` on a blocking socket, paced as the sender is."""
    parts = urlsplit(url)
    precise_sleeps()
    times = []
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parts.password:
            s.sendall(f"AUTH {parts.username or 'default'} {parts.password}\r\n".encode())
            s.recv(64)
        step = 1e9 / rate
        t0 = time.time_ns()
        for i in range(round(rate * seconds)):
            delay = (t0 + i * step - time.time_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            sent = time.time_ns()
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                raise SystemExit("bench.latency: PING was not answered with PONG")
            times.append(time.time_ns() - sent)
    return times


def _row(name: str, values: list[int]) -> str:
    values = sorted(values)
    at = [values[min(len(values) - 1, int(len(values) * q))] / 1000 for q in (0.5, 0.9, 0.99)]
    return f"{name:10s} p50 {at[0]:8.1f} µs   p90 {at[1]:8.1f} µs   p99 {at[2]:8.1f} µs"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=5000, help="events a second (default 5,000)")
    p.add_argument("--seconds", type=float, default=5, help="how long to send (default 5)")
    p.add_argument("--redis-url", help="Redis to measure (default $FABRIC_REDIS_URL, else a dedicated redis-server)")
    args = p.parse_args()
    with redis_target(args.redis_url) as target:
        found = stages(target.url, args.rate, args.seconds)
        floor = ping(target.url, args.rate, args.seconds)
    print(f"{len(found['total']):,} events at {args.rate:,.0f}/s; where their latency went:")
    for name in STAGES:
        print(_row(name, found[name]))
    print(_row("ping", floor) + "   (a PING's round trip at the same rate: two wake-ups, no work)")


if __name__ == "__main__":
    main()
