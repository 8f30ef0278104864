"""Commands over a topic's history: ``tail`` it live, ``replay`` a time range, ``trim`` it now."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from redis.asyncio import Redis

from fabric import history
from fabric.cli.options import (
    ConfigFile,
    Exit,
    Imports,
    Json,
    Namespace,
    RedisUrl,
    Settings,
    app,
    example,
    fail,
    import_modules,
    on_redis,
    reported,
    settings,
)
from fabric.cli.output import emit_json, progress, table, timestamp
from fabric.config import Retention
from fabric.events import Event, event_types
from fabric.handler import load_handler
from fabric.history import Entry, Filters, ReplayResult, StreamTrim, TimeRange
from fabric.keys import Keys, Priority, check_name

__all__ = ["replay", "tail", "trim"]

T = TypeVar("T")

SHORT_FIELDS_CHARS = 100
_ENVELOPE = frozenset({"type", "event_id", "ts_ns", "correlation_id", "causation_id", "producer", "schema_version",
                       "symbol"})

From = Annotated[str | None, typer.Option("--from", help="An entry id (1700000000000-0), Unix ms, an ISO time "
                                                          "(local unless it has an offset) or an age (10m, 1h).")]
Types = Annotated[list[str] | None, typer.Option("--type", help="Only this event type (repeat for several).")]
Symbols = Annotated[list[str] | None, typer.Option("--symbol", help="Only this symbol (repeat for several).")]
Priorities = Annotated[list[str] | None, typer.Option("--priority", help="Only this priority (repeat for several).")]


# ---- shared helpers ----------------------------------------------------------------------------------------


def _usage(check: Callable[[], T]) -> T:
    """``check()``, with a ValueError turned into a usage error (exit 2)."""
    try:
        return check()
    except ValueError as exc:
        fail(str(exc), Exit.USAGE)


def _topic(name: str) -> str:
    return _usage(lambda: check_name("topic", name))


def _filters(types: list[str] | None, symbols: list[str] | None, priorities: list[str] | None) -> Filters:
    known = event_types()
    for name in types or ():
        if name not in known:
            fail(f"unknown event type {name!r} (known: {', '.join(sorted(known))}; --import MODULE for your own)",
                 Exit.USAGE)
    try:
        prios = [Priority.parse(p) for p in priorities or ()]
    except ValueError as exc:
        fail(str(exc), Exit.USAGE)
    return Filters(frozenset(types or ()), frozenset(symbols or ()), frozenset(prios))


def _handler_path() -> None:
    if str(Path.cwd()) not in sys.path:  # MODULE:FUNCTION names a module of the current directory, as for worker
        sys.path.insert(0, str(Path.cwd()))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- tail --------------------------------------------------------------------------------------------------


def _short(event: Event) -> str:
    fields: dict[str, Any] = msgspec.to_builtins(event)
    text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in _ENVELOPE and v not in ("", None))
    return text if len(text) <= SHORT_FIELDS_CHARS else text[: SHORT_FIELDS_CHARS - 1] + "…"


def _line(entry: Entry) -> str:
    ref = entry.stream
    head = f"{timestamp(entry.time_ms)}  {ref.priority.label:<8}  {ref.symbol or '-':<12}  {entry.type:<14}"
    body = _short(entry.event) if entry.event is not None else f"undecodable: {entry.error}"
    return f"{head}  {body}".rstrip()


def _json_line(entry: Entry) -> str:
    doc: dict[str, Any] = {"stream": entry.stream.key, "entry_id": entry.entry_id, "time_ms": entry.time_ms,
                           "priority": entry.stream.priority.label, "type": entry.type}
    if entry.event is None:
        doc["error"] = entry.error
    else:
        doc["event"] = entry.event
    return msgspec.json.encode(doc).decode()


async def _until_interrupted(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``; Ctrl-C ends it quietly (only the main thread receives signals)."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        if task is not None:
            task.cancel()

    watch = threading.current_thread() is threading.main_thread()
    if watch:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await work
    except asyncio.CancelledError:
        if not interrupted or task is None:
            raise
        task.uncancel()
    finally:
        if watch:
            loop.remove_signal_handler(signal.SIGINT)


async def _follow(client: Redis, keys: Keys, topic: str, start: int | str, filters: Filters, limit: int | None,
                  as_json: bool) -> None:
    shown = 0
    async with aclosing(history.tail(client, keys, topic, start=start, filters=filters)) as entries:
        async for entry in entries:
            try:
                typer.echo(_json_line(entry) if as_json else _line(entry))
            except BrokenPipeError:  # the reader went away (| head): done
                return
            shown += 1
            if limit is not None and shown >= limit:
                return


@app.command(epilog=example(
    "fabric tail tick",
    "fabric tail tick --from 10m --symbol BTC/USD --type Tick --json",
    "fabric tail order --from 1700000000000-0 --limit 100",
))
def tail(
    topic: Annotated[str, typer.Argument(help="Topic to follow.")],
    start: From = None,
    types: Types = None,
    symbols: Symbols = None,
    priorities: Priorities = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Exit after this many events.")] = None,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Follow a topic live (or from a time or entry id), decoded, one line per event (JSON lines with --json);
    joins no group; Ctrl-C exits 0."""
    import_modules(imports)
    _topic(topic)
    position = _usage(lambda: history.parse_time(start)) if start else "$"
    filters = _filters(types, symbols, priorities)
    s = settings(config_file, redis_url, namespace)
    on_redis(s.url, lambda c: _until_interrupted(_follow(c, s.keys, topic, position, filters, limit, as_json)))


# ---- replay ------------------------------------------------------------------------------------------------


def _replay_summary(topic: str, target: str, result: ReplayResult) -> str:
    skipped = [f"{n} {what}" for n, what in ((result.duplicates, "already published (duplicates skipped)"),
                                               (result.undecodable, "undecodable skipped"),
                                               (result.rejected, "rejected by the handler")) if n]
    return (f"replayed {result.done} of {result.read} events of {topic} {target}: {result.published} published"
            + "".join(f", {part}" for part in skipped))


def _replay_target(into: str | None, handler: str | None, output_topic: str | None) -> None:
    if (into is None) == (handler is None):
        fail("give exactly one of --into TOPIC (copy the events) or --handler MODULE:FUNCTION", Exit.USAGE)
    if output_topic is not None and handler is None:
        fail("--output-topic goes with --handler (with --into the copies go to that topic)", Exit.USAGE)
    for name in (into, output_topic):
        if name is not None:
            _topic(name)


def _run_replay(s: Settings, topic: str, span: TimeRange, into: str | None, options: dict[str, Any], *,
                quiet: bool) -> ReplayResult:
    with progress(span.span_ms, "replaying", quiet=quiet) as advance:
        async def work(client: Redis) -> ReplayResult:
            if into is not None:
                return await history.replay_into(client, s.keys, topic, span, into, advance=advance, **options)
            return await history.replay_to_handler(client, s.keys, topic, span, advance=advance, **options)

        return on_redis(s.url, work)


@app.command(epilog=example(
    "fabric replay tick --from 1h --into tick_backtest",
    "fabric replay tick --from 2024-05-01T00:00 --to 2024-05-01T01:00 --handler handlers.quotes:mid_price",
))
def replay(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    start: Annotated[str, typer.Option("--from", help="Start: an entry id, Unix ms, an ISO time or an age (1h).")],
    end: Annotated[str | None, typer.Option("--to", help="End (inclusive), as --from; default now.")] = None,
    into: Annotated[str | None, typer.Option(help="Copy the events into this topic.")] = None,
    handler: Annotated[str | None, typer.Option(help="MODULE:FUNCTION to call on each event, in order.")] = None,
    output_topic: Annotated[str | None, typer.Option(help="Topic for the handler's outputs; default: each "
                                                          "event type's own.")] = None,
    rate: Annotated[float | None, typer.Option(min=0.001, help="At most this many events per second.")] = None,
    dedup_window_ms: Annotated[int, typer.Option(min=0, help="Replaying the same range again within this window "
                                                             "publishes nothing twice; 0: off (at least once).")
                               ] = history.DEFAULT_REPLAY_DEDUP_MS,
    types: Types = None,
    symbols: Symbols = None,
    priorities: Priorities = None,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Re-deliver a time range of a topic, in time order, into another topic or to a handler (whose outputs are
    published); a handler failure stops there (exit 6, saying how many were done)."""
    import_modules(imports)
    _topic(topic)
    _replay_target(into, handler, output_topic)
    now = _now_ms()
    span = _usage(lambda: TimeRange.of(history.parse_time(start, now), history.parse_time(end, now) if end else now)
                  ).until(now)  # what is published while it runs is not replayed (nor are its own copies)
    filters = _filters(types, symbols, priorities)
    s = settings(config_file, redis_url, namespace)
    options: dict[str, Any] = {"filters": filters, "publisher": s.config.publisher, "rate": rate,
                               "dedup_window_ms": dedup_window_ms}
    if handler is not None:
        _handler_path()
        with reported():
            options.update(handler=load_handler(handler), output_topic=output_topic)
    result = _run_replay(s, topic, span, into, options, quiet=as_json)
    target = f"into {into}" if handler is None else f"through {handler}"
    if as_json:
        emit_json(result)
    else:
        typer.echo(_replay_summary(topic, target, result))
    if result.stopped_at is not None:
        fail(f"handler {handler} failed on {result.stopped_at} ({result.error}) after handling {result.done} "
             "events, whose outputs are published: fix it and replay again from that entry id (--from ID)",
             Exit.PARTIAL)


# ---- trim --------------------------------------------------------------------------------------------------


def _retention(s: Settings, topics: list[str], max_len: int | None, max_age_ms: int | None) -> dict[str, Retention]:
    configured = s.config.retention
    names = topics or sorted(configured)
    if not names:
        fail("no topic to trim: name one (fabric trim TOPIC --max-len N), or give [retention.TOPIC] in --config",
             Exit.USAGE)
    flags = {k: v for k, v in (("max_len", max_len), ("max_age_ms", max_age_ms)) if v is not None}
    rules = {}
    for name in names:
        _topic(name)
        with reported():
            rule = msgspec.structs.replace(configured.get(name, Retention()), **flags)
        if not (rule.max_len or rule.max_age_ms or rule.hard_max_len):
            fail(f"no retention for topic {name!r}: pass --max-len or --max-age-ms, or set [retention.{name}] in "
                 "the --config file", Exit.USAGE)
        rules[name] = rule
    return rules


def _show_plan(plan: list[StreamTrim]) -> None:
    hard = any(row.drop for row in plan)
    headers = ["stream", "length", "would remove", "held back", *(["drop unacked"] if hard else [])]
    table(headers, [[r.stream, r.length, r.remove, r.held_back, *([r.drop] if hard else [])] for r in plan],
          empty="(no streams)")


def _confirmed(plan: list[StreamTrim], yes: bool) -> bool:
    """Whether to apply: ``--yes``, or a yes at the prompt; refuse (exit 2) without a terminal to ask on."""
    if yes:
        return True
    if not sys.stdin.isatty():
        fail("not applied: stdin is not a terminal to confirm on; pass --yes to apply (or --dry-run for the plan "
             "only)", Exit.USAGE)
    remove = sum(r.remove + r.drop for r in plan)
    return typer.confirm(f"remove {remove} entries from {len(plan)} streams?", err=True)


@app.command(epilog=example(
    "fabric trim tick --max-len 100000 --dry-run",
    "fabric trim --config config/example.toml --yes",
))
def trim(
    topics: Annotated[list[str] | None, typer.Argument(help="Topics; default: those with [retention] in --config.")
                      ] = None,
    max_len: Annotated[int | None, typer.Option(min=0, help="Keep at most this many entries per stream.")] = None,
    max_age_ms: Annotated[int | None, typer.Option(min=0, help="Keep entries younger than this.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
) -> None:
    """Apply retention now: print the plan (per stream: length, what would go, what groups still need), then trim
    after confirmation. Entries a group has not acknowledged are kept (only hard_max_len drops them)."""
    s = settings(config_file, redis_url, namespace)
    rules = _retention(s, topics or [], max_len, max_age_ms)
    plan = on_redis(s.url, lambda c: history.trim_plan(c, s.keys, rules, missing_ok=not topics))
    pending = any(r.remove or r.drop for r in plan)
    if not as_json:
        _show_plan(plan)
    if dry_run or not pending:
        if as_json:
            emit_json(plan)
        elif not pending:
            typer.echo("nothing to trim")
        return
    if not _confirmed(plan, yes):
        if as_json:
            emit_json(plan)
        typer.echo("not applied: nothing removed", err=True)
        raise typer.Exit(int(Exit.FAILED))
    with progress(len(plan), "trimming", quiet=as_json) as advance:
        done = on_redis(s.url, lambda c: history.trim_now(c, s.keys, plan, rules, advance=advance))
    if as_json:
        emit_json(done)
        return
    removed, dropped = sum(r.removed or 0 for r in done), sum(r.dropped or 0 for r in done)
    held = sum(r.held_back for r in plan)
    typer.echo(f"removed {removed} entries from {len(done)} streams" + (f"; kept {held} a group still needs"
               if held else "") + (f"; the hard cap dropped {dropped} unacknowledged" if dropped else ""))
