"""``python -m bench``: run the suite, print the table, write the JSON (and optionally a Markdown section).

Exit status 1 when any case lost events, left some unacknowledged, failed to publish or broke; the targets
never change the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from redis.exceptions import RedisError

from bench import baselines, scenarios
from bench.cluster import ClusterFailed, Clusters
from bench.environment import machine, revision, versions
from bench.report import markdown, ratios, table, targets, write_json
from bench.server import Target, describe, redis_target
from bench.settings import FULL, QUICK, Settings
from bench.suite import Bench, Case, run_case, run_rounds
from bench.workload import TOPIC, encoded_size
from fabric import WorkerConfig, connect
from fabric.client import redact

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
GROUPS = {"baselines": ("redis_benchmark", "plain")}
CLUSTER_MASTERS = (1, 3)
"""The cluster cases' sizes: publish and end to end on a Redis Cluster of 1 master, then of 3."""


def cases(settings: Settings) -> list[Case]:
    """Every case of the suite, in the order they run in each round (``suite.run_rounds``): each of fabric's
    figures that a target divides by a baseline or by another case sits next to it."""
    p64 = Case("redis_benchmark_p64", "redis_benchmark", "XADD of fabric's entry shape, -P 64",
               partial(baselines.redis_benchmark, pipeline=64))
    variants = {f"variant_{name}": Case(f"variant_{name}", "variants", (fn.__doc__ or name).splitlines()[0], fn)
                for name, fn in scenarios.VARIANTS.items()}
    found = [Case("publish", "publish", "publish only, one producer process", scenarios.publish), p64,
             Case("plain_publish", "plain", "plain redis-py, publish only", baselines.plain_publish),
             Case("end_to_end", "end_to_end", "producer and worker processes", scenarios.end_to_end),
             Case("plain_end_to_end", "plain", "plain redis-py, producer and consumer", baselines.plain_end_to_end),
             variants.pop("variant_metrics"), variants.pop("variant_ordered"), variants.pop("variant_outputs"),
             variants.pop("variant_ordered_outputs"), variants.pop("variant_ordered_ahead"), *variants.values()]
    for rate in settings.latency_rates:
        found += [Case(f"latency_{rate}", "latency", f"open loop at {rate:,} events/s",
                       partial(scenarios.latency, rate=rate)),
                  Case(f"plain_latency_{rate}", "plain", f"plain redis-py, open loop at {rate:,} events/s",
                       partial(baselines.plain_latency, rate=rate))]
    found += [Case("priority", "priority", "critical lane under a low-priority flood", scenarios.priority),
              Case("memory", "memory", "Redis memory per retained tick", scenarios.memory),
              Case("redis_benchmark_p1", "redis_benchmark", "XADD of fabric's entry shape, -P 1",
                   partial(baselines.redis_benchmark, pipeline=1)),
              Case("redis_benchmark_tiny_p64", "redis_benchmark", "XADD s * f v, -P 64",
                   partial(baselines.redis_benchmark, pipeline=64, same_shape=False))]
    found += [Case(f"cluster_{m}_{name}", "cluster", f"{title}, on a Redis Cluster of {m} master{'s' * (m > 1)}",
                   measure, masters=m)
              for m in CLUSTER_MASTERS
              for name, title, measure in (("publish", "publish only", scenarios.publish),
                                           ("end_to_end", "producer and worker", scenarios.end_to_end))]
    return found


def select(all_cases: list[Case], only: str | None) -> list[Case]:
    """The cases named by ``--only`` (scenario names, case names, or ``baselines``); all without it."""
    if not only:
        return all_cases
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    wanted |= {g for w in wanted for g in GROUPS.get(w, ())}
    chosen = [c for c in all_cases if c.name in wanted or c.scenario in wanted]
    known = {c.name for c in all_cases} | {c.scenario for c in all_cases} | set(GROUPS)
    if unknown := wanted - known:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(sorted(known))}")
    return chosen


def header(settings: Settings) -> dict[str, Any]:
    """The run's description, written before any measurement."""
    return {"suite": "fabric bench", "format": 1, "started_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "settings": dataclasses.asdict(settings),
            "workload": {"event": "Tick", "topic": TOPIC, "encoded_bytes": encoded_size(),
                         "symbols": settings.symbols, "events": settings.events},
            "environment": {"versions": versions(), "revision": revision(), "machine": machine()}}


async def measure(settings: Settings, target: Target, chosen: list[Case]) -> dict[str, Any]:
    """Run the chosen cases against the target; return the whole results document."""
    doc = header(settings)
    print(f"workload: Tick, {doc['workload']['encoded_bytes']} bytes encoded (msgspec.msgpack.encode), "
          f"{settings.symbols} symbols; {settings.repeats} repeat(s){', quick' if settings.quick else ''}", flush=True)
    client = connect(target.url)
    started = time.perf_counter()
    try:
        doc["environment"]["redis"] = await describe(client, target)
        doc["environment"]["versions"]["redis"] = doc["environment"]["redis"]["version"]
        bench = Bench(target, client, settings)
        found = await run_rounds(bench, [c for c in chosen if not c.masters])
        async with Clusters(settings) as clusters:  # each size's repeats in a row: a cluster takes seconds to start
            for case in (c for c in chosen if c.masters):
                print(f"{case.name}: {case.title}", file=sys.stderr, flush=True)
                found[case.name] = await run_on(clusters, case)
        doc["cases"] = {c.name: found[c.name] for c in chosen}
        if clusters.described:
            doc["environment"]["clusters"] = clusters.described
    finally:
        await client.aclose()
    doc["duration_s"] = time.perf_counter() - started
    doc["ratios"] = ratios(doc)
    doc["targets"] = targets(doc)
    doc["ok"] = all(c["status"] in ("ok", "not available") for c in doc["cases"].values())
    return doc


async def run_on(clusters: Clusters, case: Case) -> dict[str, Any]:
    """Run a cluster case on a cluster of its size (failed if that cluster cannot start)."""
    try:
        on = await clusters.bench(case.masters)
    except (ClusterFailed, RedisError, OSError) as exc:
        return {"scenario": case.scenario, "title": case.title, "status": "failed",
                "error": f"{type(exc).__name__}: {exc}", "lost": 0, "runs": []}
    return await run_case(on, case)


def parser() -> argparse.ArgumentParser:
    """The suite's command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description="fabric's benchmark suite")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: checks that everything runs")
    p.add_argument("--repeats", type=int, help="repeats of each case (default 3; 1 with --quick)")
    p.add_argument("--events", type=int, help="N for publish, end to end, variants and plain (default 200,000)")
    p.add_argument("--only", help="comma-separated scenarios or cases: publish, end_to_end, latency, priority, "
                                  "variants, memory, redis_benchmark, plain, baselines, cluster, or a case name")
    p.add_argument("--worker-config", metavar="JSON",
                   help='more WorkerConfig fields for fabric\'s workers, e.g. \'{"concurrency": 64}\' (default: none)')
    p.add_argument("--redis-url", help="Redis to measure (default $FABRIC_REDIS_URL, else a dedicated redis-server)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--markdown", type=Path, help="also write the table as a Markdown section to this file")
    p.add_argument("--readme", type=Path, help="replace the section between the bench markers of this README "
                                               "(README.md's performance section) with the results")
    return p


README_START = "<!-- bench:start (written by python -m bench --readme README.md; do not edit by hand) -->"
README_END = "<!-- bench:end -->"


def update_readme(path: Path, section: str) -> None:
    """Put ``section`` between the bench markers of a README."""
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"--readme: {path} has no '{README_START}' ... '{README_END}' markers: add them")
    path.write_text(text[: start + len(README_START)] + "\n" + section.rstrip() + "\n" + text[end:])


def check_worker_config(text: str | None) -> None:
    """Refuse a ``--worker-config`` that WorkerConfig would refuse, before anything starts."""
    if text is None:
        return
    try:
        msgspec.convert({"group": "bench", "topics": [TOPIC], **json.loads(text)}, WorkerConfig)
    except Exception as exc:  # bad JSON, an unknown field, a wrong type or a refused value
        raise SystemExit(f"--worker-config: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when nothing was lost."""
    args = parser().parse_args(argv)
    check_worker_config(args.worker_config)
    settings = (QUICK if args.quick else FULL).but(repeats=args.repeats, events=args.events,
                                                   worker_config=args.worker_config)
    chosen = select(cases(settings), args.only)
    with redis_target(args.redis_url) as target:
        try:
            doc = uvloop.run(measure(settings, target, chosen))
        except (RedisError, OSError) as exc:
            raise SystemExit(f"cannot use the Redis at {redact(target.url)}: {exc}") from None
    print(table(doc))
    write_json(doc, args.json)
    print(f"results: {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(doc))
        print(f"markdown: {args.markdown}")
    if args.readme:
        update_readme(args.readme, markdown(doc))
        print(f"readme: {args.readme}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
