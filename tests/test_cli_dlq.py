"""``fabric dlq list | show | replay | purge`` through typer's test runner, against the session's redis-server.

Dead letters are made by a real ``Worker`` whose handler rejects, or by ``fabric.deadletter.move``; each test sets
them up with ``asyncio.run`` and then invokes the CLI from plain sync code (the CLI runs its own event loop).
"""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner, Result

import fabric.cli
import fabric.cli.dlq
from fabric import Priority, Publisher, Reject, Worker, WorkerConfig
from fabric.deadletter import DeadLetter, find
from fabric.events import Bar, Event, Tick
from fabric.handler import as_handler
from fabric.keys import Keys
from tests.cli_runner import invoke, parsed
from tests.cli_runner import with_redis as on_redis
from tests.test_deadletter_filters import dead_letter, dead_letter_next
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.real_only

GROUP = "g"
FAST = {"block_ms": 50, "reclaim_idle_ms": 300, "reclaim_interval_ms": 50, "discover_interval_ms": 50}


def fabric_dlq(redis_url: str, keys: Keys, *args: str, stdin: str | None = None) -> Result:
    """Run ``fabric dlq ARGS`` in this process on the test's server and namespace."""
    return invoke(redis_url, keys, "dlq", *args, stdin=stdin)


def ticks(n: int, symbol: str = "A") -> list[Tick]:
    return [Tick(symbol=symbol, bid=100.0 + i, ask=101.0 + i) for i in range(n)]


def make_dead(redis_url: str, keys: Keys, *events: Event, **kw: Any) -> list[DeadLetter]:
    """Dead-letter each event with ``move`` (group ``g``)."""

    async def work(client: Any) -> list[DeadLetter]:
        return [await dead_letter(client, keys, e, **kw) for e in events]

    result: list[DeadLetter] = on_redis(redis_url, work)
    return result


def reject_with_a_worker(redis_url: str, keys: Keys, events: list[Tick]) -> None:
    """Publish ``events`` and run a worker whose handler rejects each, until all are dead letters."""

    async def refuse(event: Event) -> None:
        raise Reject("bad price")

    async def work(client: Any) -> None:
        async with Publisher(client, keys=keys) as pub:
            await pub.publish_many(events)
        worker = Worker(client, as_handler(refuse, "refuse"), WorkerConfig(group=GROUP, topics=["tick"], **FAST),
                        keys=keys, handler_name="refuse")
        async with running(worker):
            async def all_dead() -> bool:
                return len(await find(client, keys)) == len(events)

            await eventually(all_dead, what=f"{len(events)} dead letters")

    on_redis(redis_url, work)


def handle_with_a_worker(redis_url: str, keys: Keys, expected: int) -> Counter[str]:
    """Run a worker whose handler succeeds until it has handled ``expected`` events and nothing is pending; return
    how often it saw each event id."""
    seen: Counter[str] = Counter()

    async def accept(event: Event) -> None:
        seen[event.event_id] += 1

    async def work(client: Any) -> None:
        worker = Worker(client, as_handler(accept, "accept"), WorkerConfig(group=GROUP, topics=["tick"], **FAST),
                        keys=keys, handler_name="accept")
        stream = keys.stream("tick", Priority.NORMAL, "A")

        async def done() -> bool:
            pending = (await client.xpending(stream, GROUP))["pending"]
            return sum(seen.values()) >= expected and pending == 0

        async with running(worker):
            await eventually(done, what=f"{expected} handled, nothing pending")

    on_redis(redis_url, work)
    return seen


def stream_length(redis_url: str, stream: str) -> int:
    async def work(client: Any) -> int:
        return int(await client.xlen(stream))

    result: int = on_redis(redis_url, work)
    return result


def remaining(redis_url: str, keys: Keys) -> list[DeadLetter]:
    async def work(client: Any) -> list[DeadLetter]:
        return await find(client, keys)

    result: list[DeadLetter] = on_redis(redis_url, work)
    return result


# ---- list ---------------------------------------------------------------------------------------------------


def test_list_prints_a_table_of_dead_letters_with_their_errors(redis_url, keys):
    # given two ticks rejected by a worker's handler
    reject_with_a_worker(redis_url, keys, ticks(2))
    letters = remaining(redis_url, keys)
    # when listed
    result = fabric_dlq(redis_url, keys, "list")
    # then a header and one row per dead letter, with its id, origin, type, handler and error
    assert result.exit_code == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["ID", "ORIGIN", "STREAM", "TYPE"]
    assert len(rows) == 2
    for letter, row in zip(letters, rows, strict=True):
        assert row.startswith(letter.ref)
        for text in (letter.origin_stream, "Tick", GROUP, "refuse", "Reject", "bad price"):
            assert text in row


def test_list_json_has_every_field_and_the_whole_error(redis_url, keys):
    # given a dead letter with an error longer than a table shows
    long_error = "x" * 300
    [letter] = make_dead(redis_url, keys, ticks(1)[0], error=long_error)
    # when listed as JSON
    [row] = parsed(fabric_dlq(redis_url, keys, "list", "--json"))
    # then it carries the id show accepts, its origin and failure facts, and the error in full
    assert row["id"] == letter.ref
    assert (row["origin_stream"], row["origin_id"], row["type"]) == (letter.origin_stream, letter.origin_id, "Tick")
    assert (row["group"], row["consumer"], row["handler"]) == (GROUP, "c", "h")
    assert (row["error_type"], row["error"], row["deliveries"]) == ("ValueError", long_error, 1)
    assert row["dead_at_ms"] == letter.dead_ms and row["age_ms"] >= 0
    assert row["origin_missing"] is False


def test_list_table_truncates_a_long_error(redis_url, keys):
    make_dead(redis_url, keys, ticks(1)[0], error="y" * 300)
    result = fabric_dlq(redis_url, keys, "list")
    assert result.exit_code == 0, result.stderr
    assert "y" * 30 in result.stdout and "y" * 100 not in result.stdout


def test_list_of_nothing_says_so(redis_url, keys):
    result = fabric_dlq(redis_url, keys, "list")
    assert result.exit_code == 0, result.stderr
    assert "(no dead letters)" in result.stdout
    assert parsed(fabric_dlq(redis_url, keys, "list", "--json")) == []


def test_list_limit_shows_the_first_and_says_more_match(redis_url, keys):
    # given three dead letters
    letters = make_dead(redis_url, keys, *ticks(3))
    # when at most two are listed
    result = fabric_dlq(redis_url, keys, "list", "--limit", "2", "--json")
    # then the first two come back and stderr says there are more
    assert [row["id"] for row in parsed(result)] == [x.ref for x in letters[:2]]
    assert "--limit" in result.stderr


@pytest.mark.parametrize("option, value, expected", [
    ("--topic", "tick", "first"), ("--stream", "FIRST", "first"), ("--type", "Tick", "first"),
    ("--error", "PRICE", "first"), ("--group", "other", "second"), ("--newer-than-ms", "3600000", "both"),
    ("--older-than-ms", "3600000", "none"),
])
def test_list_filters(redis_url, keys, option, value, expected):
    # given a Tick on topic tick failing on a price (group g), and a Bar on topic bars failing otherwise (group
    # other), both dead-lettered just now
    [first] = make_dead(redis_url, keys, ticks(1)[0], error="bad price")
    bar = Bar(symbol="B", timeframe="1m", start_ns=0, open=1, high=2, low=0.5, close=1.5)
    [second] = make_dead(redis_url, keys, bar, topic="bars", group="other", error="other")
    # when listed with one filter
    result = fabric_dlq(redis_url, keys, "list", option, first.origin_stream if value == "FIRST" else value, "--json")
    # then only the matching dead letters come back
    want = {"first": [first], "second": [second], "both": [first, second], "none": []}[expected]
    assert sorted(row["id"] for row in parsed(result)) == sorted(x.ref for x in want)


def test_list_with_contradictory_ages_exits_2(redis_url, keys):
    result = fabric_dlq(redis_url, keys, "list", "--older-than-ms", "10", "--newer-than-ms", "5")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: bad filter")


# ---- show ---------------------------------------------------------------------------------------------------


def test_show_json_has_the_decoded_event_and_the_original_bytes(redis_url, keys):
    # given a dead letter of a known tick
    event = ticks(1)[0]
    [letter] = make_dead(redis_url, keys, event, error="bad price")
    # when shown as JSON
    doc = parsed(fabric_dlq(redis_url, keys, "show", letter.ref, "--json"))
    # then it has the failure facts, the event decoded, and the original fields (base64) byte for byte
    assert (doc["id"], doc["error"], doc["origin_stream"]) == (letter.ref, "bad price", letter.origin_stream)
    assert doc["event"] == msgspec.to_builtins(event)
    assert doc["decode_error"] is None
    assert {k: base64.b64decode(v) for k, v in doc["original_fields"].items()} == letter.fields


def test_show_prints_the_failure_and_the_event(redis_url, keys):
    event = ticks(1)[0]
    [letter] = make_dead(redis_url, keys, event, error="bad price")
    result = fabric_dlq(redis_url, keys, "show", letter.ref)
    assert result.exit_code == 0, result.stderr
    for text in (letter.ref, letter.origin_stream, "bad price", "ValueError", event.event_id, '"type":"Tick"'):
        assert text in result.stdout


def test_show_of_undecodable_bytes_gives_the_raw_fields_and_why(redis_url, keys):
    # given a dead letter of an entry whose data is not msgpack
    stream = keys.stream("tick", Priority.NORMAL, "A")

    async def work(client: Any) -> DeadLetter:
        await client.xadd(stream, {"type": "Tick", "v": "1", "enc": "msgpack", "data": b"\xc1\xff"})
        return await dead_letter_next(client, keys, stream)

    letter: DeadLetter = on_redis(redis_url, work)
    # when shown, as JSON and as text
    doc = parsed(fabric_dlq(redis_url, keys, "show", letter.ref, "--json"))
    text = fabric_dlq(redis_url, keys, "show", letter.ref)
    # then there is no event, the reason is given, and the raw bytes are there
    assert doc["event"] is None and "Tick" in doc["decode_error"]
    assert base64.b64decode(doc["original_fields"]["data"]) == b"\xc1\xff"
    assert "cannot be decoded" in text.stdout and repr(b"\xc1\xff") in text.stdout


def test_show_of_an_unknown_id_exits_5(redis_url, keys):
    # given a dead letter that has been purged
    [letter] = make_dead(redis_url, keys, ticks(1)[0])
    assert fabric_dlq(redis_url, keys, "purge", "--yes").exit_code == 0
    # when shown
    result = fabric_dlq(redis_url, keys, "show", letter.ref)
    # then one error line, exit 5
    assert result.exit_code == 5
    assert result.stderr.startswith("error: no dead letter") and len(result.stderr.splitlines()) == 1


def test_show_of_a_malformed_id_exits_2(redis_url, keys):
    result = fabric_dlq(redis_url, keys, "show", "12345")
    assert result.exit_code == 2
    assert "TAG/ENTRY_ID" in result.stderr


# ---- replay -------------------------------------------------------------------------------------------------


def test_replay_twice_publishes_each_dead_letter_once_and_a_worker_handles_each_once(redis_url, keys):
    # given five ticks a worker's handler rejected
    events = ticks(5)
    reject_with_a_worker(redis_url, keys, events)
    stream = keys.stream("tick", Priority.NORMAL, "A")
    # when `fabric dlq replay` runs twice
    first = parsed(fabric_dlq(redis_url, keys, "replay", "--json"))
    second = parsed(fabric_dlq(redis_url, keys, "replay", "--json"))
    # then the first replays all five, the second nothing, and the stream got exactly five new entries
    assert (first["matched"], first["replayed"], first["gone"]) == (5, 5, 0)
    assert (second["matched"], second["replayed"]) == (0, 0)
    assert stream_length(redis_url, stream) == 10
    assert remaining(redis_url, keys) == []
    # and a worker whose handler now succeeds handles each event exactly once
    seen = handle_with_a_worker(redis_url, keys, expected=5)
    assert seen == Counter({e.event_id: 1 for e in events})


def test_replay_prints_counts(redis_url, keys):
    make_dead(redis_url, keys, *ticks(2))
    result = fabric_dlq(redis_url, keys, "replay")
    assert result.exit_code == 0, result.stderr
    assert "replayed 2 dead letters" in result.stdout and "0 already replayed" in result.stdout


def test_replay_filters_by_error_and_leaves_the_rest(redis_url, keys):
    # given one dead letter failing on price and one on something else
    price, other = make_dead(redis_url, keys, ticks(1)[0], error="bad price") + make_dead(
        redis_url, keys, ticks(1, "B")[0], error="other")
    # when replaying those whose error mentions price
    report = parsed(fabric_dlq(redis_url, keys, "replay", "--error", "price", "--json"))
    # then only that one is replayed; the other stays
    assert [o["id"] for o in report["letters"] if o["outcome"] == "replayed"] == [price.ref]
    assert [x.ref for x in remaining(redis_url, keys)] == [other.ref]


def test_replay_with_a_rate_is_accepted(redis_url, keys):
    make_dead(redis_url, keys, *ticks(3))
    report = parsed(fabric_dlq(redis_url, keys, "replay", "--rate", "500", "--json"))
    assert report["replayed"] == 3


def test_replay_dry_run_changes_nothing(redis_url, keys):
    # given two dead letters
    letters = make_dead(redis_url, keys, *ticks(2))
    stream = letters[0].origin_stream
    length = stream_length(redis_url, stream)
    # when replayed as a dry run
    report = parsed(fabric_dlq(redis_url, keys, "replay", "--dry-run", "--json"))
    # then both would be replayed and nothing changed
    assert report["dry_run"] is True and report["replayed"] == 0
    assert [o["outcome"] for o in report["letters"]] == ["would_replay", "would_replay"]
    assert stream_length(redis_url, stream) == length
    assert [x.ref for x in remaining(redis_url, keys)] == [x.ref for x in letters]


def test_replay_of_a_dead_letter_without_its_original_exits_6(redis_url, keys):
    # given a dead letter of an entry deleted before it was dead-lettered
    async def work(client: Any) -> DeadLetter:
        async with Publisher(client, keys=keys) as pub:
            await pub.publish(ticks(1)[0])
        return await dead_letter_next(client, keys, keys.stream("tick", Priority.NORMAL, "A"), delete_first=True)

    letter: DeadLetter = on_redis(redis_url, work)
    # when replayed
    result = fabric_dlq(redis_url, keys, "replay", "--json")
    # then it is left in place, the JSON says why, and the exit is 6 with one error line
    assert result.exit_code == 6
    assert msgspec.json.decode(result.stdout)["no_original"] == 1
    assert result.stderr.startswith("error: 1 dead letter kept no original")
    assert [x.ref for x in remaining(redis_url, keys)] == [letter.ref]


# ---- purge --------------------------------------------------------------------------------------------------


def test_purge_with_yes_deletes_the_matching_dead_letters(redis_url, keys):
    # given dead letters of groups g and other
    make_dead(redis_url, keys, *ticks(2))
    [kept] = make_dead(redis_url, keys, ticks(1, "B")[0], group="other")
    # when group g's are purged with --yes
    report = parsed(fabric_dlq(redis_url, keys, "purge", "--group", GROUP, "--yes", "--json"))
    # then those two are gone for good, and the other stays
    assert (report["matched"], report["purged"], report["gone"]) == (2, 2, 0)
    assert [x.ref for x in remaining(redis_url, keys)] == [kept.ref]


def test_purge_without_yes_on_a_pipe_refuses_and_deletes_nothing(redis_url, keys):
    # given a dead letter, and stdin that is not a terminal (the test runner's)
    letters = make_dead(redis_url, keys, ticks(1)[0])
    # when purging without --yes
    result = fabric_dlq(redis_url, keys, "purge", stdin="y\n")
    # then it refuses with exit 2 and one line naming --yes, and nothing is deleted
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "pass --yes" in result.stderr
    assert [x.ref for x in remaining(redis_url, keys)] == [x.ref for x in letters]


def test_purge_on_a_terminal_asks_and_deletes_on_yes(redis_url, keys, monkeypatch):
    # given two dead letters and a terminal on stdin
    make_dead(redis_url, keys, *ticks(2))
    monkeypatch.setattr(fabric.cli.dlq, "_stdin_is_terminal", lambda: True)
    # when purging and answering y
    result = fabric_dlq(redis_url, keys, "purge", stdin="y\n")
    # then the prompt said how many, and they are gone
    assert result.exit_code == 0, result.stderr
    assert "Purge 2 dead letters for good?" in result.stderr
    assert "purged 2 dead letters" in result.stdout
    assert remaining(redis_url, keys) == []


def test_purge_on_a_terminal_answered_no_deletes_nothing(redis_url, keys, monkeypatch):
    letters = make_dead(redis_url, keys, *ticks(2))
    monkeypatch.setattr(fabric.cli.dlq, "_stdin_is_terminal", lambda: True)
    result = fabric_dlq(redis_url, keys, "purge", stdin="n\n")
    assert result.exit_code == 1
    assert "nothing deleted" in result.stderr
    assert [x.ref for x in remaining(redis_url, keys)] == [x.ref for x in letters]


def test_purge_json_of_nothing_reports_zero(redis_url, keys):
    report = parsed(fabric_dlq(redis_url, keys, "purge", "--yes", "--json"))
    assert report == {"matched": 0, "purged": 0, "gone": 0}


# ---- errors -------------------------------------------------------------------------------------------------


def test_an_unreachable_redis_is_one_line_and_exit_3(keys):
    result = CliRunner().invoke(fabric.cli.app, ["dlq", "list", "--redis-url", "redis://127.0.0.1:1/0",
                                                 "--namespace", keys.ns])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: cannot reach Redis") and len(result.stderr.splitlines()) == 1
