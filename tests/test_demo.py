"""fabric demo: the pipeline's workers as real processes on a real redis-server, judged against the single-process run.

Each run starts seven worker processes, so the sizes are small; the portfolio comparisons are exact (JSON floats
round-trip), never approximate.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from fabric.cli import app
from fabric.cli.options import Exit
from fabric.codec import decode_fields
from fabric.embedded import free_port
from fabric.events import Fill, PortfolioUpdate
from fabric.keys import Keys
from handlers.bars import SAMPLE_BARS, read_bars
from handlers.demo import DRAIN_FLOOR_S, DRAIN_PACE_PER_S, DemoOptions
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineConfig, PipelineResult, contents, run_pipeline
from tests.cli_runner import with_redis
from tests.conftest import fabric_cmd
from tests.fixtures.handlers import subprocess_env

pytestmark = [pytest.mark.real_only, pytest.mark.timeout(180)]

SYMBOLS, TICKS, SEED = 3, 600, 7
SIZE = ["--symbols", str(SYMBOLS), "--ticks", str(TICKS), "--seed", str(SEED)]
RUN_TIMEOUT_S = 150.0
"""A deadline for one whole run (seven Python processes starting on a busy 2-core machine), not a threshold."""


def _demo(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``fabric demo ARGS --redis-url URL`` in a subprocess, as a user runs it."""
    return subprocess.run(fabric_cmd("demo", *args, "--redis-url", redis_url), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=subprocess_env(redis_url, "unused"), check=False)


def _summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, Any] = msgspec.json.decode(done.stdout)
    return summary


def _portfolio(summary: dict[str, Any]) -> PortfolioUpdate:
    return msgspec.convert(summary["portfolio"], PortfolioUpdate)


def _reference() -> PipelineResult:
    return asyncio.run(run_pipeline(feed(SYMBOLS, TICKS, SEED), symbols(SYMBOLS)))


def test_two_runs_on_redis_and_the_single_process_mode_end_with_the_same_portfolio(redis_url):
    # given the single-process run of the pipeline over the seeded feed, which trades
    want = _reference()
    assert want.portfolio.realized_pnl != 0 and want.counts["fill"] > 0
    # when the demo runs twice on Redis (worker processes), and once in its single-process mode
    first = _summary(_demo(redis_url, *SIZE, "--rate", "5000", "--json"))
    second = _summary(_demo(redis_url, *SIZE, "--rate", "5000", "--json"))
    alone = _summary(_demo(redis_url, *SIZE, "--single-process", "--json"))
    # then all three end with run_pipeline's final portfolio, to the last bit
    assert first["namespace"] != second["namespace"]
    for summary in (first, second, alone):
        assert summary["ok"] is True
        assert contents(_portfolio(summary)) == contents(want.portfolio)
    # and every topic of the runs on Redis holds exactly run_pipeline's events
    for summary in (first, second):
        assert {t["topic"]: t["events"] for t in summary["topics"]} == want.counts
        assert summary["dead_letters"] == 0 and summary["drained"] is True


def test_killing_a_busy_worker_and_an_exchange_outage_change_nothing_in_the_final_portfolio(redis_url):
    # given the single-process run's result
    want = _reference()
    # when the demo runs with chaos: the bar stage (every tick goes through it) is SIGKILLed a third of the way in,
    # and the exchange goes down two thirds of the way in
    done = _demo(redis_url, *SIZE, "--rate", "600", "--chaos", "--kill", "bars", "--json")
    summary = _summary(done)
    # then the supervisor restarted the killed process, and the outage opened the exchange's breaker
    assert summary["restarts"] == {"bars[0]": 1}
    assert any("killed bars[0]" in line and "SIGKILL" in line for line in summary["chaos"]), summary["chaos"]
    assert summary["breaker_trips"] >= 1, summary["chaos"]
    # and nothing was lost or doubled: every topic holds run_pipeline's events, and the portfolio is its own
    assert {t["topic"]: t["events"] for t in summary["topics"]} == want.counts
    assert summary["dead_letters"] == 0
    assert contents(_portfolio(summary)) == contents(want.portfolio)


def test_a_bar_file_backtest_on_the_workers_ends_with_run_pipelines_result(redis_url):
    # given run_pipeline over the sample file's one-minute bars
    bars = list(read_bars(SAMPLE_BARS))
    want = asyncio.run(run_pipeline(bars, {b.symbol for b in bars}, PipelineConfig(timeframe="1m")))
    # when the demo runs the file on the workers
    summary = _summary(_demo(redis_url, "--bars", str(SAMPLE_BARS), "--rate", "5000", "--json"))
    # then it is a backtest of every bar, with run_pipeline's events and final portfolio
    assert summary["mode"] == "backtest" and summary["inputs"] == len(bars)
    assert {t["topic"]: t["events"] for t in summary["topics"]} == want.counts
    assert contents(_portfolio(summary)) == contents(want.portfolio)


def test_fabric_demo_prints_progress_and_the_summary_and_exits_0(redis_url):
    # when the demo runs with its text output
    done = _demo(redis_url, "--symbols", "2", "--ticks", "300", "--rate", "5000")
    # then it exits 0 having printed each stage's events and latency, the end-to-end latency, the fault counts,
    # the final portfolio and the verdict
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for stage in ("bars", "indicators", "strategy", "risk", "broker", "audit", "portfolio"):
        assert f"\n{stage} " in out, out
    assert "end to end (input made -> portfolio update made)" in out
    assert "dead letters: 0   breaker trips: 0   worker restarts: none" in out
    assert "final portfolio:" in out and "equity " in out
    assert "nothing lost: every topic holds exactly the single-process run's events" in out
    # and its progress went to stderr, a line a second ending with everything fed
    assert "fed 600/600" in done.stderr
    assert "Traceback" not in done.stderr


async def _a_fill(client: Any, keys: Keys) -> Fill:
    """The first fill of the run, read from its fill streams."""
    for stream in sorted(await client.smembers(keys.topic_registry("fill"))):
        for _, fields in await client.xrange(stream, count=1):
            fill = decode_fields(fields)
            assert isinstance(fill, Fill)
            return fill
    raise AssertionError(f"no fill in namespace {keys.ns}")


CHAIN = [("tick", "Tick"), ("bar", "Bar"), ("features", "Features"), ("signal", "Signal"), ("order", "Order"),
         ("fill", "Fill"), ("portfolio_update", "PortfolioUpdate")]
HOP = re.compile(r"^(?P<indent>(  )*)(?P<latency>\S+)  (?P<topic>\S+)  (?P<type>\S+)  \S+  (?P<id>[0-9a-f]{32})$")
"""A line of ``fabric trace``: two spaces per hop of depth, the latency, topic, type, symbol and event_id."""
LATENCY = re.compile(r"^\+\d+(\.\d+)?(ns|µs|ms|s)$")


def test_fabric_trace_shows_a_demo_fills_chain_from_tick_to_portfolio_update_with_each_hops_latency(redis_url):
    # given a demo run on Redis, and the correlation id of one of its fills (the event_id of the tick that began it)
    summary = _summary(_demo(redis_url, *SIZE, "--rate", "5000", "--json"))
    keys = Keys(summary["namespace"])
    fill = with_redis(redis_url, lambda client: _a_fill(client, keys))
    # when that correlation id is traced, as a user would after the run
    done = subprocess.run(fabric_cmd("trace", fill.correlation_id, "--import", "handlers.audit", "--redis-url",
                                     redis_url, "--namespace", keys.ns),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    hops = [m.groupdict() for m in map(HOP.match, lines) if m]
    # then the chain is there, one hop deeper each: tick -> bar -> features -> signal -> order -> fill -> portfolio
    # update, rooted at the traced tick and passing through the fill that was read
    chain = [next((h for h in hops if (h["topic"], h["type"]) == hop), None) for hop in CHAIN]
    assert None not in chain, done.stdout
    assert [len(h["indent"]) // 2 for h in chain] == list(range(len(CHAIN))), done.stdout
    assert chain[0]["id"] == fill.correlation_id and chain[0]["latency"] == "root", done.stdout
    assert chain[5]["id"] == fill.event_id, done.stdout
    # and each hop after the tick shows its latency, and the chain its end-to-end time, every entry decoded
    assert all(LATENCY.match(h["latency"]) for h in chain[1:]), done.stdout
    assert lines[-1].startswith("end to end: ") and "unknown" not in lines[-1], done.stdout
    assert "could not be decoded" not in done.stdout, done.stdout
    assert "Traceback" not in done.stderr


def test_the_drain_deadline_grows_with_the_runs_inputs_and_rate_unless_given():
    # the defaults get the floor; the help's example gets the time its backlog takes at DRAIN_PACE_PER_S
    assert DemoOptions().drain_deadline_s(8 * 1_500) == DRAIN_FLOOR_S
    big = DemoOptions(symbols=20, ticks=5_000, rate_per_s=8_000)
    assert big.drain_deadline_s(100_000) == 100_000 / DRAIN_PACE_PER_S - 100_000 / 8_000 > DRAIN_FLOOR_S
    # more inputs, or the same fed faster, get longer; --deadline-s is taken as given
    assert big.drain_deadline_s(200_000) > big.drain_deadline_s(100_000)
    faster = msgspec.structs.replace(big, rate_per_s=80_000)
    assert faster.drain_deadline_s(100_000) > big.drain_deadline_s(100_000)
    assert msgspec.structs.replace(big, deadline_s=5.0).drain_deadline_s(100_000) == 5.0


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["demo", *args])


def test_an_unreachable_redis_is_one_line_and_exit_3():
    result = _invoke("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == Exit.UNREACHABLE, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_a_wrong_password_is_one_line_and_exit_4(tmp_path):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "right"],
                              stdout=subprocess.DEVNULL)
    try:
        result = None
        for _ in range(500):  # until the server answers (a deadline, not a threshold)
            result = _invoke("--redis-url", f"redis://:wrong@127.0.0.1:{port}/0")
            if result.exit_code != Exit.UNREACHABLE:
                break
        assert result is not None and result.exit_code == Exit.AUTH, result.output
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    finally:
        server.terminate()
        server.wait()


@pytest.mark.parametrize(("args", "message"), [
    (["--symbols", "0"], "Invalid value for '--symbols'"),
    (["--bars", "/nonexistent/bars.csv"], "cannot read bar file /nonexistent/bars.csv"),
    (["--chaos", "--kill", "nobody"], "--kill nobody: no [workers.nobody]"),
    (["--config", "/nonexistent/pipeline.toml"], "cannot read config /nonexistent/pipeline.toml"),
])
def test_bad_flags_exit_2_with_one_line_and_no_traceback(redis_url, args, message):
    result = _invoke(*args, "--redis-url", redis_url)
    assert result.exit_code == Exit.USAGE, result.output
    assert message in result.stderr and "Traceback" not in result.output
