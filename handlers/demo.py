"""A first run: ticks for a few symbols through a worker that turns them into mid-price indicators.

``python -m handlers.demo`` uses ``$FABRIC_REDIS_URL``, else a Redis on localhost:6379, else starts its own
redis-server on a free port for the length of the run. (The full trading pipeline arrives as ``fabric demo``.)
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvloop

from fabric import Keys, Publisher, Worker, WorkerConfig, connect
from fabric.client import DEFAULT_URL, resolve_url
from fabric.events import Tick
from fabric.handler import as_handler
from handlers.quotes import mid_price

SYMBOLS = 20
TICKS_PER_SYMBOL = 500


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextmanager
def redis_for_demo() -> Iterator[str]:
    """A URL to a Redis: the configured one, a local one, or one started here."""
    url = resolve_url(None)
    if url != DEFAULT_URL or _answers("127.0.0.1", 6379):
        yield url
        return
    if shutil.which("redis-server") is None:
        sys.exit("error: no Redis answers on localhost:6379 and redis-server is not installed: "
                 "apt-get install -y redis-server, or set FABRIC_REDIS_URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not _answers("127.0.0.1", port):
                if time.monotonic() > deadline:
                    sys.exit("error: the demo's redis-server did not start")
                time.sleep(0.02)
            print(f"started an embedded redis-server on port {port}")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()


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
    total = SYMBOLS * TICKS_PER_SYMBOL
    started = time.perf_counter()
    async with Publisher(client, keys=keys) as pub:
        for i in range(TICKS_PER_SYMBOL):
            batch = [Tick(symbol=f"SYM{s:02d}", bid=100 + i * 0.01, ask=100.02 + i * 0.01) for s in range(SYMBOLS)]
            await pub.publish_many(batch)
    while worker.stats.handled < total:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    worker.stop()
    await task
    outputs = sum([await client.xlen(s) for s in await client.smembers(keys.topic_registry("indicator"))])
    latencies.sort()
    print(f"published {total} ticks over {SYMBOLS} symbols; handled {worker.stats.handled}, "
          f"{outputs} indicators out, {worker.stats.dead_lettered} dead letters, in {elapsed:.2f}s")
    print(f"tick-to-handler latency: p50 {latencies[len(latencies) // 2] / 1e6:.2f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] / 1e6:.2f} ms")
    await client.aclose()


def main() -> None:
    with redis_for_demo() as url:
        uvloop.run(demo(url))


if __name__ == "__main__":
    main()
