"""Metrics inside one process: tallies, merging processes' snapshots, the exposition prometheus-client parses,
the publisher's and worker's counts, the sampler's gauges under its lease, the endpoints, and log records."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fabric import Publisher, PublisherConfig, Worker, WorkerConfig
from fabric.breaker import BreakerStore
from fabric.config import BreakerConfig
from fabric.endpoints import Endpoints
from fabric.errors import Reject
from fabric.events import Event, Tick
from fabric.families import NAMES, Series, Snapshot, merge
from fabric.handler import Context, as_handler, wrap
from fabric.keys import Priority
from fabric.logs import JsonFormatter, TextFormatter, configure, log_context
from fabric.metrics import Collector, HandlerTallies, Metrics, measured
from fabric.sampler import Sampler
from fabric.snapshots import SnapshotDirectory
from fabric.tally import SECONDS_BUCKETS, Tally
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.timeout(60)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ctx(stream: str = "ns:s:tick:normal:{X}") -> Context:
    return Context(stream=stream, topic="tick", priority="normal", symbol="X", entry_id="1-0", delivery_count=1,
                   group="g", consumer="c")


# ---- tallies and merging ----------------------------------------------------------------------------------


def test_a_tally_counts_a_value_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    t = Tally([1.0, 2.0])
    for v in (0.5, 1.0, 1.5, 2.0, 7.0):
        t.observe(v)
    assert t.counts == [2, 2, 1] and t.sum == 12.0 and t.count == 5


def test_merge_sums_counters_of_every_process_and_gauges_of_live_ones_only() -> None:
    dead = Snapshot(pid=1, written_s=0, series=[Series("fabric_handled_events_total", ("g", "h"), 5),
                                                Series("fabric_workers_ready", (), 1)])
    live = Snapshot(pid=2, written_s=0, series=[Series("fabric_handled_events_total", ("g", "h"), 7),
                                                Series("fabric_workers_ready", (), 1)])
    merged = {(s.name, s.labels): s.value for s in merge([dead, live], gauges_from=[live])}
    assert merged == {("fabric_handled_events_total", ("g", "h")): 12, ("fabric_workers_ready", ()): 1}


def test_a_retired_process_keeps_its_counts_and_loses_its_gauges(tmp_path: Path) -> None:
    # given two processes' snapshot files
    directory = SnapshotDirectory(tmp_path)
    for pid, n in ((11, 3), (12, 4)):
        hist = Tally(SECONDS_BUCKETS)
        hist.observe(0.001)
        snap = Snapshot(pid=pid, written_s=0, series=[
            Series("fabric_handled_events_total", ("g", "h"), n), Series("fabric_workers_ready", (), 1),
            Series("fabric_handler_duration_seconds", ("g", "h"), hist.sum, hist.counts)])
        (tmp_path / f"{pid}.snap").write_bytes(msgspec.msgpack.encode(snap))
    # when one exits and is retired, twice (a second retire finds nothing)
    directory.retire(11)
    directory.retire(11)
    # then its counts are still there and its readiness is not
    registry = CollectorRegistry()
    registry.register(Collector(others=directory))
    found = samples(registry)
    assert found[("fabric_handled_events_total", (("group", "g"), ("handler", "h")))] == 7
    assert found[("fabric_handler_duration_seconds_count", (("group", "g"), ("handler", "h")))] == 2
    assert found[("fabric_workers_ready", ())] == 1
    assert not (tmp_path / "11.snap").exists()


def test_a_sampled_value_is_taken_once_not_added_up_over_processes_that_sampled_it(tmp_path: Path) -> None:
    # given a child that sampled a breaker's 5 transitions, then exited, and the child sampling it now (and another
    # that briefly held the lease too)
    def write(pid: int, transitions: float, lag: float) -> None:
        snap = Snapshot(pid=pid, written_s=0, series=[Series("fabric_breaker_transitions_total", ("b",), transitions),
                                                      Series("fabric_consumer_lag", ("g", "t", "low"), lag)])
        (tmp_path / f"{pid}.snap").write_bytes(msgspec.msgpack.encode(snap))

    directory = SnapshotDirectory(tmp_path)
    write(11, 5, 100)
    directory.retire(11)
    write(12, 5, 40)
    write(13, 5, 30)
    # then the merged view shows the value Redis has, not a sum
    registry = CollectorRegistry()
    registry.register(Collector(others=directory))
    found = samples(registry)
    assert found[("fabric_breaker_transitions_total", (("breaker", "b"),))] == 5
    assert found[("fabric_consumer_lag", (("group", "g"), ("priority", "low"), ("topic", "t")))] == 40


def test_every_family_is_exposed_under_its_name_with_prometheus_suffixes() -> None:
    registry = CollectorRegistry()
    registry.register(Collector(Metrics()))
    exposed = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {n.removesuffix("_total") for n in NAMES} == exposed
    assert all(n.startswith("fabric_") for n in NAMES)


# ---- the middleware ---------------------------------------------------------------------------------------


async def test_measured_observes_every_call_and_latency_of_successes_only() -> None:
    tallies = HandlerTallies()

    async def judge(event: Tick) -> None:
        if event.exchange == "bad":
            raise Reject("bad")

    handle = wrap(as_handler(judge), [measured(tallies)])
    await handle(Tick(symbol="X", bid=1, ask=2), ctx())
    with pytest.raises(Reject):
        await handle(Tick(symbol="X", bid=1, ask=2, exchange="bad"), ctx())
    assert tallies.duration.count == 2 and tallies.latency.count == 1


# ---- counting in the publisher and the worker ---------------------------------------------------------------


async def test_the_publisher_counts_events_written_by_topic_and_priority_not_duplicates(redis, keys) -> None:
    metrics = Metrics(keys)
    registry = CollectorRegistry()
    registry.register(Collector(metrics))
    first = Tick(symbol="A", bid=1, ask=2)
    async with Publisher(redis, PublisherConfig(dedup_window_ms=60_000), keys=keys) as pub:
        metrics.watch_publisher(pub)
        await pub.publish_many([first, Tick(symbol="B", bid=1, ask=2)])
        await pub.publish(first)  # a duplicate: written once
        await pub.publish(Tick(symbol="A", bid=1, ask=2), priority="critical")
    found = samples(registry)
    assert found[("fabric_published_events_total", (("priority", "normal"), ("topic", "tick")))] == 2
    assert found[("fabric_published_events_total", (("priority", "critical"), ("topic", "tick")))] == 1


async def test_a_worker_counts_handled_rejected_and_invalid_entries(redis, keys) -> None:
    async def judge(event: Tick) -> None:
        if event.exchange == "bad":
            raise Reject("bad")

    worker = Worker(redis, as_handler(judge), WorkerConfig(group="g", topics=["tick"], block_ms=50), keys=keys,
                    handler_name="judge")
    metrics = Metrics(keys)
    metrics.watch_worker(worker)
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([Tick(symbol="A", bid=1, ask=2)] * 3 + [Tick(symbol="A", bid=1, ask=2,
                                                                           exchange="bad")])
    await redis.xadd(keys.stream("tick", Priority.NORMAL, "A"), {"type": "Nope", "v": "1", "enc": "json",
                                                                   "data": "{}"})

    async def counted() -> dict[str, float]:
        found = {s.name: s.value for s in metrics.snapshot().series if s.labels == ("g", "judge")}
        return found if found["fabric_handled_events_total"] == 3 and found[
            "fabric_dead_lettered_events_total"] == 2 else {}

    async with running(worker):
        found = await eventually(counted, what="3 handled and 2 dead-lettered")
    assert found["fabric_rejected_events_total"] == 1
    assert found["fabric_invalid_events_total"] == 1
    assert found["fabric_delivered_events_total"] == 5


# ---- the sampler ------------------------------------------------------------------------------------------


@pytest.mark.real_only
async def test_one_sampler_per_group_exports_lag_pending_and_oldest_age(redis, keys) -> None:
    # given a group that has read 2 of a stream's 5 entries, the oldest written 10 s ago, and acknowledged none
    stream = keys.stream("tick", Priority.HIGH, "A")
    seconds, _ = await redis.time()
    for i in range(5):
        await redis.xadd(stream, {"x": "1"}, id=f"{(seconds - 10) * 1000 + i}-0")
    await redis.xgroup_create(stream, "g", id="0")
    await redis.xreadgroup("g", "c", {stream: ">"}, count=2)
    # when two processes' samplers of the group sample
    first = Sampler(redis, keys, "g", "one", lambda: [stream])
    second = Sampler(redis, keys, "g", "two", lambda: [stream])
    await first.sample()
    await second.sample()
    # then only the lease holder exports the group's gauges
    mine = {s.name: s.value for s in first if s.labels == ("g", "tick", "high")}
    assert mine["fabric_consumer_lag"] == 3 and mine["fabric_pending_events"] == 2
    assert mine["fabric_oldest_pending_age_seconds"] >= 10
    assert not [s for s in second if s.labels]
    # and once the holder gives up its lease (a draining worker), the other one takes over
    stop = asyncio.Event()
    stop.set()
    await first.run(stop)
    await second.sample()
    assert [s for s in second if s.name == "fabric_consumer_lag"]


@pytest.mark.real_only
async def test_the_namespace_sampler_exports_dead_letters_and_breaker_states(redis, keys) -> None:
    store = BreakerStore(redis, keys, BreakerConfig(name="exchange"))
    await store.force("open", "test")
    await redis.sadd(keys.dlq_registry(), keys.dlq(keys.stream("tick", Priority.LOW, "A")))
    await redis.xadd(keys.dlq(keys.stream("tick", Priority.LOW, "A")), {"x": "1"})
    sampler = Sampler(redis, keys, "g", "one", lambda: [])
    await sampler.sample()
    found = {(s.name, s.labels): s.value for s in sampler}
    assert found[("fabric_dead_letters", ())] == 1
    assert found[("fabric_breaker_state", ("exchange",))] == 2
    assert found[("fabric_breaker_transitions_total", ("exchange",))] == 1


# ---- the endpoints ----------------------------------------------------------------------------------------


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    return reply


async def test_the_endpoints_answer_metrics_health_readiness_and_nothing_else() -> None:
    why: list[str | None] = [None]
    endpoints = Endpoints(CollectorRegistry(), lambda: why[0], host="127.0.0.1", port=0)
    port = await endpoints.start()
    try:
        assert (await _request(port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert (await _request(port, b"GET /readyz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        why[0] = "draining"
        reply = await _request(port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503") and reply.endswith(b"not ready: draining\n")
        assert (await _request(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _request(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _request(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await endpoints.close()


# ---- logs -------------------------------------------------------------------------------------------------


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("fabric.worker", logging.WARNING, __file__, 1, "failed: %s", ("boom",), None)
    record.__dict__.update(extra)
    return record


def test_json_logs_are_one_object_per_line_with_the_event_ids() -> None:
    line = JsonFormatter().format(_record(event_id="e1", correlation_id="c1", stream="s"))
    parsed = json.loads(line)
    assert (parsed["message"], parsed["level"], parsed["event_id"], parsed["correlation_id"]) == (
        "failed: boom", "warning", "e1", "c1")
    assert "\n" not in line


def test_text_logs_show_the_ids_after_the_message() -> None:
    assert TextFormatter().format(_record(event_id="e1")).endswith("failed: boom  event_id=e1")


async def test_a_handler_logging_while_it_handles_an_event_logs_the_event_ids(capsys) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    configure("json")
    try:
        async def chatty(event: Event) -> None:
            logging.getLogger("handlers.chatty").warning("looking at it")

        event = Tick(symbol="X", bid=1, ask=2, correlation_id="root-1")
        await wrap(as_handler(chatty), [log_context])(event, ctx())
        logging.getLogger("handlers.chatty").warning("outside")
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert (first["event_id"], first["correlation_id"], first["entry_id"]) == (event.event_id, "root-1", "1-0")
    assert "event_id" not in second


async def test_a_worker_counts_the_events_its_handler_published(redis, keys) -> None:
    async def double(event: Tick) -> list[Event]:
        return [Tick(symbol=event.symbol, bid=event.bid * 2, ask=event.ask * 2)] * 2

    config = WorkerConfig(group="g", topics=["tick"], block_ms=50, output_topic="doubled")
    worker = Worker(redis, as_handler(double), config, keys=keys)
    metrics = Metrics(keys)
    metrics.watch_worker(worker)
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([Tick(symbol=s, bid=1, ask=2) for s in "ABC"])

    async def published() -> float:
        return sum(s.value for s in metrics.snapshot().series
                   if s.name == "fabric_published_events_total" and s.labels == ("doubled", "normal"))

    async with running(worker):
        assert await eventually(lambda: _equal(published(), 6), what="6 outputs counted") == 6


async def _equal(value: Any, expected: float) -> float:
    found = await value
    return found if found == expected else 0
