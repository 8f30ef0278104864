"""Commands that run things: ``publish`` events, a ``worker``, a ``dev`` Redis to share."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from fabric.cli.options import (
    ConfigFile,
    Exit,
    Imports,
    Namespace,
    RedisUrl,
    app,
    example,
    fail,
    import_modules,
    reported,
    run,
    settings,
)
from fabric.cli.output import progress
from fabric.client import connect, translated
from fabric.config import PublisherConfig, WorkerConfig
from fabric.embedded import answers, redis_server
from fabric.events import Event, event_type, event_types
from fabric.handler import load_handler
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher

__all__ = ["dev", "publish", "worker"]

PUBLISH_CHUNK = 1_000


def _parse_line(line: str) -> Event:
    try:
        raw: Any = msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
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


def _events(lines: Iterator[str], bad: list[str], advance: Callable[[int], None]) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for number, line in enumerate(lines, 1):
        advance(len(line))
        if not line.strip():
            continue
        try:
            chunk.append(_parse_line(line))
        except ValueError as exc:
            bad.append(f"line {number}: {exc}")
            typer.echo(f"error: line {number}: {exc}", err=True)
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
        chunks = _events(iter(stream), bad, advance)
        published, dups = run(lambda url: _publish(url, s.keys, s.config.publisher, topic, prio, chunks), s.url)
    typer.echo(f"published {published} events" + (f" ({dups} duplicates skipped)" if dups else "")
               + (f"; {len(bad)} bad lines not published" if bad else ""))
    if bad:
        raise typer.Exit(int(Exit.PARTIAL))


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command(epilog=example(
    "fabric worker handlers.quotes:mid_price --topic tick --group indicators --concurrency 32",
))
def worker(
    handler: Annotated[str, typer.Argument(help="MODULE:FUNCTION of an async handler.")],
    topic: Annotated[list[str], typer.Option(help="Topic to read (repeat for several).")],
    group: Annotated[str, typer.Option(help="Consumer group.")],
    concurrency: int = 32,
    max_deliveries: int = 5,
    consumer: Annotated[str, typer.Option(help="Consumer name; default host-pid-random.")] = "",
    output_topic: Annotated[str | None, typer.Option(help="Topic for returned events.")] = None,
    reclaim_idle_ms: int = 5_000,
    block_ms: int = 1_000,
    grace_s: float = 10.0,
    handler_timeout_s: float | None = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a worker until SIGTERM/SIGINT, then drain gracefully and exit 0 (a second signal: at once, exit 1)."""
    from fabric.runner import serve, tune_gc

    _logging(verbose)
    import_modules(imports)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    s = settings(config_file, redis_url, namespace)
    with reported():
        config = WorkerConfig(
            group=group, topics=topic, consumer=consumer, concurrency=concurrency,
            max_deliveries=max_deliveries, output_topic=output_topic, reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms, grace_s=grace_s, handler_timeout_s=handler_timeout_s,
            retention={t: r for t, r in s.config.retention.items() if t in topic},
        )
        name, fn = load_handler(handler)
    tune_gc()
    graceful = run(lambda url: serve(url, fn, config, namespace=s.keys.ns, handler_name=name), s.url)
    if not graceful:
        raise typer.Exit(int(Exit.FAILED))


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
