"""Where an event's latency goes, stage by stage, at a fixed open-loop rate; and the machine's own floor.

    python -m bench.latency [--rate 5000] [--seconds 5] [--bystander] [--redis-url URL]
    python -m bench.latency --flood 2500000 [--rate 1000] [--seconds 10]   # the critical lane under a low flood

A sender process (``bench.clock.OpenLoop``, as in the ``latency_*`` cases) publishes ticks over 50 symbols to a
worker process (fabric's ``Worker``, defaults, a no-op handler). Both stamp every event on the wall clock (one
machine, one clock): the sender when the event was due (its ``ts_ns``), when it was made, and when the
publisher packed its batch; the worker when its read's reply was taken and when the handler ran. The stages:

- ``harness``    made - due: the sender's own lateness (its sleep, its wake-up);
- ``publisher``  packed - made: ``publish_many`` to the publisher's sender task;
- ``redis``      taken - packed: the write, Redis running publish.lua and answering the worker's blocked
                 XREADGROUP, and the worker's wake-up and read;
- ``worker``     handled - taken: from the read to the handler (lanes, dispatch, decode);
- ``total``      handled - due, what the ``latency_*`` cases report;

and, with ``--flood`` or ``--bystander``, the ``redis`` stage split in two by a bystander process, a second reader
of the same streams (in a group of its own, with nothing else to do), stamping when it got each entry:

- ``redis-seen`` seen by the bystander - packed: the write, Redis getting round to it (behind the other clients'
                 commands) and answering a blocked read, and the bystander's wake-up;
- ``wake``       taken - seen by the bystander: the worker's part, its event loop getting round to the reply (or,
                 if no read of its own was waiting in Redis when the entry came, to sending one).

The bystander is off by default without a flood: it makes Redis answer a second blocked reader for every event,
which at a low rate costs about as much CPU as the worker's own read, so the other stages come out larger than
in the suite's ``latency_*`` cases. Under a flood that extra read is small beside the flood's.

With ``--flood N`` it splits the ``priority`` case instead: a flooder process first publishes N low ticks (more
than the worker handles while the sender runs, so it stays saturated; the run says so if the flood ran dry),
the worker starts on them, and the sender publishes critical ticks; only those are stamped and reported. Beside
the stages it prints each process's CPU during the sender's run (Redis's from ``INFO cpu``, the worker's and
the sender's from ``time.process_time``): on a small machine, what is left for a wake-up.

To stamp, it wraps private methods (``Publisher._pack``; ``Worker._take``, and ``Ordered._take`` for a worker in
the ordered mode, ``--worker-config '{"ordered": true}'``), which adds a little work to each; the stages show
where the time goes, the suite's cases what it totals.

``ping`` is the floor under all of it: a blocking socket sends PING at the same rate, paced the same way, and
times each reply. Its round trip is two wake-ups (Redis's, then the client's) and almost no work; on a virtual
machine whose idle cores halt, a wake-up costs far more than the work around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis
import uvloop

from bench.clock import OpenLoop, precise_sleeps
from bench.procs import publish_chunks
from bench.server import redis_target
from bench.workload import SYMBOLS, WARMUP, symbol, tick, warm_ticks
from fabric import Keys, Priority, Publisher, Worker, WorkerConfig, connect
from fabric.events import Event, Tick
from fabric.handler import as_handler
from fabric.ordered import Ordered
from fabric.runner import tune_gc

__all__ = ["ping", "stages"]

STAGES = ("harness", "publisher", "redis", "worker", "total", "redis-seen", "wake")
START_S = 10.0
GROUP = "latency"
FLOOD_STEP = 50_000
"""The flooder makes this many ticks at a time (no million objects at once)."""
FLOOD_CHUNK = 1000
"""Events per ``publish_many`` call of the flooder, as in the ``priority`` case."""


def _stamp_reads(measured: Priority) -> dict[tuple[str, bytes], int]:
    """Make this process's worker stamp when each entry of ``measured``'s priority was taken from a read
    (``Worker._take``, or ``Ordered._take`` in the ordered mode); return (stream, entry id) → when."""
    taken: dict[tuple[str, bytes], int] = {}
    take, take_ordered = Worker._take, Ordered._take

    def stamped(self: Worker, priority: Priority, reply: Any) -> int:
        if priority == measured:  # under a flood, the low lane's reads are not stamped (nor slowed)
            now = time.time_ns()
            for name, entries in reply.items() if isinstance(reply, dict) else reply:
                stream = name.decode() if isinstance(name, bytes) else name
                for entry_id, _ in entries:
                    taken[(stream, entry_id)] = now
        return take(self, priority, reply)

    def stamped_ordered(self: Ordered, entries: dict[str, list[Any]], *args: Any) -> int:
        now = time.time_ns()
        for stream, got in entries.items():
            if (o := self.owned.get(stream)) is not None and o.ref.priority == measured:  # (no lanes: one read)
                for entry_id, _ in got:
                    taken[(stream, entry_id)] = now
        return take_ordered(self, entries, *args)

    Worker._take = stamped  # type: ignore[method-assign]
    Ordered._take = stamped_ordered  # type: ignore[method-assign]
    return taken


def _worker(url: str, ns: str, expect: int, measured: Priority, config: dict[str, Any], out: Any) -> None:
    async def main() -> None:
        client = connect(url)
        taken = _stamp_reads(measured)
        seen: list[tuple[str, int, int, int, tuple[str, bytes]]] = []
        label = measured.label
        others = warm = 0

        async def handler(event: Event, ctx: Any) -> None:
            nonlocal others, warm
            if ctx.priority != label:
                others += 1
                return
            if isinstance(event, Tick) and event.exchange == WARMUP:  # the worker's, then the sender's
                warm += 1
                return
            entry = (ctx.stream, ctx.entry_id.encode())
            seen.append((event.event_id, event.ts_ns, taken.pop(entry, 0), time.time_ns(), entry))

        keys = Keys(ns)
        async with Publisher(client, keys=keys) as pub:  # the streams exist before the worker joins them
            await pub.publish_many(warm_ticks(), priority=measured)
        fields = {"group": GROUP, "topics": ["tick"], **config}
        worker = Worker(client, as_handler(handler), msgspec.convert(fields, WorkerConfig), keys=keys)
        run = asyncio.create_task(worker.run())
        await _until(lambda: warm >= SYMBOLS)
        out.put("ready")
        cpu = time.process_time()
        await _until(lambda: len(seen) >= expect, 60 + expect / 1000)
        cpu, low = time.process_time() - cpu, others
        worker.stop()
        await run
        await client.aclose()
        out.put((seen, cpu, low))

    tune_gc()  # as `fabric worker` does, and the suite's worker processes
    uvloop.run(main())


def _sender(url: str, ns: str, rate: float, total: int, priority: Priority, out: Any) -> None:
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

        cpu = time.process_time()
        async with Publisher(client, keys=Keys(ns)) as pub:
            await OpenLoop(pub, rate, total, make, priority, warm_ticks()).run()
        cpu = time.process_time() - cpu
        await client.aclose()
        out.put((made, packed, cpu))

    uvloop.run(main())


def _flooder(url: str, ns: str, flood: int, out: Any) -> None:
    """Publish ``flood`` low ticks (as the ``priority`` case's flooder does, in chunks gathered at once), then
    end: the worker starts on a backlog that outlasts the run."""
    async def main() -> None:
        client = connect(url)
        async with Publisher(client, keys=Keys(ns)) as pub:
            for start in range(0, flood, FLOOD_STEP):
                events = [tick(k, SYMBOLS) for k in range(start, min(start + FLOOD_STEP, flood))]
                if await publish_chunks(pub, events, FLOOD_CHUNK, Priority.LOW):
                    raise SystemExit("bench.latency: the flooder could not publish")
        await client.aclose()
        out.put(flood)

    uvloop.run(main())


def _bystander(url: str, ns: str, priority: Priority, total: int, out: Any) -> None:
    """A second reader of the measured streams, in a group of its own, with nothing else to do: when it got each
    entry splits the ``redis`` stage into Redis's part and the worker's (``redis-seen`` and ``wake``)."""
    keys = Keys(ns)
    streams = {keys.stream("tick", priority, symbol(i)): ">" for i in range(SYMBOLS)}
    got: dict[tuple[str, bytes], int] = {}
    with redis.Redis.from_url(url) as r:
        for s in streams:
            r.xgroup_create(s, "bystander", id="$", mkstream=True)
        out.put("ready")
        deadline = time.monotonic() + 120 + total / 100
        while len(got) < total + SYMBOLS and time.monotonic() < deadline:  # (the sender's warm-up too)
            reply = r.xreadgroup("bystander", "b", streams, count=1000, block=1000, noack=True)  # type: ignore[arg-type]
            now = time.time_ns()
            for name, entries in reply or ():
                for entry_id, _ in entries:
                    got[(name.decode(), entry_id)] = now
    out.put(got)


def _redis_cpu_s(url: str) -> float:
    """Redis's CPU time so far (user + system, ``INFO cpu``)."""
    with redis.Redis.from_url(url) as r:
        info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _until(done: Callable[[], bool], timeout_s: float = START_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit("bench.latency: the worker did not get there in time")
        await asyncio.sleep(0.01)


def stages(url: str, rate: float, seconds: float, flood: int = 0, cpu: dict[str, float] | None = None,
           config: dict[str, Any] | None = None, bystander: bool | None = None) -> dict[str, list[int]]:
    """Each stage's durations (ns), one per event, from a run at ``rate`` for ``seconds``; with ``flood``, of
    critical events while the worker works through that many low ones published first. ``cpu``, if given,
    receives each process's share of a core during the sender's run (``redis``, ``worker``, ``sender``) and
    ``flood_left``, the low ticks still unhandled at the end (0: the flood ran dry, the run was not saturated).
    ``config``: more ``WorkerConfig`` fields for the worker. ``bystander`` (default: with a flood only) fills the
    ``redis-seen`` and ``wake`` stages; without it they are empty."""
    ns, total = f"latency{uuid.uuid4().hex[:8]}", round(rate * seconds)
    priority = Priority.CRITICAL if flood else Priority.NORMAL
    ctx = mp.get_context("spawn")
    from_worker, from_sender = ctx.Queue(), ctx.Queue()
    if flood:
        flooder = ctx.Process(target=_flooder, args=(url, ns, flood, from_sender))
        flooder.start()
        from_sender.get(timeout=60 + flood / 10_000)
        flooder.join()
    worker = ctx.Process(target=_worker, args=(url, ns, total, priority, config or {}, from_worker))
    worker.start()
    if from_worker.get(timeout=60) != "ready":
        raise SystemExit("bench.latency: the worker did not start")
    from_bystander = ctx.Queue()
    watcher = ctx.Process(target=_bystander, args=(url, ns, priority, total, from_bystander))
    if bool(flood) if bystander is None else bystander:
        watcher.start()
        from_bystander.get(timeout=60)
    sender = ctx.Process(target=_sender, args=(url, ns, rate, total, priority, from_sender))
    redis_cpu, wall = _redis_cpu_s(url), time.perf_counter()
    sender.start()
    made, packed, sender_cpu = from_sender.get(timeout=120 + seconds)
    redis_cpu, wall = _redis_cpu_s(url) - redis_cpu, time.perf_counter() - wall
    seen, worker_cpu, others = from_worker.get(timeout=120 + seconds)
    by: dict[tuple[str, bytes], int] = {}
    if watcher.pid is not None:
        by = from_bystander.get(timeout=120 + seconds)
        watcher.join()
    sender.join()
    worker.join()
    if cpu is not None:
        cpu.update(redis=redis_cpu / wall, worker=worker_cpu / wall, sender=sender_cpu / wall,
                   flood_left=max(0, flood - others) if flood else 0)
    found: dict[str, list[int]] = {name: [] for name in STAGES}
    for event_id, due, taken, handled, entry in seen:
        m, p = made[event_id], packed[event_id]
        if not taken:
            raise SystemExit(f"bench.latency: event {event_id} was handled without its read being stamped")
        values = [m - due, p - m, taken - p, handled - taken, handled - due]
        if by:
            values += [by[entry] - p, taken - by[entry]]
        for name, value in zip(STAGES, values, strict=False):
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
    p.add_argument("--rate", type=float, help="events a second (default 5,000; 1,000 with --flood)")
    p.add_argument("--seconds", type=float, help="how long to send (default 5; 10 with --flood)")
    p.add_argument("--flood", type=int, default=0,
                   help="low ticks published before the worker starts; the sender then publishes critical ticks "
                        "(the priority case; 2,500,000 is its backlog)")
    p.add_argument("--worker-config", default="{}", metavar="JSON",
                   help='more WorkerConfig fields for the worker, e.g. \'{"prefetch": 256}\' (default: none)')
    p.add_argument("--bystander", action=argparse.BooleanOptionalAction,
                   help="split the redis stage with a second reader of the same streams (default: with --flood only; "
                        "it adds a blocked read per event to Redis's work)")
    p.add_argument("--redis-url", help="Redis to measure (default $FABRIC_REDIS_URL, else a dedicated redis-server)")
    args = p.parse_args()
    rate = args.rate or (1000 if args.flood else 5000)
    seconds = args.seconds or (10 if args.flood else 5)
    cpu: dict[str, float] = {}
    with redis_target(args.redis_url) as target:
        found = stages(target.url, rate, seconds, args.flood, cpu, json.loads(args.worker_config), args.bystander)
        floor = ping(target.url, rate, seconds)
    what = "critical events under a flood of low ones" if args.flood else "events"
    print(f"{len(found['total']):,} {what} at {rate:,.0f}/s; where their latency went:")
    for name in STAGES:
        if found[name]:
            print(_row(name, found[name]))
    print(_row("ping", floor) + "   (a PING's round trip at the same rate: two wake-ups, no work)")
    print(f"CPU during the run, share of one core: redis {cpu['redis']:.0%}, worker {cpu['worker']:.0%}, "
          f"sender {cpu['sender']:.0%}")
    if args.flood and not cpu["flood_left"]:
        print("the flood ran dry before the end: the worker was not saturated throughout (raise --flood)")


if __name__ == "__main__":
    main()
