"""The results: ratios to the baselines, the targets (met or MISSED, never asserted), a printed table, the JSON
document and a Markdown section for the README."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "markdown", "ratios", "table", "targets", "write_json"]

Doc = dict[str, Any]

SHOWN: dict[str, list[tuple[str, str]]] = {
    "publish": [("events_per_s", "events/s"), ("cpu_us_per_event", "producer CPU µs/event"),
                ("redis_cpu_us_per_event", "Redis CPU µs/event")],
    "end_to_end": [("events_per_s", "events/s"), ("worker_cpu_us_per_event", "worker CPU µs/event"),
                   ("redis_cpu_us_per_event", "Redis CPU µs/event")],
    "latency": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p99_9_ms", "p99.9 ms"), ("max_ms", "max ms"),
                ("sender_lag_p99_ms", "sender's own lag p99 ms"), ("sent", "sent"), ("handled", "handled")],
    "priority": [("critical_p50_ms", "critical p50 ms"), ("critical_p99_ms", "critical p99 ms"),
                 ("critical_p99_9_ms", "critical p99.9 ms"), ("critical_max_ms", "critical max ms"),
                 ("low_handled_during", "low handled meanwhile"), ("low_per_s_during", "low handled/s meanwhile"),
                 ("low_backlog_min", "low backlog, smallest seen")],
    "variants": [("events_per_s", "events/s"), ("worker_cpu_us_per_event", "worker CPU µs/event"),
                 ("redis_cpu_us_per_event", "Redis CPU µs/event")],
    "memory": [("bytes_per_event", "Redis bytes/entry"), ("payload_bytes", "payload bytes"),
               ("ratio_to_payload", "ratio to payload"), ("dedup_bytes_per_event", "dedup bytes/event (0: off)")],
    "redis_benchmark": [("requests_per_s", "XADD/s")],
    "plain": [("events_per_s", "events/s"), ("cpu_us_per_event", "producer CPU µs/event"),
              ("worker_cpu_us_per_event", "consumer CPU µs/event"), ("redis_cpu_us_per_event", "Redis CPU µs/event"),
              ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
              ("p99_9_ms", "p99.9 ms"), ("max_ms", "max ms"), ("sender_lag_p99_ms", "sender's own lag p99 ms")],
    "cluster": [("events_per_s", "events/s"), ("cpu_us_per_event", "producer CPU µs/event"),
                ("worker_cpu_us_per_event", "worker CPU µs/event")],
}
"""Per scenario, the figures the table shows (the JSON has every figure of every repeat)."""


def _median(doc: Doc, case: str, figure: str) -> float | None:
    c = doc["cases"].get(case)
    if not c or c.get("status") not in ("ok", "lost") or figure not in c.get("summary", {}):
        return None
    return float(c["summary"][figure]["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(doc: Doc) -> dict[str, float | None]:
    """fabric against its baselines (medians); None where a side did not run."""
    return {
        "end_to_end_vs_plain": _ratio(_median(doc, "end_to_end", "events_per_s"),
                                      _median(doc, "plain_end_to_end", "events_per_s")),
        "publish_vs_redis_benchmark_p64": _ratio(_median(doc, "publish", "events_per_s"),
                                                 _median(doc, "redis_benchmark_p64", "requests_per_s")),
        "publish_vs_plain": _ratio(_median(doc, "publish", "events_per_s"),
                                   _median(doc, "plain_publish", "events_per_s")),
        **{f"latency_{rate}_{p}_vs_plain": _ratio(_median(doc, f"latency_{rate}", f"{p}_ms"),
                                                  _median(doc, f"plain_latency_{rate}", f"{p}_ms"))
           for rate in (5_000, 20_000) for p in ("p50", "p99")},
        "metrics_on_vs_off": _ratio(_median(doc, "variant_metrics", "events_per_s"),
                                    _median(doc, "end_to_end", "events_per_s")),
        "ordered_vs_unordered": _ratio(_median(doc, "variant_ordered", "events_per_s"),
                                       _median(doc, "end_to_end", "events_per_s")),
        "ordered_outputs_vs_unordered": _ratio(_median(doc, "variant_ordered_outputs", "events_per_s"),
                                               _median(doc, "variant_outputs", "events_per_s")),
        "ordered_ahead_vs_unordered": _ratio(_median(doc, "variant_ordered_ahead", "events_per_s"),
                                             _median(doc, "variant_outputs", "events_per_s")),
        "cluster_3_vs_1_publish": _ratio(_median(doc, "cluster_3_publish", "events_per_s"),
                                         _median(doc, "cluster_1_publish", "events_per_s")),
        "cluster_3_vs_1_end_to_end": _ratio(_median(doc, "cluster_3_end_to_end", "events_per_s"),
                                            _median(doc, "cluster_1_end_to_end", "events_per_s")),
    }


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``figure`` read from the results compared with ``limit`` (``at_least`` or at most)."""

    label: str
    figure: Callable[[Doc], float | None]
    limit: float | None
    at_least: bool = True
    unavailable: str = ""

    def judge(self, doc: Doc) -> dict[str, Any]:
        """The figure and met/MISSED (or info, not run, not available)."""
        if self.unavailable:
            return {"target": self.label, "figure": None, "status": "not available", "reason": self.unavailable}
        value = self.figure(doc)
        if value is None or math.isnan(value):
            status = "not run"
        elif self.limit is None:
            status = "info"
        else:
            status = "met" if (value >= self.limit if self.at_least else value <= self.limit) else "MISSED"
        return {"target": self.label, "figure": value, "status": status}


def _fig(case: str, figure: str) -> Callable[[Doc], float | None]:
    return lambda doc: _median(doc, case, figure)


def _rat(name: str) -> Callable[[Doc], float | None]:
    return lambda doc: doc["ratios"].get(name)


TARGETS = [
    Target("end to end ≥ 150,000 events/s", _fig("end_to_end", "events_per_s"), 150_000),
    Target("end to end ≥ 3× plain redis-py end to end", _rat("end_to_end_vs_plain"), 3.0),
    Target("publish ≥ 300,000 events/s", _fig("publish", "events_per_s"), 300_000),
    Target("publish ≥ 50% of redis-benchmark XADD -P 64 (same shape)", _rat("publish_vs_redis_benchmark_p64"), 0.5),
    Target("latency at 5,000/s: p50 ≤ 0.3 ms", _fig("latency_5000", "p50_ms"), 0.3, at_least=False),
    Target("latency at 5,000/s: p99 ≤ 1 ms", _fig("latency_5000", "p99_ms"), 1.0, at_least=False),
    Target("latency at 20,000/s: p99 ≤ 2 ms", _fig("latency_20000", "p99_ms"), 2.0, at_least=False),
    Target("critical lane under a low flood: p99 ≤ 2 ms", _fig("priority", "critical_p99_ms"), 2.0, at_least=False),
    Target("end to end with outputs (informational), events/s", _fig("variant_outputs", "events_per_s"), None),
    Target("end to end, 2 worker processes (informational), events/s", _fig("variant_processes_2", "events_per_s"),
           None),
    Target("memory per retained tick ≤ 1.3× its encoded payload", _fig("memory", "ratio_to_payload"), 1.3,
           at_least=False),
    Target("metrics on ≥ 90% of metrics off (cost ≤ 10%)", _rat("metrics_on_vs_off"), 0.9),
    Target("ordered mode ≥ 70% of unordered", _rat("ordered_vs_unordered"), 0.7),
    Target("ordered mode with outputs (informational), ratio to unordered with outputs",
           _rat("ordered_outputs_vs_unordered"), None),
    Target("ordered mode with outputs, commit_ahead = 16 (informational), ratio to unordered with outputs",
           _rat("ordered_ahead_vs_unordered"), None),
]


def targets(doc: Doc) -> list[dict[str, Any]]:
    """Every target judged against the results."""
    return [t.judge(doc) for t in TARGETS]


def number(value: float | None) -> str:
    """A figure, readably: thousands separated, small values with decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if size >= 10 else f"{value:.3f}" if size < 0.1 else f"{value:.2f}"


def rows(doc: Doc) -> list[tuple[str, str, str, str]]:
    """(case, figure, median, min – max) for every shown figure; a status line for cases without figures."""
    out = []
    for name, case in doc["cases"].items():
        if case["status"] in ("not available", "failed"):
            why = case.get("reason") or case.get("error", "")
            out.append((name, case["status"], why.splitlines()[0] if why else "", ""))
            continue
        for key, label in SHOWN.get(case["scenario"], []):
            f = case["summary"].get(key)
            if f is not None:
                out.append((name, label, number(f["median"]), f"{number(f['min'])} – {number(f['max'])}"))
        if case["status"] != "ok":
            out.append((name, "PROBLEMS", json.dumps(case["problems"]), ""))
    return out


def _headline(doc: Doc) -> str:
    env, w, s = doc["environment"], doc["workload"], doc["settings"]
    v, m, r = env["versions"], env["machine"], env["redis"]
    server = "dedicated, no persistence" if r["started_by_suite"] else "given by URL"
    return (f"{w['events']:,} `Tick` events of {w['encoded_bytes']} bytes (msgpack) over {w['symbols']} symbols; "
            f"median of {s['repeats']} repeats (min – max). {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; "
            f"Redis {r['version']} ({server}); Python {v['python']}, redis-py {v['redis-py']}, hiredis {v['hiredis']}, "
            f"msgspec {v['msgspec']}, uvloop {v['uvloop']}; fabric {v['fabric']} at {env['revision'] or 'unknown'}.")


def table(doc: Doc) -> str:
    """The plain-text report printed at the end of a run."""
    lines = [_headline(doc), ""]
    lines += [f"  {c:26s} {f:28s} {m:>14s}   {r}" for c, f, m, r in rows(doc)]
    lines += ["", "ratios (medians):"]
    lines += [f"  {k:34s} {number(v)}" for k, v in doc["ratios"].items()]
    lines += ["", "targets:" + ("  (--quick: the figures mean nothing)" if doc["settings"]["quick"] else "")]
    lines += [f"  {t['status']:13s} {t['target']:58s} {number(t['figure'])}" for t in doc["targets"]]
    lines += ["", f"loss check: {'every case lost nothing' if doc['ok'] else 'FAILED, see PROBLEMS above'}"]
    return "\n".join(lines)


def markdown(doc: Doc) -> str:
    """The results as a Markdown section (README's performance section is this output)."""
    lines = ["## Performance", "", f"Measured with `python -m bench` on {doc['started_at'][:10]}. {_headline(doc)}",
             "", "| case | figure | median | min – max |", "|---|---|---:|---:|"]
    lines += [f"| {c} | {f} | {m} | {r} |" for c, f, m, r in rows(doc)]
    lines += ["", "| ratio | median |", "|---|---:|"]
    lines += [f"| {k} | {number(v)} |" for k, v in doc["ratios"].items()]
    lines += ["", "| target | figure | status |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {number(t['figure'])} | {t['status']} |" for t in doc["targets"]]
    return "\n".join(lines) + "\n"


def write_json(doc: Doc, path: Path) -> None:
    """Write the whole document (NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(doc), indent=2, ensure_ascii=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
