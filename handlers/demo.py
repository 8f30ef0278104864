"""``fabric demo``: the trading pipeline on fabric, end to end, in one command.

A run, in order:

1. the single-process run (``handlers.pipeline.run_pipeline``) over the same input: the reference the run on
   fabric must match, event for event and to the last bit of the final portfolio;
2. the pipeline's workers, as processes: one ``fabric worker --config config/pipeline.toml --only NAME`` per
   slot, under a ``fabric.supervisor.Supervisor`` (which restarts any that dies) serving their merged metrics on
   a local port; the run starts feeding once every worker reports ready;
3. the feed: N symbols x M seeded ticks (``handlers.feed``), or the bars of a CSV file (a backtest on the same
   code path), published at a steady rate; with ``chaos``, one worker is killed a third of the way in and the
   exchange goes down two thirds of the way in (``handlers.chaos``);
4. the drain: done when every group has taken and committed every entry of its topics (lag 0, pending 0 on
   every stream, twice in a row), or not done by the deadline;
5. the summary, read back from the streams (``handlers.summary``), beside the single-process run's.

The workers' own log lines (and the supervisor's) go to a file, not the terminal: the run's temporary
directory, kept (and named in the summary) when the run did not end as the single-process run did.
The namespace is a fresh one per run unless given, so a run never meets another's streams or state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis

from fabric import inspection
from fabric.breaker import describe
from fabric.client import URL_ENV, connect, translated
from fabric.config import FabricConfig, WorkerSpec, load_config
from fabric.errors import ConfigError, FabricError, NotFound
from fabric.events import Bar, PortfolioUpdate, Tick
from fabric.keys import Keys
from fabric.publisher import Publisher
from fabric.supervisor import Program, Supervisor
from fabric.telemetry import supervised
from handlers import chaos
from handlers.bars import BarFileError, read_bars
from handlers.feed import feed, symbols
from handlers.pipeline import PipelineConfig, PipelineResult, run_pipeline
from handlers.portfolio import Allocation
from handlers.summary import Latency, TopicCount, read_events, same, tally, topic_lengths
from handlers.wiring import CONFIG_ENV, NAMESPACE_ENV, SYMBOLS_ENV

__all__ = ["DEFAULT_CONFIG", "DemoOptions", "Progress", "Summary", "pipeline_config", "run_demo", "single_process"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "pipeline.toml"
FILE_TIMEFRAME = "1m"
"""The timeframe of a bar file's bars, unless a pipeline config file says otherwise."""
READY_TIMEOUT_S = 90.0
"""How long the workers may take to start and join their groups (Python processes on a busy machine)."""
STOP_TIMEOUT_S = 30.0
PUBLISH_TICKS_PER_S = 100
"""How often the feed publishes a batch: its rate is spread over this many batches a second."""
DRAIN_POLL_S = 0.1
DRAIN_FLOOR_S = 60.0
"""The shortest default drain deadline (``DemoOptions.drain_deadline_s``)."""
DRAIN_PACE_PER_S = 500
"""Inputs a second the default drain deadline assumes the pipeline drains: half the pace the default rate is set
to on 2 cores, for a busy machine."""


class DemoOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What to run: the input, its pace, the wiring, and whether to break things on the way."""

    symbols: int = 8
    ticks: int = 1_500
    """Ticks per symbol."""
    seed: int = 7
    rate_per_s: int = 1_000
    """Inputs published per second."""
    bars: str | None = None
    """A CSV file of bars (``handlers.bars``) to run instead of the synthetic ticks."""
    chaos: bool = False
    kill: str = "portfolio"
    """The worker ``chaos`` kills (its first process)."""
    processes: int | None = None
    """Processes per worker, instead of each table's ``processes``."""
    config: str = str(DEFAULT_CONFIG)
    pipeline_config: str | None = None
    """A TOML file of ``PipelineConfig`` fields; the defaults otherwise."""
    namespace: str | None = None
    deadline_s: float | None = None
    """How long the pipeline may take to drain once the feed is done; None: ``drain_deadline_s``'s default."""

    def drain_deadline_s(self, inputs: int) -> float:
        """``deadline_s``, or by default the time the backlog the feed leaves would take to drain at
        ``DRAIN_PACE_PER_S`` (``inputs / DRAIN_PACE_PER_S - inputs / rate_per_s``), at least ``DRAIN_FLOOR_S``:
        a run's deadline grows with its size and rate."""
        if self.deadline_s is not None:
            return self.deadline_s
        return max(DRAIN_FLOOR_S, inputs / DRAIN_PACE_PER_S - inputs / self.rate_per_s)


class Progress(NamedTuple):
    """The run so far: inputs published of the total, and entries per topic."""

    elapsed_s: float
    published: int
    total: int
    counts: dict[str, int]


class Summary(msgspec.Struct, kw_only=True):
    """What a run ended with, beside the single-process run's."""

    mode: str
    """``live`` (ticks), ``backtest`` (a bar file) or ``single-process`` (no Redis)."""
    namespace: str | None
    symbols: list[str]
    inputs: int
    elapsed_s: float
    drained: bool
    waiting_for: str | None = None
    """What the pipeline still waited for at the deadline, if it did not drain."""
    deadline_s: float | None = None
    """How long the pipeline was given to drain once the feed was done (None in the single-process mode)."""
    topics: list[TopicCount]
    end_to_end: Latency | None = None
    dead_letters: int = 0
    breaker_trips: int = 0
    restarts: dict[str, int] = {}
    chaos: list[str] = []
    portfolio: PortfolioUpdate
    single_process: PortfolioUpdate
    complete: bool
    """Every topic holds exactly the single-process run's events."""
    same_portfolio: bool
    log: str | None = None
    """The workers' log file, kept because the run did not end as the single-process run did."""

    @property
    def ok(self) -> bool:
        """Drained, complete, and the same final portfolio."""
        return self.drained and self.complete and self.same_portfolio


def pipeline_config(options: DemoOptions) -> PipelineConfig:
    """The pipeline's settings for this run: the file's (or the defaults), a bar file's timeframe for a backtest."""
    config = PipelineConfig()
    if options.pipeline_config:
        path = options.pipeline_config
        try:
            config = msgspec.convert(tomllib.loads(Path(path).read_text()), PipelineConfig)
        except OSError as exc:
            raise ConfigError(f"cannot read pipeline config {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{path}: {exc}: give PipelineConfig fields (timeframe, initial_cash, [limits], "
                              "[costs], [strategy])") from exc
    elif options.bars:
        config = msgspec.structs.replace(config, timeframe=FILE_TIMEFRAME)
    return config


def _toml(config: PipelineConfig) -> str:
    """``config`` as a TOML file the workers read back (JSON scalars are TOML scalars)."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    lines = [f"{k} = {msgspec.json.encode(v).decode()}" for k, v in data.items() if not isinstance(v, dict)]
    for table, values in ((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += [f"[{table}]", *(f"{k} = {msgspec.json.encode(v).decode()}" for k, v in values.items())]
    return "\n".join(lines) + "\n"


class _Input(NamedTuple):
    symbols: list[str]
    events: Callable[[], Iterator[Tick] | Iterator[Bar]]
    """A fresh iterator each call: events are made as they are published, so ``ts_ns`` is when they were sent."""
    total: int


def _input(options: DemoOptions, config: PipelineConfig) -> _Input:
    if options.bars is None:
        if options.symbols < 1 or options.ticks < 1:
            raise ConfigError("--symbols and --ticks must be at least 1")
        return _Input(symbols(options.symbols), lambda: feed(options.symbols, options.ticks, options.seed),
                      options.symbols * options.ticks)
    path = options.bars
    try:
        bars = list(read_bars(path, config.timeframe))
    except OSError as exc:
        raise ConfigError(f"cannot read bar file {path}: {exc.strerror}") from exc
    except BarFileError as exc:
        raise ConfigError(str(exc)) from exc
    if not bars:
        raise ConfigError(f"{path} holds no bars: add lines after the header")
    return _Input(sorted({b.symbol for b in bars}), lambda: read_bars(path, config.timeframe), len(bars))


async def single_process(options: DemoOptions) -> Summary:
    """The run without Redis: every event through every stage in this process (``run_pipeline``)."""
    config = pipeline_config(options)
    source = _input(options, config)
    started = time.monotonic()
    result = await run_pipeline(source.events(), source.symbols, config)
    rows = [TopicCount(topic=t, stage="-", events=n, expected=n, latency=None) for t, n in result.counts.items()]
    return Summary(mode="single-process", namespace=None, symbols=source.symbols, inputs=source.total,
                   elapsed_s=time.monotonic() - started, drained=True, topics=rows, portfolio=result.portfolio,
                   single_process=result.portfolio, complete=True, same_portfolio=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the workers this process starts; put the old values back afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send this process's stderr (where the supervisor relays its workers' lines) to a file while the block runs."""
    with path.open("a") as log:
        saved, sys.stderr = sys.stderr, log
        try:
            yield
        finally:
            sys.stderr = saved


def _programs(specs: dict[str, WorkerSpec], options: DemoOptions, ns: str) -> list[Program]:
    """Each ``[workers.NAME]`` table as ``fabric worker --only NAME`` processes (the URL is in the environment)."""

    def argv(name: str) -> Callable[[str], list[str]]:
        return lambda consumer: [sys.executable, "-m", "fabric", "worker", "--config", options.config, "--only", name,
                                 "--processes", "1", "--consumer", consumer, "--namespace", ns]

    return [Program(name, options.processes or spec.processes, argv(name)) for name, spec in specs.items()]


async def run_demo(url: str, options: DemoOptions, progress: Callable[[Progress], None]) -> Summary:
    """Run the pipeline on the Redis at ``url`` as the module docstring says; ``progress`` is called every second."""
    fabric_config = load_config(options.config)
    specs = fabric_config.select_workers()
    if options.chaos and options.kill not in specs:
        raise ConfigError(f"--kill {options.kill}: no [workers.{options.kill}] in {options.config} "
                          f"(it has {', '.join(specs)})")
    config = pipeline_config(options)
    source = _input(options, config)
    reference = await run_pipeline(source.events(), source.symbols, config)
    keys = Keys(options.namespace or f"demo{os.urandom(4).hex()}")
    client = connect(url)
    workdir = Path(tempfile.mkdtemp(prefix="fabric-demo-"))
    try:
        with translated(url):
            await client.ping()
            (workdir / "pipeline.toml").write_text(_toml(config))
            env = {URL_ENV: url, NAMESPACE_ENV: keys.ns, SYMBOLS_ENV: ",".join(source.symbols),
                   CONFIG_ENV: str(workdir / "pipeline.toml")}
            with _environment(env), _stderr_to(workdir / "workers.log"):
                summary = await _Run(client, keys, options, fabric_config, source, reference, progress).run(
                    Supervisor(_programs(specs, options, keys.ns)))
    finally:
        await client.aclose()
    if summary.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        summary.log = str(workdir / "workers.log")
    return summary


class _Run:
    """One run on fabric, from the workers' start to the summary."""

    def __init__(self, client: Redis, keys: Keys, options: DemoOptions, fabric_config: FabricConfig,
                 source: _Input, reference: PipelineResult, progress: Callable[[Progress], None]) -> None:
        self.client = client
        self.keys = keys
        self.options = options
        self.fabric_config = fabric_config
        self.source = source
        self.reference = reference
        self.progress = progress
        self.published = 0
        self.started = time.monotonic()
        self.chaos: list[str] = []

    async def run(self, supervisor: Supervisor) -> Summary:
        async with supervised(supervisor, port=0, host="127.0.0.1") as (endpoints, _):
            workers = asyncio.create_task(supervisor.run())
            try:
                await self._ready(lambda: endpoints.ready() is None, workers)
                self.started = time.monotonic()
                waiting_for = await self._feed_and_drain(supervisor, workers)
                return await self._summary(waiting_for, supervisor)
            finally:
                if not supervisor.stopping:
                    supervisor.forward(signal.SIGTERM)
                await asyncio.wait_for(workers, STOP_TIMEOUT_S)

    async def _ready(self, ready: Callable[[], bool], workers: asyncio.Task[bool]) -> None:
        if not await chaos.until(lambda: ready() or workers.done(), READY_TIMEOUT_S):
            raise FabricError(f"the workers did not all become ready within {READY_TIMEOUT_S:g} s: see the worker "
                              "log (is the machine very busy?)")
        if workers.done():
            await workers  # a worker that could not start raises its ConfigError here
            raise FabricError("the workers stopped before the run began (interrupted?)")

    async def _feed_and_drain(self, supervisor: Supervisor, workers: asyncio.Task[bool]) -> str | None:
        tasks = [asyncio.create_task(self._feed())]
        if self.options.chaos:
            tasks.append(asyncio.create_task(self._chaos(supervisor)))
        reporter = asyncio.create_task(self._report())
        try:
            while not all(t.done() for t in tasks):
                for t in tasks:
                    if t.done():
                        t.result()  # a failure stops the run here
                if workers.done():
                    raise FabricError("interrupted: the workers were told to stop before the run was over")
                await asyncio.wait([*tasks, workers], return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.result()
            waiting_for = await self._drain(workers)
        finally:
            for t in [*tasks, reporter]:
                t.cancel()
            await asyncio.gather(*tasks, reporter, return_exceptions=True)
        self.progress(await self._progress())
        return waiting_for

    async def _feed(self) -> None:
        loop = asyncio.get_running_loop()
        batch = max(1, self.options.rate_per_s // PUBLISH_TICKS_PER_S)
        start = loop.time()
        events = self.source.events()
        async with Publisher(self.client, keys=self.keys) as pub:
            while True:
                await asyncio.sleep(max(0.0, start + self.published / self.options.rate_per_s - loop.time()))
                chunk = list(islice(events, batch))
                if not chunk:
                    return
                await pub.publish_many(chunk)
                self.published += len(chunk)

    def _fed(self) -> float:
        return self.published / self.source.total

    async def _chaos(self, supervisor: Supervisor) -> None:
        """A third of the way in, kill a worker; two thirds of the way in, take the exchange down."""
        await chaos.until(lambda: self._fed() >= 1 / 3, float("inf"))
        at = f"at {self._fed():.0%} of the feed: "
        self.chaos.append(at + await chaos.kill(supervisor, f"{self.options.kill}[0]"))
        await chaos.until(lambda: self._fed() >= 2 / 3, float("inf"))
        breakers = [b.name for spec in self.fabric_config.workers.values() for b in spec.breakers]
        if breakers:
            at = f"at {self._fed():.0%} of the feed: "
            self.chaos.append(at + await chaos.outage(self.client, self.keys, breakers[0]))

    async def _progress(self) -> Progress:
        counts = await topic_lengths(self.client, self.keys)
        return Progress(time.monotonic() - self.started, self.published, self.source.total, counts)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(FabricError, OSError):
                self.progress(await self._progress())

    def _reads(self) -> dict[str, list[str]]:
        return {spec.group: spec.topics for spec in self.fabric_config.workers.values()}

    async def _waiting_for(self) -> str | None:
        """None when every group has committed every entry of its topics, else what one still waits for."""
        for group, topics in self._reads().items():
            for topic in topics:
                try:
                    streams = await inspection.streams(self.client, self.keys, topics=[topic])
                except NotFound:
                    continue  # nothing was published to it
                for s in streams:
                    lag = next((g for g in s.groups if g.group == group), None)
                    if s.exists and lag is None:
                        return f"group {group} has not joined {s.key}"
                    if lag is not None and (lag.lag != 0 or lag.pending):
                        return f"group {group} on {s.key}: {lag.lag} entries not read, {lag.pending} pending"
        return None

    async def _drain(self, workers: asyncio.Task[bool]) -> str | None:
        deadline = time.monotonic() + self._deadline_s()
        settled = 0
        while settled < 2:
            if workers.done():
                raise FabricError("interrupted: the workers were told to stop before the run was over")
            waiting_for = await self._waiting_for()
            settled = settled + 1 if waiting_for is None else 0
            if waiting_for is not None and time.monotonic() > deadline:
                return waiting_for
            await asyncio.sleep(DRAIN_POLL_S)
        return None

    def _deadline_s(self) -> float:
        return self.options.drain_deadline_s(self.source.total)

    async def _dead_letters(self) -> int:
        dlqs = await self.client.smembers(self.keys.dlq_registry())
        return sum([int(await self.client.xlen(d)) for d in dlqs])

    async def _trips(self) -> int:
        trips = 0
        for name in self.fabric_config.breakers:
            with contextlib.suppress(NotFound):
                info = await describe(self.client, self.keys, name, transitions=100)
                trips += sum(1 for t in info.transitions if t.old_state == "CLOSED" and t.new_state == "OPEN")
        return trips

    async def _summary(self, waiting_for: str | None, supervisor: Supervisor) -> Summary:
        elapsed = time.monotonic() - self.started
        allocation = Allocation(initial_cash=pipeline_config(self.options).initial_cash,
                                symbols=tuple(self.source.symbols))
        events = await read_events(self.client, self.keys)
        result = tally(events, self.reference.counts, allocation, pipeline_config(self.options).timeframe)
        return Summary(
            mode="backtest" if self.options.bars else "live", namespace=self.keys.ns, symbols=self.source.symbols,
            inputs=self.source.total, elapsed_s=elapsed, drained=waiting_for is None, waiting_for=waiting_for,
            deadline_s=self._deadline_s(),
            topics=result.topics, end_to_end=result.end_to_end, dead_letters=await self._dead_letters(),
            breaker_trips=await self._trips(), chaos=self.chaos,
            restarts={s.label: s.generation - 1 for s in supervisor.slots if s.generation > 1},
            portfolio=result.portfolio, single_process=self.reference.portfolio,
            complete=all(t.events == t.expected for t in result.topics),
            same_portfolio=same(result.portfolio, self.reference.portfolio),
        )


if __name__ == "__main__":  # ``python -m handlers.demo``, the first command before ``fabric demo``
    from fabric.cli import app

    app(["demo", *sys.argv[1:]])
