"""The benchmark suite runs every scenario in ``--quick`` mode and loses nothing (its timings are not checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis

from bench.latency import ping, stages
from bench.machine import measure
from bench.memory import padded_ticks, sweep
from bench.newstreams import MODES, first_events
from bench.server import Target
from bench.settings import QUICK
from bench.suite import Bench, Case, NotAvailable, Run, run_rounds
from fabric import connect
from tests.conftest import ROOT, RedisServer

QUICK_RUN_DEADLINE_S = 90.0
"""A deadline against a hang, far above the ~25 s a quick run takes (two Redis Clusters included); not a timing
under test."""


@pytest.fixture
def redis_benchmark() -> None:
    """Skip without redis-benchmark locally; fail under CI, where it must be installed."""
    if shutil.which("redis-benchmark") is None:
        message = "redis-benchmark is not installed (it comes with redis-server: apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.timeout(QUICK_RUN_DEADLINE_S + 30)
@pytest.mark.usefixtures("redis_benchmark")
def test_quick_run_loses_nothing(redis_server: RedisServer, tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(results), "--redis-url", redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=QUICK_RUN_DEADLINE_S,
    )
    assert proc.returncode == 0, f"python -m bench --quick failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    doc = json.loads(results.read_text())
    ran = {name: case for name, case in doc["cases"].items() if case["status"] != "not available"}
    assert {"publish", "end_to_end", "priority", "memory", "plain_end_to_end", "plain_latency_5000",
            "variant_processes_2",
            "cluster_1_publish", "cluster_1_end_to_end", "cluster_3_publish", "cluster_3_end_to_end"} <= ran.keys()
    for name, case in ran.items():
        assert case["status"] == "ok", f"{name}: {case}"
        assert case["lost"] == 0 and all(run["lost"] == 0 for run in case["runs"]), f"{name} lost events: {case}"
    assert doc["workload"]["encoded_bytes"] > 0 and doc["environment"]["redis"]["version"]
    assert {c["masters"] for c in doc["environment"]["clusters"].values()} == {1, 3}
    assert doc["ratios"]["cluster_3_vs_1_end_to_end"] and doc["ratios"]["cluster_3_vs_1_publish"]


async def test_the_memory_sweep_measures_both_settings_and_restores_the_servers(redis_server: RedisServer) -> None:
    # Given the session's Redis with its own stream node settings
    client = connect(redis_server.url)
    before = {**await client.config_get("stream-node-max-bytes"), **await client.config_get("stream-node-max-entries")}
    try:
        # When the sweep measures three payload sizes, one of them below the smallest tick fabric can make
        found = await sweep(redis_server.url, range(229, 232), 300)

        # Then it has a ratio for each tick size it could make, at both settings, and the settings are back
        assert found.keys() == {"fabric's settings", "Redis defaults"}
        for ratios in found.values():
            assert set(ratios) == {size for size in range(229, 232) if padded_ticks(size, 1) is not None}
            assert ratios and all(r > 1 for r in ratios.values())
        after = {**await client.config_get("stream-node-max-bytes"),
                 **await client.config_get("stream-node-max-entries")}
        assert after == before
    finally:
        await client.aclose()


def test_padded_ticks_have_exactly_the_size_asked() -> None:
    made = padded_ticks(260, 5)
    assert made is not None and {len(msgspec.msgpack.encode(t)) for t in made} == {260}
    assert padded_ticks(10, 1) is None  # smaller than any tick


def test_the_latency_breakdown_accounts_for_every_event(redis_server: RedisServer) -> None:
    # When the breakdown runs briefly at a low rate on the session's Redis, with its bystander reader
    found = stages(redis_server.url, 500, 0.2, bystander=True)

    # Then every event sent was stamped at every step, in causal order (one machine, one clock): each stage takes
    # a time of at least zero (an event its worker never stamped would show as a huge negative one); the
    # bystander's reading splits the redis stage in two (either part may be negative: it is another process)
    assert set(found) == {"harness", "publisher", "redis", "worker", "total", "redis-seen", "wake"}
    assert {len(v) for v in found.values()} == {100}
    causal = ("harness", "publisher", "redis", "worker", "total")
    assert all(d >= 0 for stage in causal for d in found[stage]), found
    assert [a + b for a, b in zip(found["redis-seen"], found["wake"], strict=True)] == found["redis"]
    assert len(ping(redis_server.url, 500, 0.1)) == 50


def test_without_a_flood_the_latency_breakdown_runs_no_bystander_unless_asked(redis_server: RedisServer) -> None:
    # When the breakdown runs briefly at a low rate without a flood, and nothing said about the bystander
    found = stages(redis_server.url, 500, 0.2)

    # Then every event has the five stages of its own path, and the bystander's split is absent
    assert {len(found[stage]) for stage in ("harness", "publisher", "redis", "worker", "total")} == {100}
    assert found["redis-seen"] == [] and found["wake"] == []


def test_the_latency_breakdown_stamps_a_worker_in_the_ordered_mode(redis_server: RedisServer) -> None:
    # When the breakdown runs briefly at a low rate with its worker in the ordered mode (whose reads do not go
    # through the unordered reader's _take)
    found = stages(redis_server.url, 500, 0.2, config={"ordered": True})

    # Then every event sent was stamped when its read was taken, in causal order, as in the unordered mode
    causal = ("harness", "publisher", "redis", "worker", "total")
    assert {len(found[stage]) for stage in causal} == {100}
    assert all(d >= 0 for stage in causal for d in found[stage]), found


@pytest.mark.parametrize("mode", sorted(MODES))
async def test_the_new_streams_probe_times_every_first_event_and_cleans_up(redis_server: RedisServer,
                                                                          mode: str) -> None:
    # When the probe runs for two new symbols
    client = connect(redis_server.url)
    found = await first_events(redis_server.url, 2, MODES[mode])

    # Then it timed each first tick and each steady one, and left no key of its namespace behind
    assert {k: len(v) for k, v in found.items()} == {"new": 2, "steady": 2}
    assert all(ms >= 0 for v in found.values() for ms in v)
    assert [k async for k in client.scan_iter("newstreams*")] == []
    await client.aclose()


def test_the_latency_breakdown_under_a_flood_measures_only_the_critical_lane(redis_server: RedisServer) -> None:
    # When the breakdown runs briefly with a small flood of low ticks published first
    cpu: dict[str, float] = {}
    found = stages(redis_server.url, 500, 0.2, flood=2_000, cpu=cpu)

    # Then the critical events sent, and only those, were stamped at every step; the CPU shares were measured
    assert {len(v) for v in found.values()} == {100}
    assert all(d >= 0 for d in found["total"])
    assert {"redis", "worker", "sender", "flood_left"} <= set(cpu)


async def test_repeats_run_in_rounds_and_a_case_that_ends_leaves_them(redis_server: RedisServer) -> None:
    order: list[str] = []

    def case(name: str, breaks_on: int = 0, missing: bool = False) -> Case:
        async def measure(run: Run) -> dict[str, object]:
            order.append(name)
            if missing:
                raise NotAvailable("not here")
            if order.count(name) == breaks_on:
                raise RuntimeError("broke")
            return {"events_per_s": float(len(order)), "lost": 0}

        return Case(name, "test", name, measure)

    client = connect(redis_server.url)
    try:
        bench = Bench(Target(redis_server.url, owned=False), client, QUICK.but(repeats=3))
        found = await run_rounds(bench, [case("a"), case("b", breaks_on=2), case("c", missing=True), case("d")])
    finally:
        await client.aclose()
    assert order == ["a", "b", "c", "d", "a", "b", "d", "a", "d"]  # round by round; b and c left out once ended
    assert [r["events_per_s"] for r in found["a"]["runs"]] == [1.0, 5.0, 8.0]
    assert found["a"]["status"] == found["d"]["status"] == "ok" and len(found["d"]["runs"]) == 3
    assert found["b"]["status"] == "failed" and "broke" in found["b"]["error"] and len(found["b"]["runs"]) == 1
    assert found["c"]["status"] == "not available" and found["c"]["reason"] == "not here"


def test_the_machine_floor_measures_every_row(redis_server: RedisServer) -> None:
    # When the machine's floor is measured briefly on the session's Redis
    rows = measure(redis_server.url, scale=0.01)

    # Then every row has its figure (what it costs is not checked), and the reads left no stream behind
    whats = [what.split(":")[0] for what, *_ in rows]
    assert whats == ["sleep", "ping x1", "ping x3", "xreadgroup", "xreadgroup", "xreadgroup",
                     "sender at 5,000/s, publishing with", "sender at 5,000/s, publishing with",
                     "sender at 5,000/s, publishing with", "handoff", "handoff"]
    assert all((cpu, wall) != (None, None) and all(v > 0 for v in (cpu, wall) if v is not None)
               for _, _, cpu, wall in rows)
    with redis.Redis.from_url(redis_server.url) as r:
        assert list(r.scan_iter(match="bench:machine:*")) == [] and list(r.scan_iter(match="machine:*")) == []
