"""What the same Redis does without fabric: ``redis-benchmark`` XADD of an entry shaped like fabric's, and a
plain redis-py producer and consumer (``bench.plain``) measured exactly like fabric's publish and end to end."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
from typing import Any

from bench.plain import GROUP, stream_keys
from bench.scenarios import READY_S, deadline, per_event_us, redis_cpu_s
from bench.streams import pending, stored
from bench.suite import NotAvailable, Run
from bench.workload import encoded_size, same_shape_fields
from fabric.client import redact

__all__ = ["plain_end_to_end", "plain_latency", "plain_publish", "redis_benchmark"]

BENCHMARK_TIMEOUT_S = 600.0


def benchmark_command(run: Run, url: str, pipeline: int, requests: int, same_shape: bool) -> list[str]:
    """redis-benchmark XADD: fabric's four fields over 50 streams (``-r``), or the classic ``XADD s * f v``."""
    head = ["redis-benchmark", "-u", url, "-n", str(requests), "-P", str(pipeline), "-q", "--csv"]
    if same_shape:
        key = f"{run.keys.ns}:rb:__rand_int__"
        return [*head, "-r", str(run.settings.symbols), "XADD", key, "*", *same_shape_fields(encoded_size())]
    return [*head, "XADD", f"{run.keys.ns}:rb:s", "*", "f", "v"]


def parse_rps(output: str) -> float:
    """The requests per second from ``redis-benchmark --csv`` (header line, then one line per test)."""
    rows = list(csv.DictReader(io.StringIO(output)))
    if not rows:
        raise RuntimeError(f"no figures in redis-benchmark's output: {output[-500:]!r}")
    return float(rows[-1]["rps"])


async def redis_benchmark(run: Run, pipeline: int, same_shape: bool = True) -> dict[str, Any]:
    """One redis-benchmark run against the Redis under test; the entries it wrote are counted."""
    if shutil.which("redis-benchmark") is None:
        raise NotAvailable("redis-benchmark is not installed (it comes with redis-server / redis-tools)")
    s = run.settings
    requests = s.benchmark_requests_p1 if pipeline == 1 else s.benchmark_requests_p64
    command = benchmark_command(run, run.bench.target.url, pipeline, requests, same_shape)
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), BENCHMARK_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited with {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    keys = [k async for k in run.client.scan_iter(match=f"{run.keys.ns}:rb:*", count=1000)]
    written = await stored(run.client, keys)
    shown = [redact(a) if a == run.bench.target.url else a for a in command]
    if same_shape:
        shown[-1] = f"<{len(shown[-1])} printable bytes>"
    return {"requests_per_s": parse_rps(out.decode()), "requests": requests, "stored": written,
            "lost": max(0, requests - written), "command": " ".join(shown)}


async def plain_publish(run: Run) -> dict[str, Any]:
    """The plain redis-py producer alone: N ticks in pipelined XADD batches; every one must be stored."""
    n = run.settings.events
    before = await redis_cpu_s(run)
    producer = await run.spawn("plain-producer", events=n, chunk=run.settings.plain_batch)
    produced = await producer.result(deadline(n))
    cpu = per_event_us(before, await redis_cpu_s(run), n)
    got = await stored(run.client, stream_keys(run.keys.ns, run.settings.symbols).values())
    return {"events_per_s": n / produced["wall_s"], "cpu_us_per_event": produced["cpu_s"] / n * 1e6, **cpu,
            "stored": got, "lost": max(0, n - got), "failed": produced["failed"]}


async def plain_end_to_end(run: Run) -> dict[str, Any]:
    """Plain redis-py consumer (joined, ready) then producer; from the first XADD to the last XACK."""
    n = run.settings.events
    consumer = await run.spawn("plain-consumer", expect=n)
    await consumer.expect("ready", READY_S)
    before = await redis_cpu_s(run)
    producer = await run.spawn("plain-producer", events=n, chunk=run.settings.plain_batch)
    produced = await producer.result(deadline(n))
    handled = await consumer.finish(deadline(n))
    cpu = per_event_us(before, await redis_cpu_s(run), n)
    streams = stream_keys(run.keys.ns, run.settings.symbols).values()
    return {"events_per_s": n / (handled["t_done"] - produced["t_start"]), **cpu,
            "worker_events_per_s": n / (handled["t_done"] - (handled["t_first"] or produced["t_start"])),
            "worker_cpu_us_per_event": handled["cpu_s"] / n * 1e6, "handled": handled["unique"],
            "lost": n - handled["unique"], "unacked": await pending(run.client, streams, GROUP),
            "failed": produced["failed"]}


async def plain_latency(run: Run, rate: int) -> dict[str, Any]:
    """Plain redis-py at ``rate`` events/s, open loop as fabric's latency cases: each tick's time since it was due,
    taken when the consumer decodes it."""
    total = round(rate * run.settings.latency_s)
    consumer = await run.spawn("plain-consumer", expect=total, mode="latency")
    await consumer.expect("ready", READY_S)
    sender = await run.spawn("plain-sender", rate=rate, duration=run.settings.latency_s)
    sent = await sender.result(run.settings.latency_s + deadline(total))
    handled = await consumer.finish(deadline(total))
    streams = stream_keys(run.keys.ns, run.settings.symbols).values()
    lat, lag = handled["latency_ms"] or {}, sent["lag_ms"] or {}
    return {**{f"{k}_ms": v for k, v in lat.items()}, **{f"sender_lag_{k}_ms": v for k, v in lag.items()},
            "sent": sent["sent"], "handled": handled["unique"], "lost": sent["sent"] - handled["unique"],
            "unacked": await pending(run.client, streams, GROUP), "failed": sent["failed"]}
