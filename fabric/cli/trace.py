"""``fabric trace CORRELATION_ID``: one correlation's events as a tree of causes, with each hop's latency."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from fabric import trace as tracing
from fabric.cli.options import (
    ConfigFile,
    Exit,
    Imports,
    Json,
    Namespace,
    RedisUrl,
    app,
    example,
    fail,
    import_modules,
    on_redis,
    settings,
)
from fabric.cli.output import emit_json
from fabric.history import parse_time
from fabric.keys import check_name
from fabric.trace import Hop, Trace

__all__ = ["trace"]

INDENT = "  "
_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


def duration(ns: int | None) -> str:
    """Nanoseconds, short: ``840ns``, ``412µs``, ``3.25ms``, ``1.50s``; ``-`` for None."""
    if ns is None:
        return "-"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{ns // 1_000}µs"
    if ns < 1_000_000_000:
        return f"{sign}{ns / 1_000_000:.2f}ms"
    return f"{sign}{ns / 1_000_000_000:.2f}s"


def _line(hop: Hop) -> str:
    latency = "root" if hop.depth == 0 and not hop.causation_id else f"+{duration(hop.latency_ns)}"
    if hop.latency_ns is None and hop.causation_id:
        latency = "?"  # its cause was not read (outside the window, trimmed, or on a topic not searched)
    return f"{INDENT * hop.depth}{latency}  {hop.topic}  {hop.type}  {hop.symbol or '-'}  {hop.event_id}"


def _total(t: Trace) -> str:
    if t.total_ns is None:
        return (f"end to end: unknown (the root event {t.correlation_id} was not read: it is older than the window, "
                "trimmed, or on a topic not searched)")
    depth = max(h.depth for h in t.hops)
    return (f"end to end: {duration(t.total_ns)} over {len(t.hops)} events, {depth} hops deep "
            f"(Redis's clock: {t.total_gap_ms} ms)")


def _show(t: Trace) -> None:
    for hop in t.hops:
        typer.echo(_line(hop))
    typer.echo(_total(t))
    if t.undecodable:
        typer.echo(f"({t.undecodable} entries holding the id could not be decoded: --import their event types?)")


def _since(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        at = parse_time(text)
    except ValueError as exc:
        fail(str(exc), Exit.USAGE)
    return int(at.partition("-")[0]) if isinstance(at, str) else at


def _checked(correlation_id: str, topics: list[str]) -> None:
    if not _ID.match(correlation_id):
        fail(f"invalid correlation id {correlation_id!r}: give an event_id (32 hex digits, as in the worker's "
             "logs and in `fabric tail --json`)", Exit.USAGE)
    for topic in topics:
        try:
            check_name("topic", topic)
        except ValueError as exc:
            fail(str(exc), Exit.USAGE)


@app.command(epilog=example(
    "fabric trace 0190f3a2b4c5d6e7f8091a2b3c4d5e6f",
    "fabric trace 0190f3a2b4c5d6e7f8091a2b3c4d5e6f --since 6h --topic tick --topic bar --topic signal",
    "fabric trace 0190f3a2b4c5d6e7f8091a2b3c4d5e6f --json",
))
def trace(
    correlation_id: Annotated[str, typer.Argument(help="The event_id of the event that started the chain.")],
    topics: Annotated[list[str] | None, typer.Option("--topic", metavar="TOPIC",
                                                     help="Search only this topic (repeat; default: all).")] = None,
    since: Annotated[str | None, typer.Option(help="Read entries written since: an age (6h), Unix ms, an ISO time "
                                                   "or an entry id; default: the last hour.")] = None,
    max_entries: Annotated[int, typer.Option(min=1, help="Stop after reading this many entries (said so when it "
                                                         "happens).")] = tracing.DEFAULT_MAX_ENTRIES,
    as_json: Json = False,
    redis_url: RedisUrl = None,
    namespace: Namespace = None,
    config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Show the events of one correlation id (tick -> bar -> ... -> portfolio update) as a tree of causes, each
    with its hop's latency (its ts_ns minus its cause's), read back from the streams without joining a group."""
    import_modules(imports)
    _checked(correlation_id, topics or [])
    since_ms = _since(since)
    s = settings(config_file, redis_url, namespace)
    found = on_redis(s.url, lambda c: tracing.trace(c, s.keys, correlation_id, topics=topics or (),
                                                    since_ms=since_ms, max_entries=max_entries))
    if as_json:
        emit_json(found)
    else:
        _show(found)
    if found.truncated:
        fail(f"the scan stopped at {found.scanned:,} entries (--max-entries) with entries left unread: events may be "
             "missing; raise --max-entries, or narrow --since or --topic", Exit.PARTIAL)
