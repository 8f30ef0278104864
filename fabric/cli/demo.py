"""``fabric demo``: the trading pipeline end to end (``handlers.demo``), its progress and its summary."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import msgspec
import typer
import uvloop

from fabric.cli.options import Exit, Json, Namespace, RedisUrl, app, example, fail, reported, run
from fabric.cli.output import emit_json, table
from fabric.embedded import free_port, redis_server

if TYPE_CHECKING:
    from handlers.demo import DemoOptions, Progress, Summary
    from handlers.summary import Latency

__all__ = ["demo"]


def _latency(lat: Latency | None) -> list[object]:
    return [None] * 4 if lat is None else [lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.max_ms]


def _progress_printer(stream: TextIO) -> Any:
    """Progress as one updating line on a terminal, else a line each second."""
    tty = stream.isatty()

    def show(p: Progress) -> None:
        counts = "  ".join(f"{topic} {n:,}" for topic, n in p.counts.items() if n)
        line = f"{p.elapsed_s:5.1f}s  fed {p.published:,}/{p.total:,}  {counts}"
        stream.write(f"\r{line}\033[K" if tty else f"{line}\n")
        stream.flush()

    return show


def _print(s: Summary) -> None:
    what = f"{len(s.symbols)} symbols, {s.inputs:,} {'bars' if s.mode == 'backtest' else 'ticks'}"
    typer.echo(f"\n{s.mode} run: {what} in {s.elapsed_s:.1f} s" + (f", namespace {s.namespace}" if s.namespace else ""))
    typer.echo("events per stage, and each stage's hop latency (its input made -> its output made), in ms:")
    table(["stage", "topic", "events", "single-process", "p50", "p90", "p99", "max"],
          [[t.stage, t.topic, t.events, t.expected, *_latency(t.latency)] for t in s.topics])
    if s.end_to_end is not None:
        e = s.end_to_end
        typer.echo(f"end to end (input made -> portfolio update made), {e.count:,} updates: p50 {e.p50_ms:.2f} ms, "
                   f"p90 {e.p90_ms:.2f} ms, p99 {e.p99_ms:.2f} ms, max {e.max_ms:.2f} ms")
    if s.mode != "single-process":
        restarts = ", ".join(f"{label} x{n}" for label, n in s.restarts.items()) or "none"
        typer.echo(f"dead letters: {s.dead_letters}   breaker trips: {s.breaker_trips}   worker restarts: {restarts}")
    for line in s.chaos:
        typer.echo(f"chaos: {line}")
    p = s.portfolio
    typer.echo("\nfinal portfolio:")
    table(["symbol", "quantity", "avg price", "mark", "unrealized"],
          [[sym, pos.quantity, pos.avg_price, pos.market_price, pos.quantity * (pos.market_price - pos.avg_price)]
           for sym, pos in p.positions.items()], empty="(no open positions)")
    typer.echo(f"cash {p.cash:,.2f}   realized PnL {p.realized_pnl:,.2f}   unrealized PnL {p.unrealized_pnl:,.2f}   "
               f"equity {p.total_value:,.2f}")
    if s.mode != "single-process":
        typer.echo(_verdict(s))


def _verdict(s: Summary) -> str:
    if s.ok:
        return ("nothing lost: every topic holds exactly the single-process run's events, and the final portfolio "
                "is the single-process run's, to the last bit")
    deadline = f"{s.deadline_s:.0f} s of the feed's end (--deadline-s allows more)" if s.deadline_s else "the deadline"
    problems = [] if s.drained else [f"not drained within {deadline}: {s.waiting_for}"]
    problems += [] if s.complete else ["events differ from the single-process run's: " + ", ".join(
        f"{t.topic} {t.events:,} of {t.expected:,}" for t in s.topics if t.events != t.expected)]
    problems += [] if s.same_portfolio else ["the final portfolio differs from the single-process run's"]
    return "NOT the single-process result: " + "; ".join(problems) + f" (worker log: {s.log})"


@app.command(epilog=example(
    "fabric demo",
    "fabric demo --chaos",
    "fabric demo --symbols 20 --ticks 5000 --rate 8000",
    "fabric demo --bars handlers/data/sample_bars.csv",
    "fabric demo --single-process --json",
))
def demo(
    symbols: Annotated[int, typer.Option(min=1, help="Symbols in the synthetic feed.")] = 8,
    ticks: Annotated[int, typer.Option(min=1, help="Ticks per symbol.")] = 1_500,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic feed: the same seed, the same run.")] = 7,
    rate: Annotated[int, typer.Option(
        min=1, help="Inputs published per second: a pace the pipeline keeps up with on 2 cores, so latency "
                    "measures fabric; faster, it measures the backlog.")] = 1_000,
    bars: Annotated[str | None, typer.Option(
        metavar="FILE", help="Run over the bars of a CSV file (symbol,start,open,high,low,close,volume): a backtest "
                             "on the same workers.")] = None,
    chaos: Annotated[bool, typer.Option(
        "--chaos", help="Mid-run, SIGKILL a worker process (--kill) and take the exchange down, tripping its "
                        "breaker; the summary shows whether anything was lost.")] = False,
    kill: Annotated[str, typer.Option(metavar="WORKER", help="The worker --chaos kills.")] = "portfolio",
    processes: Annotated[int | None, typer.Option(
        min=1, help="Processes per worker (default: each [workers.NAME] table's).")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", metavar="FILE", help="The pipeline's wiring.  [default: config/pipeline.toml]")] = None,
    pipeline_config: Annotated[str | None, typer.Option(
        metavar="FILE", help="A TOML file of PipelineConfig fields (timeframe, initial_cash, [limits], [costs], "
                             "[strategy]).  [default: the built-in values]")] = None,
    single_process: Annotated[bool, typer.Option(
        "--single-process", help="Run every stage in this process, without Redis: the reference result.")] = False,
    deadline_s: Annotated[float | None, typer.Option(
        min=1, metavar="SECONDS",
        help="How long the pipeline may take to drain once the feed is done.  [default: the time the feed's "
             "backlog takes at 500 inputs a second, inputs/500 - inputs/rate, and at least 60 s: 60 s for the "
             "defaults, 188 s for --symbols 20 --ticks 5000 --rate 8000]")] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    json: Json = False,
) -> None:
    """Run the trading pipeline on fabric: start Redis (unless --redis-url) and the pipeline's workers, feed
    seeded ticks, show progress, and print events per stage, latencies, dead letters, breaker trips and the
    final portfolio beside the single-process run's. Exits 0 when they match, 1 when not."""
    from handlers.demo import DEFAULT_CONFIG, DemoOptions
    from handlers.demo import single_process as run_single

    options = DemoOptions(symbols=symbols, ticks=ticks, seed=seed, rate_per_s=rate, bars=bars, chaos=chaos, kill=kill,
                          processes=processes, config=config or str(DEFAULT_CONFIG),
                          pipeline_config=pipeline_config, namespace=namespace, deadline_s=deadline_s)
    show = _progress_printer(sys.stderr)
    if single_process:
        with reported():
            summary = uvloop.run(run_single(options))
    else:
        summary = _on_redis(options, redis_url, show)
    if json:
        emit_json({**msgspec.to_builtins(summary), "ok": summary.ok})
    else:
        _print(summary)
    if not summary.ok:
        fail(_verdict(summary), Exit.FAILED)


def _on_redis(options: DemoOptions, url: str | None, show: Any) -> Summary:
    """The run on the Redis at ``url``, or on a private redis-server started for it."""
    from handlers.demo import run_demo

    if url:
        return run(lambda resolved: run_demo(resolved, options, show), url, embedded=False)
    port = free_port()
    with reported(), redis_server(port):
        typer.echo(f"started a private redis-server on 127.0.0.1:{port} for this run (--redis-url to use yours)",
                   err=True)
        return run(lambda resolved: run_demo(resolved, options, show), f"redis://127.0.0.1:{port}/0",
                   embedded=False)
    raise AssertionError("unreachable")  # reported() exits on every error
