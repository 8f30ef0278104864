"""``fabric dlq list | show | replay | purge``: dead letters, their errors, and sending them back.

A dead letter is named ``TAG/ENTRY_ID`` (``{BTC/USD}/1700000000000-0``), as ``list`` prints it and ``show`` takes it.
Every command reads the Redis it is given (no private Redis: an empty one would only say there is nothing).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
import typer

from fabric.cli.options import (
    ConfigFile,
    Exit,
    Imports,
    Json,
    Namespace,
    RedisUrl,
    dlq_app,
    example,
    fail,
    import_modules,
    on_redis,
    settings,
)
from fabric.cli.output import age, emit_json, progress, table, timestamp
from fabric.deadletter import (
    DeadLetter,
    DeadLetterFilter,
    PurgeReport,
    ReplayReport,
    find,
    get,
    original_event,
    purge_many,
    replay_many,
    server_time_ms,
)
from fabric.errors import DecodeError
from fabric.keys import Keys

__all__ = ["list_letters", "purge", "replay", "show"]

T = TypeVar("T")

ERROR_CHARS = 40
"""How much of an error message a table shows (JSON has all of it)."""

Topic = Annotated[str | None, typer.Option(metavar="TOPIC", help="Only dead letters from this topic's streams.")]
Stream = Annotated[str | None, typer.Option(metavar="KEY",
                                            help="Only dead letters from this stream key (ns:s:TOPIC:PRIORITY:TAG).")]
EventType = Annotated[str | None, typer.Option("--type", metavar="TYPE",
                                               help="Only dead letters of this event type (e.g. Tick).")]
ErrorText = Annotated[str | None, typer.Option("--error", metavar="TEXT",
                                               help="Only those whose error type or message contains TEXT (any case).")]
OlderThan = Annotated[int | None, typer.Option(min=0, metavar="N", help="Only those dead-lettered at least N ms ago.")]
NewerThan = Annotated[int | None, typer.Option(min=0, metavar="N", help="Only those dead-lettered at most N ms ago.")]
Group = Annotated[str | None, typer.Option(metavar="GROUP", help="Only those this group gave up on.")]
Limit = Annotated[int | None, typer.Option(min=1, metavar="N",
                                           help="At most N dead letters (default: every one that matches).")]


def _filter(topic: str | None, stream: str | None, event_type: str | None, error: str | None,
            older_than_ms: int | None, newer_than_ms: int | None, group: str | None) -> DeadLetterFilter:
    try:
        return DeadLetterFilter(topic=topic, stream=stream, event_type=event_type, error=error,
                                min_age_ms=older_than_ms, max_age_ms=newer_than_ms, group=group)
    except ValueError as exc:
        fail(f"bad filter: {exc}", Exit.USAGE)


def _summary(letter: DeadLetter, now_ms: int) -> dict[str, Any]:
    return {
        "id": letter.ref, "dlq": letter.dlq, "entry_id": letter.id, "origin_stream": letter.origin_stream,
        "origin_id": letter.origin_id, "type": letter.event_type, "group": letter.group,
        "consumer": letter.consumer, "handler": letter.handler, "error_type": letter.error_type,
        "error": letter.error, "deliveries": letter.deliveries, "first_failure_ms": letter.first_failure_ms,
        "last_failure_ms": letter.last_failure_ms, "dead_at_ms": letter.dead_ms,
        "age_ms": max(0, now_ms - letter.dead_ms), "origin_missing": letter.origin_missing,
    }


def _short(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


@dlq_app.command("list", epilog=example("fabric dlq list", "fabric dlq list --topic tick --error timeout --json"))
def list_letters(
    topic: Topic = None, stream: Stream = None, event_type: EventType = None, error: ErrorText = None,
    older_than_ms: OlderThan = None, newer_than_ms: NewerThan = None, group: Group = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="At most N dead letters.")] = 50,
    json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None, config_file: ConfigFile = None,
) -> None:
    """List dead letters and their errors, by dead-letter stream, oldest first within each."""
    s = settings(config_file, redis_url, namespace)
    flt = _filter(topic, stream, event_type, error, older_than_ms, newer_than_ms, group)

    async def work(client: Any) -> tuple[int, list[DeadLetter]]:
        now = await server_time_ms(client)
        return now, await find(client, s.keys, flt, limit=limit + 1, now_ms=now)

    now, letters = on_redis(s.url, work)
    more, letters = len(letters) > limit, letters[:limit]
    if json:
        emit_json([_summary(letter, now) for letter in letters])
    else:
        table(["id", "origin stream", "type", "group", "handler", "error type", "error", "deliveries", "age"],
              [[x.ref, x.origin_stream, x.event_type or "-", x.group, x.handler, x.error_type, _short(x.error),
                x.deliveries, age(now - x.dead_ms)] for x in letters], empty="(no dead letters)")
    if more:
        typer.echo(f"showing the first {limit}; more match: --limit N shows more, filters narrow", err=True)


def _decoded(letter: DeadLetter) -> tuple[dict[str, Any] | None, str | None]:
    """The original event as plain data, or None and why it cannot be decoded."""
    if letter.origin_missing:
        return None, "the entry had been trimmed from its stream before it was dead-lettered: nothing was kept"
    try:
        event: dict[str, Any] = msgspec.to_builtins(original_event(letter))
        return event, None
    except DecodeError as exc:
        return None, exc.reason


def _show_text(letter: DeadLetter, now_ms: int) -> None:
    event, why = _decoded(letter)
    rows = [("id", letter.ref), ("dead-letter stream", letter.dlq), ("origin stream", letter.origin_stream),
            ("origin entry", letter.origin_id), ("group", letter.group), ("consumer", letter.consumer),
            ("handler", letter.handler), ("error type", letter.error_type), ("error", letter.error),
            ("deliveries", str(letter.deliveries)), ("first failure", timestamp(letter.first_failure_ms)),
            ("last failure", timestamp(letter.last_failure_ms)),
            ("dead-lettered", f"{timestamp(letter.dead_ms)} ({age(now_ms - letter.dead_ms)} ago)")]
    if event is not None:
        rows.append(("event", msgspec.json.encode(event).decode()))
    else:
        rows.append(("event", f"cannot be decoded: {why}"))
        rows += ((f"field {name}", repr(value)) for name, value in letter.fields.items())
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name.ljust(width)}  {value}")


@dlq_app.command(epilog=example("fabric dlq show '{BTC/USD}/1700000000000-0'",
                                "fabric dlq show '{BTC/USD}/1700000000000-0' --json --import myapp.events"))
def show(
    dead_letter: Annotated[str, typer.Argument(metavar="ID", help="TAG/ENTRY_ID, as `fabric dlq list` prints it.")],
    json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None, config_file: ConfigFile = None,
    imports: Imports = None,
) -> None:
    """Show one dead letter: its error, its origin, and the original event decoded (else its raw fields, and why).

    An unknown ID exits 5. In JSON, original_fields are base64."""
    import_modules(imports)
    s = settings(config_file, redis_url, namespace)

    async def work(client: Any) -> tuple[int, DeadLetter]:
        try:
            letter = await get(client, s.keys, dead_letter)
        except ValueError as exc:
            fail(str(exc), Exit.USAGE)
        return await server_time_ms(client), letter

    now, letter = on_redis(s.url, work)
    if json:
        event, why = _decoded(letter)
        emit_json({**_summary(letter, now), "event": event, "decode_error": why, "original_fields": letter.fields})
    else:
        _show_text(letter, now)


def _letters(n: int) -> str:
    return f"{n} dead letter" + ("" if n == 1 else "s")


def _replay_line(report: ReplayReport) -> str:
    if report.dry_run:
        return f"would replay {_letters(report.matched - report.no_original)} (dry run: nothing changed)"
    return f"replayed {_letters(report.replayed)} to their origin streams; {report.gone} already replayed or purged"


@dlq_app.command(epilog=example("fabric dlq replay --topic tick --error timeout --rate 50",
                                "fabric dlq replay --group indicators --older-than-ms 60000 --dry-run --json"))
def replay(
    topic: Topic = None, stream: Stream = None, event_type: EventType = None, error: ErrorText = None,
    older_than_ms: OlderThan = None, newer_than_ms: NewerThan = None, group: Group = None, limit: Limit = None,
    rate: Annotated[float, typer.Option(min=0, metavar="N", help="At most N replays a second (0: no limit).")] = 100,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be replayed; change nothing.")] = False,
    json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None, config_file: ConfigFile = None,
) -> None:
    """Put matching dead letters back on their origin streams, for their own group only; each is replayed once,
    however often this runs (exit 6 when some kept nothing to replay)."""
    s = settings(config_file, redis_url, namespace)
    flt = _filter(topic, stream, event_type, error, older_than_ms, newer_than_ms, group)

    async def work(client: Any) -> ReplayReport:
        letters = await find(client, s.keys, flt, limit=limit)
        with progress(len(letters), "replaying", quiet=json or dry_run) as advance:
            return await replay_many(client, letters, rate_per_s=rate, dry_run=dry_run, advance=advance)

    report = on_redis(s.url, work)
    if json:
        emit_json(report)
    else:
        typer.echo(_replay_line(report))
    if report.no_original:
        fail(f"{_letters(report.no_original)} kept no original entry (it was trimmed before it was dead-lettered) and "
             "cannot be replayed: `fabric dlq purge` removes them", Exit.PARTIAL)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _purge(keys: Keys, flt: DeadLetterFilter, limit: int | None, yes: bool) -> Callable[[Any], Awaitable[Any]]:
    async def work(client: Any) -> PurgeReport | None:
        letters = await find(client, keys, flt, limit=limit)
        if letters and not yes and not typer.confirm(f"Purge {_letters(len(letters))} for good?", err=True):
            return None
        return await purge_many(client, letters)

    return work


@dlq_app.command(epilog=example("fabric dlq purge --topic tick --older-than-ms 604800000",
                                "fabric dlq purge --error Reject --yes --json"))
def purge(
    topic: Topic = None, stream: Stream = None, event_type: EventType = None, error: ErrorText = None,
    older_than_ms: OlderThan = None, newer_than_ms: NewerThan = None, group: Group = None, limit: Limit = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Purge without asking.")] = False,
    json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None, config_file: ConfigFile = None,
) -> None:
    """Delete matching dead letters for good, after a confirmation that says how many (--yes: no prompt, needed
    when stdin is not a terminal)."""
    if not yes and not _stdin_is_terminal():
        fail("stdin is not a terminal, so purge cannot ask for confirmation: pass --yes to purge without a prompt",
             Exit.USAGE)
    s = settings(config_file, redis_url, namespace)
    flt = _filter(topic, stream, event_type, error, older_than_ms, newer_than_ms, group)
    report = on_redis(s.url, _purge(s.keys, flt, limit, yes))
    if report is None:
        fail("purge cancelled: nothing deleted", Exit.FAILED)
    if json:
        emit_json(report)
    else:
        typer.echo(f"purged {_letters(report.purged)}" + (f"; {report.gone} already gone" if report.gone else ""))
