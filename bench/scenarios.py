"""fabric's scenarios, one function per repeat: publish, end to end, open-loop latency, the critical lane under
a low-priority flood, the variants of end to end, and Redis memory per retained event.

Each returns its figures and the counts the suite checks (``lost``, ``unacked``, ``failed``), taken from Redis
itself (XLEN, XPENDING, XINFO GROUPS) and from the handler's record of unique event ids.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from typing import Any

import msgspec

from bench.launcher import Child
from bench.procs import GROUP, OUTPUT_TOPIC
from bench.streams import pending, registered, stored, undelivered
from bench.suite import Run
from bench.workload import TOPIC
from fabric import Priority
from fabric.nodes import is_cluster

__all__ = ["VARIANTS", "end_to_end", "latency", "memory", "priority", "publish"]

READY_S = 60.0
SAMPLE_S = 0.2
"""How often the low lane's backlog is sampled during the priority scenario."""


def deadline(events: int) -> float:
    """A generous time limit for moving ``events`` events (a deadline against hangs, not a measurement)."""
    return 60.0 + events / 2_000


async def redis_cpu_s(run: Run) -> float | None:
    """The server's CPU time so far (``INFO cpu``, user + system, its main thread and the rest), in seconds; None
    on a cluster (the figure is one server's). A difference over a case, divided by its events, is what Redis
    spent per event, with whatever else that server did meanwhile."""
    if is_cluster(run.client):
        return None
    info = await run.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def per_event_us(before: float | None, after: float | None, n: int) -> dict[str, float]:
    """``redis_cpu_us_per_event`` from two ``redis_cpu_s`` readings, when there are both."""
    return {} if before is None or after is None else {"redis_cpu_us_per_event": (after - before) / n * 1e6}


async def _worker(run: Run, **options: object) -> Child:
    """A fabric worker process (with the run's extra WorkerConfig fields), once it has joined and is ready."""
    worker = await run.spawn("worker", config=run.settings.worker_config, **options)
    await worker.expect("ready", READY_S)
    return worker


async def publish(run: Run) -> dict[str, Any]:
    """One producer process publishes N ticks; every one must be stored."""
    n = run.settings.events
    before = await redis_cpu_s(run)
    produced = await (await run.spawn("producer", events=n, chunk=run.settings.chunk)).result(deadline(n))
    cpu = per_event_us(before, await redis_cpu_s(run), n)
    got = await stored(run.client, await registered(run.client, run.keys, TOPIC))
    return {"events_per_s": n / produced["wall_s"], "cpu_us_per_event": produced["cpu_s"] / n * 1e6, **cpu,
            "stored": got, "lost": max(0, n - got), "failed": produced["failed"]}


async def _through_worker(run: Run, mode: str, metrics: bool = False, **config: object) -> dict[str, Any]:
    """A worker process (joined, ready) then a producer process; figures from first publish to last ack."""
    n = run.settings.events
    extra = json.dumps({**json.loads(run.settings.worker_config), **config})
    worker = await run.spawn("worker", config=extra, mode=mode, expect=n, metrics=int(metrics))
    await worker.expect("ready", READY_S)
    before = await redis_cpu_s(run)
    produced = await (await run.spawn("producer", events=n, chunk=run.settings.chunk)).result(deadline(n))
    handled = await worker.finish(deadline(n))
    cpu = per_event_us(before, await redis_cpu_s(run), n)
    streams = await registered(run.client, run.keys, TOPIC)
    return {"events_per_s": n / (handled["t_done"] - produced["t_start"]),
            "worker_events_per_s": n / (handled["t_done"] - (handled["t_first"] or produced["t_start"])),
            "worker_cpu_us_per_event": handled["cpu_s"] / n * 1e6, **cpu, "handled": handled["unique"],
            "duplicates": handled["duplicates"], "lost": n - handled["unique"],
            "unacked": await pending(run.client, streams, GROUP), "failed": produced["failed"]}


async def end_to_end(run: Run) -> dict[str, Any]:
    """Producer and worker processes, no-op handler: N events from the first publish to the last ack."""
    return await _through_worker(run, "noop")


async def variant_outputs(run: Run) -> dict[str, Any]:
    """End to end with a handler that returns one new tick per input (outputs and ack committed together)."""
    return await _with_outputs(run)


async def _with_outputs(run: Run, **config: object) -> dict[str, Any]:
    """End to end with the outputs handler; every output must be stored too."""
    figures = await _through_worker(run, "outputs", **config)
    outputs = await stored(run.client, await registered(run.client, run.keys, OUTPUT_TOPIC))
    figures["outputs"] = outputs
    figures["lost"] += max(0, run.settings.events - outputs)
    return figures


async def variant_metrics(run: Run) -> dict[str, Any]:
    """End to end with metrics on, as ``fabric worker --metrics-port`` runs them: handler duration and latency
    histograms, the group sampler, the endpoints (cost target: at most 10%)."""
    return await _through_worker(run, "noop", metrics=True)


async def variant_ordered(run: Run) -> dict[str, Any]:
    """End to end in ordered mode: each of the 50 symbols' streams handled one entry after another, their commits
    (fenced) in order; the no-op handler's entries have no outputs, so none waits for the ack of the one before
    (target: at least 70% of unordered)."""
    return await _through_worker(run, "noop", ordered=True)


async def variant_processes(run: Run) -> dict[str, Any]:
    """End to end with two worker processes under one supervisor (fabric worker --config, processes = 2).

    Done when Redis has every entry delivered to the group and acknowledged."""
    n = run.settings.events
    fleet = await run.spawn("fleet", config=run.settings.worker_config, processes=2, expect=n)
    await fleet.expect("ready", READY_S)
    produced = await (await run.spawn("producer", events=n, chunk=run.settings.chunk)).result(deadline(n))
    done = await fleet.result(deadline(n))
    streams = await registered(run.client, run.keys, TOPIC)
    return {"events_per_s": n / (done["t_done"] - produced["t_start"]), "handled": done["handled"],
            "lost": n - done["handled"], "unacked": await pending(run.client, streams, GROUP),
            "failed": produced["failed"] + (done["exit_code"] != 0), "processes": done["processes"]}


async def variant_ordered_outputs(run: Run) -> dict[str, Any]:
    """End to end in ordered mode with outputs: each committed before its stream's next entry starts.

    Each stream moves one entry per commit round trip (informational, against the unordered mode with outputs)."""
    return await _with_outputs(run, ordered=True)


async def variant_ordered_ahead(run: Run) -> dict[str, Any]:
    """End to end in ordered mode with outputs and commit_ahead = 16.

    A stream handles its next entries while its commit is in flight (still in order, committed in order), for
    handlers that do not read back the previous entry's outputs (informational)."""
    return await _with_outputs(run, ordered=True, commit_ahead=16)


VARIANTS = {"outputs": variant_outputs, "metrics": variant_metrics, "ordered": variant_ordered,
            "ordered_outputs": variant_ordered_outputs, "ordered_ahead": variant_ordered_ahead,
            "processes_2": variant_processes}
"""End-to-end variants: adding one is one function."""


def _latency_figures(prefix: str, lat: dict[str, float] | None) -> dict[str, float]:
    lat = lat or dict.fromkeys(("p50", "p99", "p99_9", "max"), float("nan"))
    return {f"{prefix}{name}_ms": value for name, value in lat.items()}


async def latency(run: Run, rate: int) -> dict[str, Any]:
    """Open loop at ``rate`` events/s: tick-to-handler latency from each event's scheduled time."""
    total = round(rate * run.settings.latency_s)
    worker = await _worker(run, mode="latency", expect=total)
    sender = await run.spawn("sender", rate=rate, duration=run.settings.latency_s)
    sent = await sender.result(run.settings.latency_s + deadline(total))
    handled = await worker.finish(deadline(total))
    streams = await registered(run.client, run.keys, TOPIC)
    return {**_latency_figures("", handled.get("latency_ms")), "sent": sent["sent"], "handled": handled["unique"],
            **_latency_figures("sender_lag_", sent["lag_ms"]),
            "lost": sent["sent"] - handled["unique"], "unacked": await pending(run.client, streams, GROUP),
            "failed": sent["failed"]}


async def _sample(run: Run, streams: list[str], into: list[int]) -> None:
    while True:
        into.append(await undelivered(run.client, streams, GROUP))
        await asyncio.sleep(SAMPLE_S)


async def priority(run: Run) -> dict[str, Any]:
    """Critical ticks at a fixed rate (open loop) while a flood of low ones keeps the worker saturated."""
    s = run.settings
    total = round(s.critical_rate * s.priority_s)
    flooder = await run.spawn("flooder", backlog=s.low_backlog, chunk=s.chunk)
    await flooder.expect("backlog", READY_S + deadline(s.low_backlog))
    low = await registered(run.client, run.keys, TOPIC, Priority.LOW)
    worker = await _worker(run, mode="priority", expect=total, warm="critical")
    backlog: list[int] = []
    sampler = asyncio.create_task(_sample(run, low, backlog))
    sender = await run.spawn("sender", rate=s.critical_rate, duration=s.priority_s, priority="critical")
    sent = await sender.result(s.priority_s + deadline(total))
    sampler.cancel()
    handled = await worker.finish(deadline(total))
    flooder.signal()
    flooded = await flooder.result(READY_S)
    return {**_latency_figures("critical_", handled.get("latency_ms")), "critical_sent": sent["sent"],
            **_low_lane(handled, flooded, backlog), "handled": handled["unique"],
            **_latency_figures("sender_lag_", sent["lag_ms"]), "failed": sent["failed"] + flooded["failed"],
            "lost": sent["sent"] - handled["unique"] + await _low_lost(run, low, handled, flooded),
            "unacked": await pending(run.client, await registered(run.client, run.keys, TOPIC, Priority.CRITICAL),
                                     GROUP)}


def _low_lane(handled: dict[str, Any], flooded: dict[str, Any], backlog: list[int]) -> dict[str, Any]:
    """How the low lane fared while the critical ticks ran: handled meanwhile, and its smallest backlog."""
    lane = handled.get("low") or {"at_first_critical": 0, "at_last_critical": 0, "critical_window_s": 0.0}
    during = lane["at_last_critical"] - lane["at_first_critical"]
    window = lane["critical_window_s"]
    return {"low_handled_during": during, "low_per_s_during": during / window if window > 0 else 0.0,
            "low_backlog_min": min(backlog, default=-1), "low_backlog_samples": backlog,
            "low_published": flooded["published"]}


async def _low_lost(run: Run, low: list[str], handled: dict[str, Any], flooded: dict[str, Any]) -> int:
    """Low ticks unaccounted for: each published one is stored, and handled, pending (handed back) or unread."""
    in_streams = await stored(run.client, low)  # (the worker warms up critical streams only)
    seen = (handled.get("low") or {}).get("unique", 0)
    rest = await pending(run.client, low, GROUP) + await undelivered(run.client, low, GROUP)
    return max(0, flooded["published"] - in_streams) + max(0, in_streams - seen - rest)


async def memory(run: Run) -> dict[str, Any]:
    """One stream of M ticks of one symbol: Redis memory per retained entry against the encoded payload."""
    m = run.settings.memory_events
    produced: Child = await run.spawn("producer", events=m, symbols=1, chunk=run.settings.chunk)
    await produced.result(deadline(m))
    [stream] = await registered(run.client, run.keys, TOPIC)
    usage = await run.client.memory_usage(stream, samples=0)
    length = await run.client.xlen(stream)
    sample = [fields[b"data"] for _, fields in await run.client.xrange(stream, count=100)]
    payload = statistics.fmean(len(d) for d in sample)
    dedup = [await run.client.memory_usage(run.keys.dedup(stream, _event_id(d)), samples=0) for d in sample]
    return {"bytes_per_event": usage / length, "payload_bytes": payload, "ratio_to_payload": usage / length / payload,
            "dedup_bytes_per_event": statistics.fmean(d or 0 for d in dedup), "stored": length,
            "lost": max(0, m - length)}


def _event_id(data: bytes) -> str:
    return str(msgspec.msgpack.decode(data)["event_id"])
