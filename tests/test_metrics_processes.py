"""Metrics and probes of real ``fabric worker`` processes, scraped over HTTP and parsed with prometheus-client's
own parser: counters move by exactly what was handled, failed and dead-lettered; a supervisor's one target adds up
its processes, restarted ones included; ``/readyz`` turns not-ready while a worker drains."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import ResponseError

from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from tests.fixtures.handlers import gate_key, handled_key, subprocess_env
from tests.test_supervisor import SupervisorProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.real_only, pytest.mark.timeout(120)]

GROUP = "judges"
HANDLER = "tests.fixtures.handlers:judged"
SERVING = re.compile(r"metrics on http://[^:]+:(?P<port>\d+)/metrics")


@pytest.fixture
def start(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Any]:
    """Start ``fabric worker HANDLER ... --metrics-port 0`` (plus ``args``) in the test's namespace."""
    started: list[SupervisorProcess] = []

    def run(*args: str, handler: str = HANDLER) -> SupervisorProcess:
        env = subprocess_env(redis_url, keys.ns)
        proc = SupervisorProcess([handler, "--topic", "tick", "--group", GROUP, "--metrics-port", "0",
                                  "--metrics-host", "127.0.0.1", "--block-ms", "100", "--namespace", keys.ns,
                                  "--redis-url", redis_url, *args], env, tmp_path / f"worker-{len(started)}.log")
        started.append(proc)
        return proc

    try:
        yield run
    finally:
        for proc in started:
            proc.close()


async def port_of(proc: SupervisorProcess) -> int:
    async def logged() -> int:
        m = SERVING.search(proc.output())
        return int(m["port"]) if m else 0

    return await eventually(logged, what="the metrics port in the log")


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:  # noqa: S310 (loopback)
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, port, path)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, parsed by prometheus-client: (name, sorted labels) -> value."""
    status, text = await get(port, "/metrics")
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def worker_counter(samples: dict[Any, float], name: str, handler: str = HANDLER) -> float:
    return samples.get((name, (("group", GROUP), ("handler", handler))), 0.0)


async def publish(redis: Any, keys: Keys, verdicts: dict[str, int], symbols: int = 5) -> None:
    events = [Tick(symbol=f"S{i % symbols}", bid=1.0, ask=1.1, exchange=verdict)
              for verdict, n in verdicts.items() for i in range(n)]
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many(events)


async def test_a_scrape_counts_exactly_what_was_handled_failed_and_dead_lettered(redis, keys, start) -> None:
    # given a worker serving its metrics, and events to handle, reject, and fail at every delivery
    worker = start("--max-deliveries", "2")
    port = await port_of(worker)
    await publish(redis, keys, {"ok": 40, "reject": 3, "fail": 2})

    # when all are done with
    async def settled() -> dict[Any, float]:
        s = await scrape(port)
        done = worker_counter(s, "fabric_handled_events_total") == 40
        return s if done and worker_counter(s, "fabric_dead_lettered_events_total") == 5 else {}

    samples = await eventually(settled, timeout_s=60, what="40 handled and 5 dead-lettered in /metrics")

    # then each counter moved by exactly the number of events it counts
    assert await redis.llen(handled_key(keys.ns)) == 40
    assert worker_counter(samples, "fabric_rejected_events_total") == 3
    assert worker_counter(samples, "fabric_failed_events_total") == 2 * 2  # both deliveries of each failing one
    assert worker_counter(samples, "fabric_retried_events_total") == 2
    assert worker_counter(samples, "fabric_delivered_events_total") == 40 + 3 + 2 * 2
    published = sum(v for (name, _), v in samples.items() if name == "fabric_published_events_total")
    assert published == 0  # this process publishes nothing: the test's publisher is elsewhere
    histogram = ("fabric_end_to_end_latency_seconds_count", (("group", GROUP), ("handler", HANDLER)))
    assert samples[histogram] == 40  # latency is observed for the successes only
    duration = ("fabric_handler_duration_seconds_count", (("group", GROUP), ("handler", HANDLER)))
    assert samples[duration] == 40 + 3 + 2 * 2
    assert samples[("fabric_workers_ready", ())] == 1
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exit_code() == 0


async def test_one_scrape_of_a_supervisor_adds_up_its_processes_including_restarted_ones(redis, keys, start) -> None:
    # given three worker processes under a supervisor that serves their metrics
    sup = start("--processes", "3", "--concurrency", "4")
    children = await sup.started(3)
    port = await port_of(sup)

    async def ready(n: int) -> bool:
        s = await scrape(port)
        return s.get(("fabric_workers_ready", ())) == n

    await eventually(lambda: ready(3), what="three ready workers in one scrape")
    await publish(redis, keys, {"ok": 300}, symbols=12)

    async def handled(n: int) -> bool:
        return worker_counter(await scrape(port), "fabric_handled_events_total") == n

    await eventually(lambda: handled(300), timeout_s=60, what="300 handled in one scrape")

    # when one process is stopped (it drains and exits), restarted, and more events arrive
    victim = children[0]
    os.kill(victim.pid, signal.SIGTERM)
    await sup.started(4)
    await eventually(lambda: ready(3), what="three ready workers again after the restart")
    await publish(redis, keys, {"ok": 150}, symbols=12)

    # then the one scrape still counts everything: the exited process's counts are kept
    await eventually(lambda: handled(450), timeout_s=60, what="450 handled in one scrape")
    assert await redis.llen(handled_key(keys.ns)) == 450
    assert "died: exited 0" in sup.output()
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0
    sup.assert_clean()


async def test_readyz_turns_not_ready_while_the_worker_drains(redis, keys, start) -> None:
    # given a ready worker holding an event its handler has not finished
    worker = start("--grace-s", "60", handler="tests.fixtures.handlers:gated_record")
    port = await port_of(worker)

    async def status(path: str) -> tuple[int, str]:
        return await get(port, path)

    assert (await eventually(lambda: _is(status("/readyz"), 200), what="/readyz 200"))[0] == 200
    await publish(redis, keys, {"": 1})

    async def held() -> bool:
        try:
            found: Any = await redis.xpending(keys.stream("tick", Priority.NORMAL, "S0"), GROUP)
        except ResponseError:  # the worker has not joined the new stream yet
            return False
        return bool(found["pending"])

    await eventually(held, what="the event in the handler")

    # when it is told to stop
    worker.proc.send_signal(signal.SIGTERM)

    # then, while it drains, it is alive but not ready
    code, body = await eventually(lambda: _is(status("/readyz"), 503), what="/readyz 503 while draining")
    assert "draining" in body
    assert (await status("/healthz"))[0] == 200
    await redis.set(gate_key(keys.ns), 1)
    assert await worker.exit_code() == 0
    assert await redis.llen(handled_key(keys.ns)) == 1


async def _is(call: Any, code: int) -> tuple[int, str] | None:
    found = await call
    return found if found[0] == code else None


async def test_json_logs_of_a_supervisor_and_its_workers_are_json_lines_naming_the_worker(redis, keys, start) -> None:
    # given two worker processes logging JSON under a supervisor
    sup = start("--processes", "2", "--log-format", "json")
    await sup.started(2)
    await port_of(sup)

    # when they have started and are stopped
    async def both_joined() -> bool:
        return sup.output().count("joined group") >= 2 or sup.output().count("worker ") >= 4

    await eventually(both_joined, what="both workers logging")
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0

    # then every line is one JSON object, and the workers' lines name which worker wrote them
    lines = [json.loads(line) for line in sup.output().splitlines() if line.strip()]
    assert {line["worker"] for line in lines if "worker" in line} == {f"{GROUP}[0]", f"{GROUP}[1]"}
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
