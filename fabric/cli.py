"""The ``fabric`` command: thin verbs that parse, call one library function, and map errors to one line.

Exit codes: 0 success, 1 a fabric error (the line says what and how to fix it), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer

from fabric.client import connect, translated
from fabric.config import FabricConfig, PublisherConfig, WorkerConfig, load_config
from fabric.errors import ConfigError, FabricError
from fabric.events import Event, event_type, event_types
from fabric.handler import load_handler
from fabric.keys import Keys, Priority, check_name
from fabric.publisher import Publisher

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fabric: typed events on Redis Streams.")

RedisUrl = Annotated[str | None, typer.Option("--redis-url", envvar="FABRIC_REDIS_URL",
                                              help="redis://[:password@]host:port/db")]
Namespace = Annotated[str | None, typer.Option("--namespace", envvar="FABRIC_NAMESPACE",
                                                help="Key prefix (default: the config file's, else fabric).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", envvar="FABRIC_CONFIG",
                                                 help="A config/*.toml: Redis URL, namespace, publisher, retention.")]
Imports = Annotated[list[str] | None, typer.Option("--import", help="Import a module that defines event types.")]
PUBLISH_CHUNK = 1_000


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _import(modules: list[str] | None) -> None:
    for name in modules or ():
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module may fail in any way while it runs; say which and why
            _fail(f"cannot import {name!r} ({type(exc).__name__}: {exc}): check the module, and PYTHONPATH")


def _settings(path: Path | None, redis_url: str | None, namespace: str | None) -> tuple[FabricConfig, str | None, str]:
    """The config file (or defaults), with the command line's URL and namespace taking precedence."""
    config = load_config(path) if path else FabricConfig()
    ns = namespace or config.namespace
    try:
        check_name("namespace", ns)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config, redis_url or config.redis_url, ns


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


def _events(lines: Iterator[str], bad: list[str]) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for number, line in enumerate(lines, 1):
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


async def _publish(url: str | None, ns: str, config: PublisherConfig, topic: str | None,
                   priority: Priority | None, lines: Iterator[str], bad: list[str]) -> tuple[int, int]:
    client = connect(url)
    published = duplicates = 0
    try:
        with translated(url):
            await client.ping()
            async with Publisher(client, config, Keys(ns)) as pub:
                for chunk in _events(lines, bad):
                    ids = await pub.publish_many(chunk, topic, priority)
                    published += sum(1 for i in ids if i is not None)
                    duplicates += sum(1 for i in ids if i is None)
    finally:
        await client.aclose()
    return published, duplicates


@app.command()
def publish(
    topic: Annotated[str | None, typer.Option(help="Topic; default: each event type's own.")] = None,
    priority: Annotated[str | None, typer.Option(help="low, normal, high or critical.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON lines; default stdin.")] = None,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Publish events given as JSON lines (each with a "type" field); bad lines are reported by number."""
    _import(imports)
    try:
        prio = Priority.parse(priority) if priority else None
        settings, redis_url, ns = _settings(config_file, redis_url, namespace)
    except (ValueError, ConfigError) as exc:
        _fail(str(exc))
    bad: list[str] = []
    try:
        stream = file.open() if file else sys.stdin
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}")
    try:
        with stream:
            published, dups = asyncio.run(
                _publish(redis_url, ns, settings.publisher, topic, prio, iter(stream), bad)
            )
    except FabricError as exc:
        _fail(str(exc))
    typer.echo(f"published {published} events" + (f" ({dups} duplicates skipped)" if dups else "")
               + (f"; {len(bad)} bad lines not published" if bad else ""))
    if bad:
        raise typer.Exit(1)


@app.command()
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
    from fabric.runner import run_worker

    _logging(verbose)
    _import(imports)
    sys.path.insert(0, str(Path.cwd()))
    try:
        settings, redis_url, ns = _settings(config_file, redis_url, namespace)
        config = WorkerConfig(
            group=group, topics=topic, consumer=consumer, concurrency=concurrency,
            max_deliveries=max_deliveries, output_topic=output_topic, reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms, grace_s=grace_s, handler_timeout_s=handler_timeout_s,
            retention={t: r for t, r in settings.retention.items() if t in topic},
        )
        name, fn = load_handler(handler)
        graceful = run_worker(redis_url, fn, config, namespace=ns, handler_name=name)
    except FabricError as exc:
        _fail(str(exc))
    if not graceful:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
