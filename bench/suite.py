"""Cases, runs and repeats: each case is one function measuring one repeat in a fresh namespace; the suite
repeats the cases round by round, checks every repeat for loss, and keeps the median and spread of each case's
figures."""

from __future__ import annotations

import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from bench.launcher import Child
from bench.server import Target, cleanup
from bench.settings import Settings
from bench.stats import summarize
from fabric import Keys

__all__ = ["PROBLEMS", "Bench", "Case", "NotAvailable", "Run", "run_case", "run_rounds"]

PROBLEMS = ("lost", "unacked", "failed")
"""Per-run counts that must be zero: events not handled (or not stored), left unacknowledged, failed to publish."""


class NotAvailable(Exception):
    """fabric cannot run this case yet; the message says why."""


@dataclass
class Bench:
    """What every case needs: the Redis under test, a client to inspect it, and the settings."""

    target: Target
    client: Redis
    settings: Settings


class Run:
    """One repeat of one case: a fresh namespace, the processes it starts, and the cleanup after it."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.settings = bench.settings
        self.client = bench.client
        self.keys = Keys(f"bench{uuid.uuid4().hex[:12]}")
        self.children: list[Child] = []

    async def spawn(self, role: str, **options: object) -> Child:
        """Start a ``bench.procs`` role in this run's namespace (``symbols`` and the rest as options)."""
        merged: dict[str, object] = {"ns": self.keys.ns, "symbols": self.settings.symbols, **options}
        args = [str(a) for k, v in merged.items() for a in (f"--{k.replace('_', '-')}", v)]
        child = await Child.start(role, self.bench.target.url, *args)
        self.children.append(child)
        return child

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        for child in self.children:
            await child.close()
        await cleanup(self.client, self.bench.target, self.keys.ns)


@dataclass(frozen=True)
class Case:
    """One measured thing: ``measure`` runs one repeat and returns its figures (and the PROBLEMS counts)."""

    name: str
    scenario: str
    title: str
    measure: Callable[[Run], Awaitable[dict[str, Any]]]
    masters: int = 0
    """0: measured on the suite's Redis; M: on a Redis Cluster of M masters started for it (``bench.cluster``)."""


async def run_case(bench: Bench, case: Case) -> dict[str, Any]:
    """Repeat a case, one repeat after another; its status is ok, lost (some repeat had a problem), failed or
    not available."""
    return (await run_rounds(bench, [case]))[case.name]


async def run_rounds(bench: Bench, cases: list[Case]) -> dict[str, dict[str, Any]]:
    """Repeat the cases round by round: every case's repeat i before any case's repeat i + 1. A ratio's two cases
    (fabric's and its baseline, or a variant and end to end) run next to each other in each round, so a spell of
    a slower machine, which lasts from seconds to minutes here, falls on both sides of a ratio instead of on one.
    A case that breaks or is not available is reported so and left out of the later rounds."""
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    ended: dict[str, dict[str, Any]] = {}
    repeats = bench.settings.repeats
    for i in range(repeats):
        for case in cases:
            if case.name in ended:
                continue
            print(f"  {case.name}: repeat {i + 1}/{repeats}", file=sys.stderr, flush=True)
            figures, end = await _repeat(bench, case)
            if end is not None:
                ended[case.name] = {**end, "runs": runs[case.name]} if end["status"] == "failed" else end
            else:
                runs[case.name].append(figures)
    return {c.name: ended.get(c.name) or _summary(c, runs[c.name]) for c in cases}


async def _repeat(bench: Bench, case: Case) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One repeat's figures, or the case's end instead: not available, or failed."""
    base = {"scenario": case.scenario, "title": case.title}
    started = time.perf_counter()
    try:
        async with Run(bench) as run:
            figures = await case.measure(run)
    except NotAvailable as exc:
        return {}, {**base, "status": "not available", "reason": str(exc), "lost": 0}
    except Exception as exc:  # a broken case is reported and the suite goes on
        traceback.print_exc(file=sys.stderr)
        return {}, {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "lost": 0}
    figures["elapsed_s"] = time.perf_counter() - started
    return figures, None


def _summary(case: Case, runs: list[dict[str, Any]]) -> dict[str, Any]:
    problems = {p: sum(int(r.get(p, 0)) for r in runs) for p in PROBLEMS}
    status = "ok" if not any(problems.values()) else "lost"
    return {"scenario": case.scenario, "title": case.title, "status": status, "lost": problems["lost"],
            "problems": problems, "runs": runs, "summary": summarize(runs)}
