"""Commands that run things: ``publish`` events, a ``worker`` (or a supervisor of several), a ``dev`` Redis to share."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from fabric.cli.options import (
    ConfigFile,
    Exit,
    Imports,
    Namespace,
    RedisUrl,
    Settings,
    app,
    example,
    fail,
    import_modules,
    reported,
    run,
    settings,
)
from fabric.cli.output import progress
from fabric.client import URL_ENV, connect, translated
from fabric.codec import oversized
from fabric.config import (
    DEFAULT_BLOCK_MS,
    DEFAULT_CONCURRENCY,
    DEFAULT_GRACE_S,
    DEFAULT_HANDLER_TIMEOUT_S,
    DEFAULT_LEASE_MS,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_RECLAIM_IDLE_MS,
    MAX_WORKER_NAME,
    FieldError,
    PublisherConfig,
    Retention,
    WorkerConfig,
)
from fabric.embedded import answers, redis_server
from fabric.endpoints import ANY_HOST, PORT_ENV
from fabric.errors import ConfigError, HandlerLoadError
from fabric.events import Event, event_type, event_types
from fabric.handler import HandlerFn, load_handler
from fabric.keys import Keys, Priority
from fabric.logs import FORMAT_ENV, configure
from fabric.preflight import PROBE_TOPIC, check_publisher
from fabric.publisher import Publisher
from fabric.supervisor import Program, Supervisor

__all__ = ["dev", "publish", "worker"]

PUBLISH_CHUNK = 1_000
MAX_REASON_CHARS = 300
"""The longest reason printed for a bad line."""


Check = Callable[[Event], None]


def _checker(keys: Keys, config: PublisherConfig, topic: str | None, priority: Priority | None) -> Check:
    """What the publisher would refuse, checked line by line, so that one bad line never fails its whole chunk:
    a name that routes nowhere (a NUL in a symbol, a symbol of 10,000 characters), a value the codec cannot
    encode (an integer past 64 bits), a payload over ``max_payload_bytes``."""
    encode = (msgspec.json.Encoder() if config.encoding == "json" else msgspec.msgpack.Encoder()).encode

    def check(event: Event) -> None:
        try:
            keys.stream(topic or event.default_topic, event.default_priority if priority is None else priority,
                        event.symbol)
            size = len(encode(event))
        except (ValueError, OverflowError, msgspec.EncodeError) as exc:
            raise ValueError(f"{type(event).__name__}: {exc}") from None
        if size > config.max_payload_bytes:
            raise ValueError(str(oversized(event, size, config.max_payload_bytes)))

    return check


def _parse_line(line: str) -> Event:
    try:
        raw: Any = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to be an event") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ValueError('needs an object with a "type" field naming the event type')
    cls = event_type(raw["type"])
    if cls is None:
        known = ", ".join(sorted(event_types()))
        raise ValueError(f"unknown event type {raw['type']!r} (known: {known}; --import MODULE for your own)")
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{raw['type']}: {exc}") from None


def _events(lines: Iterator[str], bad: list[str], advance: Callable[[int], None], check: Check
            ) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for number, line in enumerate(lines, 1):
        advance(len(line))
        if not line.strip():
            continue
        try:
            event = _parse_line(line)
            check(event)
            chunk.append(event)
        except ValueError as exc:
            reason = str(exc)
            if len(reason) > MAX_REASON_CHARS:  # a hostile line's values would otherwise be echoed whole
                reason = reason[:MAX_REASON_CHARS] + f"... ({len(reason)} characters)"
            bad.append(f"line {number}: {reason}")
            typer.echo(f"error: line {number}: {reason}", err=True)
            continue
        if len(chunk) >= PUBLISH_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _publish(url: str, keys: Keys, config: PublisherConfig, topic: str | None, priority: Priority | None,
                   chunks: Iterator[list[Event]]) -> tuple[int, int]:
    client = connect(url)
    published = duplicates = 0
    try:
        with translated(url):
            await client.ping()
            await check_publisher(client, keys, (topic,) if topic else (PROBE_TOPIC,),
                                  dedup=config.dedup_window_ms > 0, url=url)
            async with Publisher(client, config, keys) as pub:
                for chunk in chunks:
                    ids = await pub.publish_many(chunk, topic, priority)
                    published += sum(1 for i in ids if i is not None)
                    duplicates += sum(1 for i in ids if i is None)
    finally:
        await client.aclose()
    return published, duplicates


@app.command(epilog=example(
    'echo \'{"type": "Tick", "symbol": "BTC/USD", "bid": 100.0, "ask": 100.5}\' | fabric publish --topic tick',
    "fabric publish --file ticks.jsonl --priority high",
))
def publish(
    topic: Annotated[str | None, typer.Option(help="Topic; default: each event type's own.")] = None,
    priority: Annotated[str | None, typer.Option(help="low, normal, high or critical.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON lines; default stdin.")] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Publish events given as JSON lines (each with a "type" field); bad lines are reported by number (exit 6)."""
    import_modules(imports)
    with reported():
        try:
            prio = Priority.parse(priority) if priority else None
        except ValueError as exc:
            fail(str(exc), Exit.USAGE)
    s = settings(config_file, redis_url, namespace)
    bad: list[str] = []
    try:
        stream = file.open() if file else sys.stdin
        size = file.stat().st_size if file else 0
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", Exit.USAGE)
    with stream, progress(size, "publishing") as advance:
        chunks = _events(iter(stream), bad, advance, _checker(s.keys, s.config.publisher, topic, prio))
        published, dups = run(lambda url: _publish(url, s.keys, s.config.publisher, topic, prio, chunks), s.url)
    typer.echo(f"published {published} events" + (f" ({dups} duplicates skipped)" if dups else "")
               + (f"; {len(bad)} bad lines not published" if bad else ""))
    if bad:
        raise typer.Exit(int(Exit.PARTIAL))


def _logging(verbose: bool, fmt: str) -> None:
    with reported():
        try:
            configure(fmt, logging.DEBUG if verbose else logging.INFO)
        except ValueError as exc:
            raise ConfigError(f"--log-format: {exc}") from None


WORKER_OPTIONS = ("concurrency", "max_deliveries", "output_topic", "reclaim_idle_ms", "block_ms", "grace_s",
                  "handler_timeout_s", "ordered", "lease_ms", "commit_ahead")
"""The WorkerConfig fields the command line can set; given with --config, they override each table's."""


@dataclass(frozen=True)
class _Job:
    """One worker the command runs: its settings, how many processes, and the arguments of ``fabric worker``
    that make a child process run one of them."""

    name: str
    handler: str
    config: WorkerConfig
    processes: int
    args: list[str]
    fallback: str | None = None
    """``MODULE:FUNCTION`` answering while one of its breakers is open (a config file's ``fallback``)."""


def _options(values: dict[str, Any]) -> list[str]:
    """Settings as ``fabric worker`` options again, for a child's command line."""
    args = []
    for name, value in values.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):  # a --NAME/--unNAME switch
            args.append(f"--{flag}" if value else f"--un{flag}")
        else:
            args += (f"--{flag}", str(value))
    return args


def _retention(s: Settings, topics: list[str]) -> dict[str, Retention]:
    return {t: r for t, r in s.config.retention.items() if t in topics}


def _job_from_args(handler: str, topics: list[str] | None, group: str | None, consumer: str,
                   processes: int | None, overrides: dict[str, Any], s: Settings) -> _Job:
    if not topics or not group:
        raise ConfigError("give --topic and --group with HANDLER (or omit HANDLER to run a --config file's "
                          "[workers.NAME] tables)")
    if consumer and (processes or 1) > 1:
        raise ConfigError("--consumer names one process: with --processes each gets a name of its own; drop it")
    config = WorkerConfig(group=group, topics=topics, consumer=consumer, retention=_retention(s, topics), **overrides)
    args = [handler, *(a for t in topics for a in ("--topic", t)), "--group", group, *_options(overrides)]
    return _Job(group[:MAX_WORKER_NAME], handler, config, processes or 1, args)


def _jobs_from_file(path: Path | None, only: list[str], consumer: str, processes: int | None,
                    overrides: dict[str, Any], s: Settings) -> list[_Job]:
    if path is None:
        raise ConfigError("give HANDLER --topic T --group G, or --config FILE with [workers.NAME] tables")
    try:
        specs = s.config.select_workers(only)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    jobs = []
    for name, spec in specs.items():
        try:
            config = spec.worker_config(consumer=consumer, retention=_retention(s, spec.topics), **overrides)
        except FieldError as exc:
            option = f"--{exc.field.replace('_', '-')}"
            where = option if exc.field in overrides else f"{path}: workers.{name}.{exc.field}"
            raise ConfigError(f"{where}: {exc.reason}") from None
        jobs.append(_Job(name, spec.handler, config, processes or spec.processes,
                         ["--only", name, *_options(overrides)], spec.fallback))
    if consumer and sum(j.processes for j in jobs) > 1:
        raise ConfigError("--consumer names one process: these tables run several; drop it")
    return jobs


def _load(ref: str, job: _Job, path: Path | None, field: str) -> tuple[str, HandlerFn]:
    try:
        return load_handler(ref)
    except HandlerLoadError as exc:
        if path is None:
            raise
        raise HandlerLoadError(f"{path}: workers.{job.name}.{field}: {exc}") from None


def _load_handler(job: _Job, path: Path | None) -> tuple[str, HandlerFn, HandlerFn | None]:
    """Import a job's handler and fallback now, so a bad one stops the command before any worker starts."""
    name, fn = _load(job.handler, job, path, "handler")
    fallback = _load(job.fallback, job, path, "fallback")[1] if job.fallback else None
    return name, fn, fallback


def _programs(jobs: list[_Job], url: str, ns: str, common: list[str]) -> list[Program]:
    """Each job as a supervised program: ``fabric worker`` with its arguments, run as a single process. The Redis
    URL goes to the children in their environment, never on a command line, where ``ps`` would show a password."""
    os.environ[URL_ENV] = url

    def argv(job: _Job) -> Callable[[str], list[str]]:
        return lambda consumer: [sys.executable, "-m", "fabric", "worker", *job.args, *common, "--processes", "1",
                                 "--consumer", consumer, "--namespace", ns]

    return [Program(job.name, job.processes, argv(job)) for job in jobs]


@app.command(epilog=example(
    "fabric worker handlers.quotes:mid_price --topic tick --group indicators --concurrency 32",
    "fabric worker handlers.quotes:mid_price --topic tick --group indicators --processes 4",
    "fabric worker --config config/example.toml --only indicators",
))
def worker(
    handler: Annotated[str | None, typer.Argument(
        help="MODULE:FUNCTION of an async handler; omit it to run the --config file's [workers.NAME] tables.")] = None,
    topic: Annotated[list[str] | None, typer.Option(help="Topic to read (repeat for several).")] = None,
    group: Annotated[str | None, typer.Option(help="Consumer group.")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Worker processes (default 1, or each table's `processes`); more than one run under a "
                    "supervisor that restarts any that dies.")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="NAME", help="With --config: run only this [workers.NAME] table (repeat for several).")
    ] = None,
    concurrency: Annotated[int | None, typer.Option(
        help=f"Handler calls in flight.  [default: {DEFAULT_CONCURRENCY}]")] = None,
    max_deliveries: Annotated[int | None, typer.Option(
        help=f"Deliveries before an entry is dead-lettered.  [default: {DEFAULT_MAX_DELIVERIES}]")] = None,
    consumer: Annotated[str, typer.Option(help="Consumer name; default host-pid-random.")] = "",
    output_topic: Annotated[str | None, typer.Option(help="Topic for returned events.")] = None,
    reclaim_idle_ms: Annotated[int | None, typer.Option(
        help=f"Entries idle this long are taken over from a dead worker.  [default: {DEFAULT_RECLAIM_IDLE_MS}]")
    ] = None,
    block_ms: Annotated[int | None, typer.Option(help=f"Longest blocking read.  [default: {DEFAULT_BLOCK_MS}]")] = None,
    grace_s: Annotated[float | None, typer.Option(
        help=f"On SIGTERM, how long in-flight handlers may take.  [default: {DEFAULT_GRACE_S}]")] = None,
    handler_timeout_s: Annotated[float | None, typer.Option(
        help=f"A handler call running longer fails and is retried.  [default: {DEFAULT_HANDLER_TIMEOUT_S}]")] = None,
    ordered: Annotated[bool | None, typer.Option(
        "--ordered/--unordered", help="Ordered mode: each stream has one owner in the group at a time, which "
        "handles its entries one after another.  [default: unordered]")] = None,
    lease_ms: Annotated[int | None, typer.Option(
        help=f"Ordered mode: a dead owner's streams move after this long.  [default: {DEFAULT_LEASE_MS}]")] = None,
    commit_ahead: Annotated[int | None, typer.Option(
        min=0, help="Ordered mode: entries of a stream handled while the commit before is in flight (0: an entry "
        "with outputs committed before the next starts).  [default: 0]")] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
    metrics_port: Annotated[int | None, typer.Option(
        envvar=PORT_ENV, min=0, max=65535, help="Serve /metrics, /healthz and /readyz on this port (0: any free "
        "one); with several processes, the supervisor serves them all on it.  [default: off]")] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics port listens on.")] = ANY_HOST,
    log_format: Annotated[str, typer.Option(envvar=FORMAT_ENV, help="text or json (one object per line).")] = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a worker (or, with --processes or a config file's [workers.NAME] tables, a supervisor of worker
    processes) until SIGTERM/SIGINT, then drain gracefully and exit 0 (a second signal: at once, exit 1)."""
    _logging(verbose, log_format)
    import_modules(imports)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    s = settings(config_file, redis_url, namespace)
    given = dict(concurrency=concurrency, max_deliveries=max_deliveries, output_topic=output_topic,
                 reclaim_idle_ms=reclaim_idle_ms, block_ms=block_ms, grace_s=grace_s,
                 handler_timeout_s=handler_timeout_s, ordered=ordered, lease_ms=lease_ms, commit_ahead=commit_ahead)
    overrides = {name: value for name, value in given.items() if value is not None}
    with reported():
        if handler is None:
            if topic or group:
                raise ConfigError("--topic and --group go with HANDLER; a config file sets them per [workers.NAME]")
            jobs = _jobs_from_file(config_file, only or [], consumer, processes, overrides, s)
        elif only:
            raise ConfigError("--only selects [workers.NAME] tables of a config file: omit HANDLER to use it")
        else:
            jobs = [_job_from_args(handler, topic, group, consumer, processes, overrides, s)]
        handlers = [_load_handler(job, config_file if handler is None else None) for job in jobs]
    if sum(job.processes for job in jobs) == 1:
        _serve(jobs[0], *handlers[0], s, metrics_port, metrics_host)
    common = [*(a for m in imports or () for a in ("--import", m)), *(["-v"] if verbose else []),
              "--log-format", log_format]
    if config_file is not None:
        common += ["--config", str(config_file)]
    graceful = run(lambda url: _supervise(Supervisor(_programs(jobs, url, s.keys.ns, common),
                                                     label_lines=log_format != "json"), metrics_port, metrics_host),
                   s.url)
    if not graceful:
        raise typer.Exit(int(Exit.FAILED))


async def _supervise(supervisor: Supervisor, metrics_port: int | None, metrics_host: str) -> bool:
    """Run the supervisor; with a metrics port, serve its children's metrics there (they write, it serves)."""
    if metrics_port is None:
        return await supervisor.run()
    from fabric.telemetry import supervised

    async with supervised(supervisor, port=metrics_port, host=metrics_host):
        return await supervisor.run()


def _serve(job: _Job, name: str, fn: HandlerFn, fallback: HandlerFn | None, s: Settings,
           metrics_port: int | None, metrics_host: str) -> NoReturn:
    """Run the one worker in this process; exit 0 once drained, 1 if a second signal cut the drain short."""
    from fabric.runner import drain_when_orphaned, serve, tune_gc

    drain_when_orphaned()
    tune_gc()
    graceful = run(lambda url: serve(url, fn, job.config, namespace=s.keys.ns, handler_name=name, fallback=fallback,
                                     metrics_port=metrics_port, metrics_host=metrics_host), s.url)
    raise typer.Exit(int(Exit.OK if graceful else Exit.FAILED))


@app.command(epilog=example("fabric dev", "fabric dev --port 6390"))
def dev(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 6379) -> None:
    """Run a private redis-server in the foreground (no persistence) for other fabric processes to share; Ctrl-C
    stops it and drops its data."""
    with reported():
        if answers("127.0.0.1", port):
            fail(f"a Redis already answers on 127.0.0.1:{port}: use it as is, or pick another --port", Exit.USAGE)
        with redis_server(port) as proc:
            typer.echo(f"redis-server on redis://127.0.0.1:{port}/0 (no persistence); Ctrl-C stops it", err=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                typer.echo("stopped", err=True)
