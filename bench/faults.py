"""``python -m bench.faults``: the fault suite's long form: the cases of ``tests/faults`` run bigger and repeated.

Each case (a worker killed, Redis killed or cut, bad input...) runs ``--repeat`` times with ``--events`` events in
a fresh world (its own redis-server with AOF, worker processes, journals) and is scored by ``tests/faults/checker``.
The results go to ``bench/results/faults.json`` and, as a Markdown table (one row per case: the checker's figures
summed over the repeats, the recovery time's median and worst), to ``bench/results/faults.md`` and stdout.

Exit status 1 when a case broke its promise (``no loss``; ``no loss, no duplicates``; ``loss reported``: lost no
more than the fabric reported) or failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.environment import machine, revision, versions

RESULTS = Path(__file__).resolve().parent / "results"
MODULES = ("test_worker_faults", "test_redis_faults", "test_bad_input", "test_reclaim_race", "test_network_cases",
           "test_clock_cases", "test_tls_cases")
"""The modules of tests/faults whose ``@case`` functions make up the suite, in the order they run."""
FIGURES = ("acknowledged", "indeterminate", "refused", "handled", "dead_lettered", "lost", "reported_lost",
           "duplicated", "unexpected")


def _cases() -> list[Any]:
    import importlib

    for name in MODULES:
        importlib.import_module(f"tests.faults.{name}")
    from tests.faults.harness import CASES

    return list(CASES.values())


async def _run(case: Any, events: int) -> dict[str, Any]:
    """One run of one case in a fresh world: its score's figures, whether it kept its promise, or its error."""
    from tests.faults.harness import kept, run_case

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fabric-faults-") as tmp:
        try:
            s = await run_case(case, Path(tmp), events)
        except Exception as exc:  # a case that broke is a result too: reported, and the suite goes on
            return {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-4000:],
                    "kept": False, "seconds": round(time.monotonic() - started, 1)}
    return {**s.row(), "kept": kept(case.promise, s), "seconds": round(time.monotonic() - started, 1)}


def summary(name: str, promise: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: the figures summed over the runs, recovery's median and worst, the promise kept in all."""
    ok = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {"case": name, "promise": promise, "runs": len(runs), "errors": len(runs) - len(ok)}
    for figure in FIGURES:
        row[figure] = sum(r[figure] for r in ok)
    recoveries = [r["recovery_s"] for r in ok if r["recovery_s"] is not None]
    row["recovery_s_median"] = round(statistics.median(recoveries), 2) if recoveries else None
    row["recovery_s_max"] = round(max(recoveries), 2) if recoveries else None
    row["kept"] = bool(runs) and all(r["kept"] for r in runs)
    return row


def markdown(rows: list[dict[str, Any]], events: int, repeat: int) -> str:
    """The rows as a Markdown table."""
    head = ("| case | promise | acked | indeterminate | refused | handled | dead-lettered | **lost** | reported lost "
            "| duplicated | unexpected | recovery s (median / max) | kept |")
    lines = [f"Fault suite, long form: {repeat} runs of each case, {events:,} events a run (figures summed over "
             "the runs).", "", head, "|" + "---|" * 13]
    for r in rows:
        rec = "–" if r["recovery_s_median"] is None else f"{r['recovery_s_median']:.2f} / {r['recovery_s_max']:.2f}"
        errors = f" ({r['errors']} errors)" if r["errors"] else ""
        kept = "yes" if r["kept"] else f"**NO**{errors}"
        lines.append(f"| {r['case']} | {r['promise']} | {r['acknowledged']:,} | {r['indeterminate']:,} | "
                     f"{r['refused']:,} | {r['handled']:,} | {r['dead_lettered']:,} | **{r['lost']:,}** | "
                     f"{r['reported_lost']:,} | {r['duplicated']:,} | {r['unexpected']:,} | {rec} | {kept} |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    cases = [c for c in _cases() if not args.only or any(o in c.name for o in args.only.split(","))]
    doc: dict[str, Any] = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": revision(), "machine": machine(), "versions": versions(),
        "events": args.events, "repeat": args.repeat, "cases": [],
    }
    rows = []
    for case in cases:
        runs = []
        for i in range(args.repeat):
            run = await _run(case, args.events)
            runs.append(run)
            figures = run.get("error") or " ".join(f"{k}={run[k]}" for k in ("lost", "duplicated", "recovery_s"))
            print(f"{case.name} [{i + 1}/{args.repeat}] {run['seconds']}s: {figures}", file=sys.stderr, flush=True)
        row = summary(case.name, case.promise, runs)
        rows.append(row)
        doc["cases"].append({**row, "each": runs})
    table = markdown(rows, args.events, args.repeat)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(table)
    print(table)
    return 0 if all(r["kept"] for r in rows) else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each case (default 2)")
    parser.add_argument("--events", type=int, default=2000, help="events a run (default 2,000)")
    parser.add_argument("--only", help="run only the cases whose names contain one of these (comma-separated)")
    parser.add_argument("--json", type=Path, default=RESULTS / "faults.json",
                        help="the results document (default bench/results/faults.json; the table beside it, .md)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
