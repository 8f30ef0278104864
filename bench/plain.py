"""The plain redis-py baseline: what a competent user writes by hand with ``redis.asyncio`` and hiredis.

The producer pipelines XADD of the same msgpack-encoded ``Tick`` (fields ``type v enc data``, as fabric writes)
in batches of 500, one ``pipeline(transaction=False)`` after another. The consumer reads the 50 streams with one
XREADGROUP (COUNT 500, BLOCK), decodes each entry with a msgspec decoder, and acknowledges what it read with
one XACK per stream, pipelined. No dedup, no priorities, no retries, no reclaim: the bare minimum. The sender is
the open loop of fabric's latency cases (``bench.clock``), each wake-up's due ticks XADDed in one pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec
from redis.asyncio import Redis

from bench.clock import OpenLoop
from bench.launcher import emit, stop_event
from bench.stats import latency_ms
from bench.workload import WARMUP, symbol, tick, ticks, warm_ticks
from fabric.client import resolve_url
from fabric.events import Tick

__all__ = ["GROUP", "Pipelined", "consume", "produce", "send", "stream_keys"]

GROUP = "plain"
BLOCK_MS = 1000


def stream_keys(prefix: str, symbols: int) -> dict[str, str]:
    """Symbol → stream key: one stream per symbol under the run's prefix."""
    return {symbol(i, symbols): f"{prefix}:plain:{symbol(i, symbols)}" for i in range(symbols)}


def client() -> Redis:
    """redis.asyncio with its defaults (hiredis parser when installed, bytes replies)."""
    return Redis.from_url(resolve_url(None))


async def produce(args: argparse.Namespace) -> dict[str, Any]:
    """XADD N ticks in pipelined batches; time and CPU of the encoding and sending."""
    events = ticks(args.events, args.symbols)
    streams = stream_keys(args.ns, args.symbols)
    encoder = msgspec.msgpack.Encoder()
    r = client()
    t_start, cpu, wall = time.time(), time.process_time(), time.perf_counter()
    for i in range(0, len(events), args.chunk):
        async with r.pipeline(transaction=False) as pipe:
            for e in events[i : i + args.chunk]:
                pipe.xadd(streams[e.symbol], _fields(encoder, e))
            await pipe.execute()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await r.aclose()
    return {"published": len(events), "failed": 0, "t_start": t_start, "wall_s": wall, "cpu_s": cpu}


def _fields(encoder: msgspec.msgpack.Encoder, event: Tick) -> dict[str, Any]:
    return {"type": "Tick", "v": "1", "enc": "msgpack", "data": encoder.encode(event)}


class Pipelined:
    """What the open loop sends with: the due ticks XADDed in one pipeline."""

    def __init__(self, r: Redis, streams: dict[str, str]) -> None:
        self.r, self.streams, self.encoder = r, streams, msgspec.msgpack.Encoder()

    async def publish_many(self, events: list[Tick], priority: object = None) -> list[Any]:
        async with self.r.pipeline(transaction=False) as pipe:
            for e in events:
                pipe.xadd(self.streams[e.symbol], _fields(self.encoder, e))
            return await pipe.execute()  # type: ignore[no-any-return]


async def send(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop at ``rate`` for ``duration`` seconds, each tick stamped with the time it was due."""
    r = client()
    loop = OpenLoop(Pipelined(r, stream_keys(args.ns, args.symbols)), args.rate, round(args.rate * args.duration),
                    lambda i, due: tick(i, args.symbols, ts_ns=due), warm=warm_ticks(args.symbols))
    await loop.run()
    await r.aclose()
    return {"sent": loop.sent - loop.failed, "failed": loop.failed, "lag_ms": latency_ms(loop.lag_ns)}


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    """Create the group on every stream, report ready, then read, decode and ack until ``expect`` are seen."""
    stop = stop_event()
    r = client()
    streams = list(stream_keys(args.ns, args.symbols).values())
    for s in streams:
        await r.xgroup_create(s, GROUP, id="0", mkstream=True)
    emit(ready={"streams": len(streams)})
    cpu = time.process_time()
    latencies: list[int] | None = [] if args.mode == "latency" else None
    seen, t_first = await _read(r, streams, args.expect, stop, latencies)
    t_done, cpu = time.time(), time.process_time() - cpu
    await r.aclose()
    unique = len(set(seen))
    return {"reached": unique >= args.expect, "t_done": t_done, "t_first": t_first, "cpu_s": cpu,
            "unique": unique, **({"latency_ms": latency_ms(latencies)} if latencies is not None else {})}


async def _read(r: Redis, streams: list[str], expect: int, stop: asyncio.Event,
                latencies: list[int] | None = None) -> tuple[list[str], float | None]:
    """Read, decode and ack; the ids seen go into a list (made unique after timing, as fabric's recorder does);
    with ``latencies``, also each tick's time since it was due, taken as it is decoded (as fabric's handler)."""
    decoder = msgspec.msgpack.Decoder(Tick)
    offsets = dict.fromkeys(streams, ">")
    seen: list[str] = []
    t_first = None
    while len(seen) < expect and not stop.is_set():
        reply = await r.xreadgroup(GROUP, "c1", offsets, count=500, block=BLOCK_MS)  # type: ignore[arg-type]
        if not reply:
            continue
        t_first = t_first or time.time()
        async with r.pipeline(transaction=False) as pipe:
            for stream, entries in reply:
                for _, fields in entries:
                    event = decoder.decode(fields[b"data"])
                    if event.exchange == WARMUP:  # the sender's warm-up: acked, not counted
                        continue
                    seen.append(event.event_id)
                    if latencies is not None:
                        latencies.append(time.time_ns() - event.ts_ns)
                pipe.xack(stream, GROUP, *(entry_id for entry_id, _ in entries))
            await pipe.execute()
    return seen, t_first
