"""What this machine charges for what every event needs: a wake-up, a round trip, a read over 50 streams, a task
switch. The floor under the latency and throughput figures (README, Performance, "What limits").

    python -m bench.machine [--redis-url URL] [--quick]

Each row is one measurement, per operation (``--quick``: a tenth of the operations, to check that it runs):

- ``sleep``: ``time.sleep(200 µs)``, as the open-loop sender sleeps between sends (timer slack 1 µs): the CPU
  time the process is charged per wake-up, and the wall time per sleep.
- ``ping xN``: N processes at once, each sending PING on its own blocking socket and waiting for the reply, one
  after another: the client's CPU and the wall time per round trip (Redis wakes up, then the client).
- ``xreadgroup``: Redis's own time per XREADGROUP (``INFO commandstats``): over 50 empty streams back to back
  (COUNT 1, no BLOCK); then blocked on 1 stream and on 50, each read woken by an XADD to one of its streams (sent
  a millisecond after the read, so that the read has blocked). At a low rate every event costs the worker's lane
  one such blocked read, which blocks on every stream of the lane.
- ``sender``: the suite's open-loop sender (``bench.clock.OpenLoop``) at 5,000 events/s, with a publisher that
  does nothing (the harness's own cost), fabric's ``Publisher``, and the plain baseline's pipeline: its CPU per
  event, Redis answering and nothing reading.
- ``handoff``: 50 entries a round, each passed to its own waiting task through a future (as the ordered mode
  wakes a stream's task), against handled inline by a plain call: wall time per entry (uvloop, one process).

Each figure is this run's; run it again beside a figure you doubt. It measures the machine, not fabric: only
the ``sender`` row has fabric in it. The ``xreadgroup`` rows reset the server's command statistics (``CONFIG
RESETSTAT``): use the server this command starts, or one nobody else is measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis
import uvloop

from bench.clock import OpenLoop, precise_sleeps
from bench.plain import Pipelined, stream_keys
from bench.server import redis_target
from bench.workload import SYMBOLS, tick
from fabric import Keys, Priority, Publisher, connect

__all__ = ["handoff", "read_cost", "round_trips", "sender_cpu", "wakeups"]

SLEEP_S = 0.0002
PACED_S = 0.001
"""How long after sending a read to block the XADD that wakes it is sent."""
SENDER_RATE = 5000
SENDERS = ("nothing", "fabric", "plain")


def wakeups(n: int) -> dict[str, float]:
    """CPU and wall µs per ``time.sleep(SLEEP_S)``."""
    precise_sleeps()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        time.sleep(SLEEP_S)
    return {"cpu_us": (time.process_time() - cpu) / n * 1e6, "wall_us": (time.perf_counter() - wall) / n * 1e6}


def _pinger(url: str, n: int, start: Any, out: Any) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if parts.password:
            s.sendall(f"AUTH {parts.username or 'default'} {parts.password}\r\n".encode())
            s.recv(64)
        start.wait()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                raise SystemExit("bench.machine: PING was not answered with PONG")
        out.put(((time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6))


def round_trips(url: str, connections: int, n: int) -> dict[str, float]:
    """Client CPU and wall µs per PING round trip, ``connections`` processes at once (the mean of theirs)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_pinger, args=(url, n, start, out)) for _ in range(connections)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return {"cpu_us": statistics.fmean(c for c, _ in got), "wall_us": statistics.fmean(w for _, w in got)}


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if parts.password:
        _call(s, hiredis.Reader(), "AUTH", parts.username or "default", parts.password)
    return s


def _reply(s: socket.socket, reader: hiredis.Reader) -> Any:
    while (reply := reader.gets()) is False:
        data = s.recv(65536)
        if not data:
            raise SystemExit("bench.machine: Redis closed the connection")
        reader.feed(data)
    if isinstance(reply, hiredis.ReplyError):
        raise SystemExit(f"bench.machine: Redis answered {reply}")
    return reply


def _call(s: socket.socket, reader: hiredis.Reader, *args: Any) -> Any:
    s.sendall(hiredis.pack_command(args))
    return _reply(s, reader)


def read_cost(url: str, n: int, blocked: bool, streams: int = SYMBOLS) -> dict[str, float]:
    """Redis's µs per XREADGROUP over ``streams`` streams (``INFO commandstats``): over empty streams back to back
    (not ``blocked``), or blocked, each woken ``PACED_S`` later (once it has blocked) by an XADD to one of them."""
    keys = [f"bench:machine:{i}" for i in range(streams)]
    reader, waker, admin = (_connect(url) for _ in range(3))
    r_reader, r_waker, r_admin = hiredis.Reader(), hiredis.Reader(), hiredis.Reader()
    read = ["XREADGROUP", "GROUP", "machine", "c", "COUNT", 1, *(["BLOCK", 10_000] if blocked else []),
            "STREAMS", *keys, *[">"] * streams]
    try:
        for k in keys:
            _call(admin, r_admin, "XGROUP", "CREATE", k, "machine", "$", "MKSTREAM")
        _call(admin, r_admin, "CONFIG", "RESETSTAT")
        for i in range(n):
            if not blocked:
                _call(reader, r_reader, *read)
                continue
            reader.sendall(hiredis.pack_command(tuple(read)))
            time.sleep(PACED_S)  # Redis has blocked the read, and idles
            _call(waker, r_waker, "XADD", keys[i % streams], "*", "f", "v")
            if not _reply(reader, r_reader):
                raise SystemExit("bench.machine: a blocked read woken by an entry came back empty")
        stats = _call(admin, r_admin, "INFO", "commandstats").decode()
    finally:
        with contextlib.suppress(OSError, SystemExit):
            _call(admin, r_admin, "DEL", *keys)
        for s in (reader, waker, admin):
            s.close()
    row = next((line for line in stats.splitlines() if line.startswith("cmdstat_xreadgroup:")), "")
    fields = dict(part.split("=", 1) for part in row.split(":", 1)[-1].split(",") if "=" in part)
    if int(fields.get("calls", 0)) < n:
        raise SystemExit("bench.machine: INFO commandstats did not count the reads (is another client resetting it?)")
    return {"redis_us": float(fields["usec_per_call"])}


class _Nothing:
    """A publisher that publishes nothing: what the open loop costs by itself."""

    async def publish_many(self, events: list[Any], priority: Any = None) -> list[None]:
        return [None] * len(events)


def sender_cpu(url: str, seconds: float, rate: int = SENDER_RATE) -> dict[str, float]:
    """The open-loop sender's CPU µs per event at ``rate``, with each of ``SENDERS``."""
    total = round(rate * seconds)

    def make(i: int, due: int) -> Any:
        return tick(i, SYMBOLS, ts_ns=due)

    async def one(kind: str) -> float:
        client = connect(url)
        plain = redis.asyncio.Redis.from_url(url)
        try:
            cpu = time.process_time()
            if kind == "fabric":
                async with Publisher(client, keys=Keys("machine")) as pub:
                    await OpenLoop(pub, rate, total, make, Priority.NORMAL).run()
            else:
                sends = _Nothing() if kind == "nothing" else Pipelined(plain, stream_keys("machine", SYMBOLS))
                await OpenLoop(sends, rate, total, make).run()
            return (time.process_time() - cpu) / total * 1e6
        finally:
            await client.aclose()
            await plain.aclose()

    found = {kind: uvloop.run(one(kind)) for kind in SENDERS}
    with redis.Redis.from_url(url) as r:
        for key in r.scan_iter(match="machine:*", count=1000):
            r.delete(key)
    return found


def handoff(n: int, tasks: int = SYMBOLS) -> dict[str, float]:
    """Wall µs per entry, ``tasks`` entries a round: each passed to its own waiting task through a future (set,
    then one pass of the loop runs every task), against handled by a plain call in the same round."""

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        rounds = max(1, n // tasks)
        handled = 0

        def handle(_: int) -> None:
            nonlocal handled
            handled += 1

        waiting: list[asyncio.Future[int]] = [loop.create_future() for _ in range(tasks)]

        async def taker(i: int) -> None:
            for _ in range(rounds):
                handle(await waiting[i])
                waiting[i] = loop.create_future()

        takers = [asyncio.create_task(taker(i)) for i in range(tasks)]
        await asyncio.sleep(0)  # every taker waits on its future
        wall = time.perf_counter()
        for _ in range(rounds):
            for i in range(tasks):
                waiting[i].set_result(i)
            await asyncio.sleep(0)  # the takers run
        through = time.perf_counter() - wall
        await asyncio.gather(*takers)
        wall = time.perf_counter()
        for _ in range(rounds):
            for i in range(tasks):
                handle(i)
            await asyncio.sleep(0)
        inline = time.perf_counter() - wall
        if handled != 2 * rounds * tasks:
            raise SystemExit("bench.machine: the hand-off lost entries")
        return {"future_us": through / (rounds * tasks) * 1e6, "inline_us": inline / (rounds * tasks) * 1e6}

    return uvloop.run(main())


def measure(url: str, scale: float = 1.0) -> list[tuple[str, str, float | None, float | None]]:
    """Every row: (what, per what, CPU µs, wall or Redis µs)."""
    def n(full: int) -> int:
        return max(10, round(full * scale))

    rows: list[tuple[str, str, float | None, float | None]] = []
    w = wakeups(n(5000))
    rows.append((f"sleep: time.sleep({SLEEP_S * 1e6:.0f} µs)", "wake-up", w["cpu_us"], w["wall_us"]))
    for conns in (1, 3):
        rt = round_trips(url, conns, n(20_000))
        rows.append((f"ping x{conns}: PING round trips, {conns} connection(s) at once", "round trip", rt["cpu_us"],
                     rt["wall_us"]))
    tight = read_cost(url, n(5000), blocked=False)
    rows.append(("xreadgroup: over 50 empty streams, back to back (Redis's time)", "read", None, tight["redis_us"]))
    for streams in (1, SYMBOLS):
        woken = read_cost(url, n(2000), blocked=True, streams=streams)
        rows.append((f"xreadgroup: blocked on {streams} stream(s), woken by an XADD (Redis's time)", "read", None,
                     woken["redis_us"]))
    sends = sender_cpu(url, 4.0 * scale)
    for kind in SENDERS:
        rows.append((f"sender at {SENDER_RATE:,}/s, publishing with: {kind}", "event", sends[kind], None))
    h = handoff(n(200_000))
    rows.append(("handoff: an entry to a waiting task, through a future", "entry", None, h["future_us"]))
    rows.append(("handoff: an entry handled inline", "entry", None, h["inline_us"]))
    return rows


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.machine", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tenth of the operations: checks that it runs")
    p.add_argument("--redis-url", help="Redis to measure (default $FABRIC_REDIS_URL, else a dedicated redis-server)")
    args = p.parse_args()
    with redis_target(args.redis_url) as target:
        rows = measure(target.url, 0.1 if args.quick else 1.0)
    print(f"{'what':72s} {'per':>11s} {'CPU µs':>9s} {'time µs':>9s}")
    for what, per, cpu, wall in rows:
        print(f"{what:72s} {per:>11s} {_cell(cpu):>9s} {_cell(wall):>9s}")
    print("time µs: wall time, except the xreadgroup rows: Redis's own time per call (INFO commandstats)")


if __name__ == "__main__":
    main()
