"""``fabric tail | replay | trim`` through typer's test runner against the session's redis-server: what they
print (every ``--json`` output parsed and checked), what they change in Redis, and their exit codes."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import msgspec
import pytest
from typer.testing import Result

from fabric import Publisher
from fabric.cli.options import Exit
from fabric.codec import decode_fields, encode
from fabric.events import Bar, Event, Indicator, Tick
from fabric.history import derived_id
from fabric.keys import Keys, Priority
from tests.cli_runner import invoke as fabric
from tests.cli_runner import with_redis
from tests.waiting import eventually

pytestmark = pytest.mark.real_only

T = TypeVar("T")
DEADLINE_S = 30.0


def json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return [msgspec.json.decode(line) for line in result.stdout.splitlines()]


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return msgspec.json.decode(result.stdout)


def one_error_line(result: Result, code: int, *words: str) -> str:
    """Exit ``code``, one ``error:`` line (the last on stderr) naming every word, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def tick(symbol: str, bid: float = 1.0) -> Tick:
    return Tick(symbol=symbol, bid=bid, ask=bid + 1)


def publish(url: str, keys: Keys, events: list[Event], topic: str = "tick", priority: str | None = None) -> None:
    async def work(client: Any) -> None:
        async with Publisher(client, keys=keys) as pub:
            await pub.publish_many(events, topic, priority)

    with_redis(url, work)


def put(url: str, keys: Keys, event: Event, entry_id: str, topic: str = "tick") -> None:
    """XADD an event under a chosen entry id (a chosen time) and register its stream."""
    stream = keys.stream(topic, Priority.NORMAL, event.symbol)
    enc = encode(event)

    async def work(client: Any) -> None:
        await client.xadd(stream, {"type": enc.type, "v": "1", "enc": enc.enc, "data": enc.data}, id=entry_id)
        await client.sadd(keys.topic_registry(topic), stream)

    with_redis(url, work)


def events_of(url: str, keys: Keys, topic: str) -> dict[str, list[Event]]:
    """Every stream of a topic → its events in order."""

    async def work(client: Any) -> dict[str, list[Event]]:
        streams = sorted(s.decode() for s in await client.smembers(keys.topic_registry(topic)))
        return {s: [decode_fields(f) for _, f in await client.xrange(s)] for s in streams}

    return with_redis(url, work)


# ---- tail ----------------------------------------------------------------------------------------------------


def test_tail_from_the_start_prints_each_event_as_a_json_line_in_order_per_stream(redis_url, keys) -> None:
    # given three ticks on A and two on B
    a, b = [tick("A", n) for n in (1, 2, 3)], [tick("B", n) for n in (4, 5)]
    publish(redis_url, keys, a + b)
    # when tailed from the start with --limit 5 --json
    lines = json_lines(fabric(redis_url, keys, "tail", "tick", "--from", "0", "--limit", "5", "--json"))
    # then there is one object per event: its stream and entry id and the decoded event, in order per stream
    assert len(lines) == 5
    for symbol, sent in (("A", a), ("B", b)):
        mine = [line for line in lines if line["event"]["symbol"] == symbol]
        assert [line["event"]["event_id"] for line in mine] == [e.event_id for e in sent]
        assert {line["stream"] for line in mine} == {keys.stream("tick", Priority.NORMAL, symbol)}
        assert [line["entry_id"] for line in mine] == sorted((line["entry_id"] for line in mine),
                                                             key=lambda i: tuple(map(int, i.split("-"))))
    assert all(line["type"] == line["event"]["type"] == "Tick" and line["priority"] == "normal" for line in lines)
    assert all(line["time_ms"] == int(line["entry_id"].split("-")[0]) for line in lines)
    assert [line["event"]["bid"] for line in lines if line["event"]["symbol"] == "A"] == [1.0, 2.0, 3.0]


def test_tail_prints_one_readable_line_per_event(redis_url, keys) -> None:
    publish(redis_url, keys, [tick("BTC/USD", 100.0)])
    result = fabric(redis_url, keys, "tail", "tick", "--from", "0", "--limit", "1")
    assert result.exit_code == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert "normal" in line and "BTC/USD" in line and "Tick" in line and "bid=100.0" in line


def test_tail_filters_by_type_and_symbol(redis_url, keys) -> None:
    # given ticks and a bar on A, and a tick on B
    bar = Bar(symbol="A", timeframe="1m", start_ns=0, open=1, high=2, low=0, close=1)
    publish(redis_url, keys, [tick("A", 1), bar, tick("B", 2), tick("A", 3)])
    # when tailed for ticks of A only
    lines = json_lines(fabric(redis_url, keys, "tail", "tick", "--from", "0", "--type", "Tick", "--symbol", "A",
                              "--limit", "2", "--json"))
    # then only those come
    assert [(line["event"]["type"], line["event"]["symbol"], line["event"]["bid"]) for line in lines] == [
        ("Tick", "A", 1.0), ("Tick", "A", 3.0)]


def test_tail_from_a_time_starts_there(redis_url, keys) -> None:
    # given entries at known times
    for entry_id, bid in (("1000-0", 1.0), ("2000-0", 2.0), ("3000-0", 3.0)):
        put(redis_url, keys, tick("A", bid), entry_id)
    # when tailed from 2000 (ms), and from an ISO time for 3000 ms
    from_ms = json_lines(fabric(redis_url, keys, "tail", "tick", "--from", "2000", "--limit", "2", "--json"))
    from_iso = json_lines(fabric(redis_url, keys, "tail", "tick", "--from", "1970-01-01T00:00:03+00:00",
                                 "--limit", "1", "--json"))
    # then each starts at its time
    assert [line["entry_id"] for line in from_ms] == ["2000-0", "3000-0"]
    assert [line["event"]["bid"] for line in from_iso] == [3.0]


async def xread_blocked(client: Any) -> bool:
    return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await client.client_list())


def test_tail_follows_live_events_only_by_default(redis_url, keys) -> None:
    # given an old tick, and a tail started (in a thread) for the next two events
    publish(redis_url, keys, [tick("A", 1.0)])
    results: list[Result] = []
    tailing = threading.Thread(target=lambda: results.append(
        fabric(redis_url, keys, "tail", "tick", "--limit", "2", "--json")))
    tailing.start()
    try:
        with_redis(redis_url, lambda c: eventually(lambda: xread_blocked(c), what="the tail blocked in XREAD"))
        # when two ticks are published after it started, one of them for a new symbol
        publish(redis_url, keys, [tick("A", 2.0), tick("NEW", 3.0)])
    finally:
        tailing.join(DEADLINE_S)
    # then it printed those two and not the old one, and exited 0
    assert not tailing.is_alive() and results
    lines = json_lines(results[0])
    assert sorted((line["event"]["symbol"], line["event"]["bid"]) for line in lines) == [("A", 2.0), ("NEW", 3.0)]


def test_tail_of_an_unknown_topic_exits_5(redis_url, keys) -> None:
    one_error_line(fabric(redis_url, keys, "tail", "nosuch", "--limit", "1"), Exit.NOT_FOUND, "nosuch")


def test_tail_with_an_unreadable_from_exits_2_naming_the_forms(redis_url, keys) -> None:
    one_error_line(fabric(redis_url, keys, "tail", "tick", "--from", "yesterday"), Exit.USAGE, "yesterday", "10m")


# ---- replay --------------------------------------------------------------------------------------------------


def test_replay_into_another_topic_copies_the_range(redis_url, keys) -> None:
    # given ticks of two symbols, one at high priority
    ticks = [tick("A", 1.0), tick("B", 2.0)]
    urgent = [tick("A", 3.0)]
    publish(redis_url, keys, ticks)
    publish(redis_url, keys, urgent, priority="high")
    # when the last hour is replayed into another topic, with --json
    report = as_json(fabric(redis_url, keys, "replay", "tick", "--from", "1h", "--into", "copy", "--json"))
    # then the counts say three, and the new topic's streams hold the same events (ids derived from the originals)
    assert {k: report[k] for k in ("read", "done", "published", "duplicates", "undecodable")} == {
        "read": 3, "done": 3, "published": 3, "duplicates": 0, "undecodable": 0}
    assert report["stopped_at"] is None
    copies = events_of(redis_url, keys, "copy")
    assert set(copies) == {keys.stream("copy", Priority.NORMAL, "A"), keys.stream("copy", Priority.NORMAL, "B"),
                           keys.stream("copy", Priority.HIGH, "A")}
    expected = {derived_id(e.event_id, "copy"): e for e in ticks + urgent}
    for events in copies.values():
        for copy in events:
            assert msgspec.structs.replace(expected.pop(copy.event_id), event_id=copy.event_id) == copy
    assert not expected


def test_replay_twice_into_the_same_topic_publishes_nothing_the_second_time(redis_url, keys) -> None:
    publish(redis_url, keys, [tick("A"), tick("B")])
    fabric(redis_url, keys, "replay", "tick", "--from", "1h", "--into", "copy")
    again = fabric(redis_url, keys, "replay", "tick", "--from", "1h", "--into", "copy")
    assert again.exit_code == 0, again.stderr
    assert "0 published" in again.stdout and "2 already published" in again.stdout
    assert sum(len(v) for v in events_of(redis_url, keys, "copy").values()) == 2


async def mid_price(event: Tick) -> Indicator:
    """The handler the replay tests call (``tests.test_cli_history:mid_price``)."""
    return Indicator(symbol=event.symbol, name="mid", value=(event.bid + event.ask) / 2)


async def fails_on_negative(event: Tick) -> Indicator:
    if event.bid < 0:
        raise ValueError(f"negative bid {event.bid}")
    return await mid_price(event)


def test_replay_to_a_handler_publishes_its_outputs(redis_url, keys) -> None:
    # given two ticks
    ticks = [tick("A", 1.0), tick("B", 3.0)]
    publish(redis_url, keys, ticks)
    # when replayed through a handler into an output topic
    report = as_json(fabric(redis_url, keys, "replay", "tick", "--from", "1h", "--handler",
                            "tests.test_cli_history:mid_price", "--output-topic", "mids", "--json"))
    # then each tick's indicator is published there, caused by it
    assert (report["read"], report["done"], report["published"], report["stopped_at"]) == (2, 2, 2, None)
    outputs = [e for events in events_of(redis_url, keys, "mids").values() for e in events]
    assert sorted((o.causation_id, o.value) for o in outputs if isinstance(o, Indicator)) == sorted(
        (t.event_id, t.bid + 0.5) for t in ticks)
    assert {o.producer for o in outputs} == {"tests.test_cli_history:mid_price"}


def test_replay_to_a_failing_handler_stops_there_and_exits_6(redis_url, keys) -> None:
    # given three ticks at known times, the second of which the handler fails on
    for entry_id, bid in (("1000-0", 1.0), ("2000-0", -1.0), ("3000-0", 2.0)):
        put(redis_url, keys, tick("A", bid), entry_id)
    # when replayed
    result = fabric(redis_url, keys, "replay", "tick", "--from", "0", "--handler",
                    "tests.test_cli_history:fails_on_negative", "--output-topic", "mids")
    # then it exits 6 naming the entry, the error and how many were done; the first one's output is published
    stream = keys.stream("tick", Priority.NORMAL, "A")
    one_error_line(result, Exit.PARTIAL, f"{stream} 2000-0", "ValueError: negative bid -1.0", "after handling 1 events")
    assert "replayed 1 of 2 events" in result.stdout
    assert [len(v) for v in events_of(redis_url, keys, "mids").values()] == [1]


def test_replay_needs_exactly_one_of_into_and_handler(redis_url, keys) -> None:
    publish(redis_url, keys, [tick("A")])
    one_error_line(fabric(redis_url, keys, "replay", "tick", "--from", "1h"), Exit.USAGE, "--into", "--handler")
    one_error_line(fabric(redis_url, keys, "replay", "tick", "--from", "1h", "--into", "x", "--handler", "m:f"),
                   Exit.USAGE, "exactly one")


def test_replay_of_an_unknown_topic_exits_5(redis_url, keys) -> None:
    one_error_line(fabric(redis_url, keys, "replay", "nosuch", "--from", "1h", "--into", "x"), Exit.NOT_FOUND,
                   "nosuch")


# ---- trim ----------------------------------------------------------------------------------------------------


def lengths(url: str, keys: Keys, topic: str = "tick") -> dict[str, int]:
    async def work(client: Any) -> dict[str, int]:
        streams = sorted(s.decode() for s in await client.smembers(keys.topic_registry(topic)))
        return {s: int(await client.xlen(s)) for s in streams}

    return with_redis(url, work)


def read_by_group(url: str, stream: str, read: int, acked: int) -> None:
    """Group ``g`` reads the first ``read`` entries of ``stream`` and acknowledges the first ``acked``."""

    async def work(client: Any) -> None:
        await client.xgroup_create(stream, "g", id="0")
        reply = await client.xreadgroup("g", "c", {stream: ">"}, count=read)
        await client.xack(stream, "g", *[i for i, _ in reply[0][1]][:acked])

    with_redis(url, work)


def setup_for_trim(url: str, keys: Keys) -> tuple[str, str]:
    """Ten ticks on A, of which group g has acknowledged four and holds two; six on B, without groups."""
    publish(url, keys, [tick("A", n) for n in range(10)] + [tick("B", n) for n in range(6)])
    a, b = keys.stream("tick", Priority.NORMAL, "A"), keys.stream("tick", Priority.NORMAL, "B")
    read_by_group(url, a, 6, 4)
    return a, b


def test_trim_dry_run_prints_the_plan_and_changes_nothing(redis_url, keys) -> None:
    # given two streams, one with a group that still needs some entries
    a, b = setup_for_trim(redis_url, keys)
    # when a trim to two entries per stream is planned, as a table and as JSON
    table = fabric(redis_url, keys, "trim", "tick", "--max-len", "2", "--dry-run")
    plan = as_json(fabric(redis_url, keys, "trim", "tick", "--max-len", "2", "--dry-run", "--json"))
    # then the plan shows, per stream, its length, what would go and what the group holds back
    assert table.exit_code == 0, table.stderr
    assert "WOULD REMOVE" in table.stdout and "HELD BACK" in table.stdout and a in table.stdout
    assert [{k: row[k] for k in ("stream", "length", "remove", "held_back", "drop", "removed")} for row in plan] == [
        {"stream": a, "length": 10, "remove": 4, "held_back": 4, "drop": 0, "removed": None},
        {"stream": b, "length": 6, "remove": 4, "held_back": 0, "drop": 0, "removed": None},
    ]
    # and nothing changed
    assert lengths(redis_url, keys) == {a: 10, b: 6}


def test_trim_yes_removes_what_the_plan_said_and_keeps_what_a_group_needs(redis_url, keys) -> None:
    # given the same two streams and the plan for them
    a, b = setup_for_trim(redis_url, keys)
    plan = as_json(fabric(redis_url, keys, "trim", "tick", "--max-len", "2", "--dry-run", "--json"))
    # when trimmed with --yes
    done = as_json(fabric(redis_url, keys, "trim", "tick", "--max-len", "2", "--yes", "--json"))
    # then each stream lost what the plan said, and A kept the entries the group has not acknowledged
    assert [(r["stream"], r["removed"], r["dropped"]) for r in done] == [(r["stream"], r["remove"], 0) for r in plan]
    assert lengths(redis_url, keys) == {a: 6, b: 2}

    async def pending(client: Any) -> int:
        return int((await client.xpending(a, "g"))["pending"])

    assert with_redis(redis_url, pending) == 2


def test_trim_yes_prints_the_plan_then_what_it_removed(redis_url, keys) -> None:
    setup_for_trim(redis_url, keys)
    result = fabric(redis_url, keys, "trim", "tick", "--max-len", "2", "--yes")
    assert result.exit_code == 0, result.stderr
    assert "WOULD REMOVE" in result.stdout
    assert "removed 8 entries from 2 streams; kept 4 a group still needs" in result.stdout


def test_trim_without_yes_and_without_a_terminal_exits_2_and_removes_nothing(redis_url, keys) -> None:
    a, b = setup_for_trim(redis_url, keys)
    result = fabric(redis_url, keys, "trim", "tick", "--max-len", "2")
    one_error_line(result, Exit.USAGE, "--yes")
    assert "WOULD REMOVE" in result.stdout
    assert lengths(redis_url, keys) == {a: 10, b: 6}


def test_trim_of_an_unknown_topic_exits_5(redis_url, keys) -> None:
    one_error_line(fabric(redis_url, keys, "trim", "nosuch", "--max-len", "1", "--yes"), Exit.NOT_FOUND, "nosuch")


def test_trim_takes_retention_from_the_config_file(redis_url, keys, tmp_path) -> None:
    # given a config file that keeps three entries of tick, and a topic of six
    publish(redis_url, keys, [tick("B", n) for n in range(6)])
    config = tmp_path / "fabric.toml"
    config.write_text("[retention.tick]\nmax_len = 3\n")
    # when trimmed with no topic named and no flags
    done = as_json(fabric(redis_url, keys, "trim", "--config", str(config), "--yes", "--json"))
    # then the config's rule applied
    assert [(r["topic"], r["removed"]) for r in done] == [("tick", 3)]
    assert list(lengths(redis_url, keys).values()) == [3]


def test_trim_without_any_rule_exits_2(redis_url, keys) -> None:
    publish(redis_url, keys, [tick("A")])
    one_error_line(fabric(redis_url, keys, "trim", "tick", "--yes"), Exit.USAGE, "--max-len")
