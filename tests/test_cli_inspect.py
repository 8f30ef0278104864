"""``fabric streams | groups | consumers | pending | health`` through typer's test runner against the session's
redis-server: the table has the rows, ``--json`` parses and says the same, filters filter, a name that does not
exist exits 5, and health exits 0 or 1 with one line saying why."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import pytest
from typer.testing import Result

from fabric import Publisher
from fabric.cli.options import Exit
from fabric.events import Tick
from fabric.keys import Keys, Priority
from tests.cli_runner import invoke as fabric
from tests.cli_runner import with_redis
from tests.waiting import eventually

pytestmark = pytest.mark.real_only

T = TypeVar("T")
GROUP = "g"
UNREACHABLE = "redis://127.0.0.1:1/0"


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    return msgspec.json.decode(result.stdout)


def one_error_line(result: Result, code: int, *words: str) -> str:
    """Exit ``code``, exactly one ``error:`` line on stderr naming every word, no traceback; return it."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def ms_of(entry_id: str | bytes) -> int:
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])


class Setup:
    """Data for a test: ticks published with ``fabric.Publisher``, a group read with redis-py."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.url = url
        self.keys = keys
        self.ids: dict[str, list[str]] = {}

    def stream(self, symbol: str, priority: Priority = Priority.NORMAL, topic: str = "tick") -> str:
        return self.keys.stream(topic, priority, symbol)

    def publish(self, *events: tuple[str, str, str]) -> None:
        """Publish a Tick per (topic, priority, symbol)."""

        async def work(client: Any) -> None:
            async with Publisher(client, keys=self.keys) as pub:
                for topic, priority, symbol in events:
                    entry_id = await pub.publish(Tick(symbol=symbol, bid=1.0, ask=2.0), topic=topic,
                                                 priority=priority)
                    self.ids.setdefault(self.keys.stream(topic, Priority.parse(priority), symbol), []).append(
                        entry_id or "")

        with_redis(self.url, work)

    def read(self, stream: str, consumer: str, count: int, group: str = GROUP) -> None:
        """Create the group (from the start) if needed and deliver ``count`` new entries to ``consumer``."""

        async def work(client: Any) -> None:
            if not any(g["name"] == group.encode() for g in await client.xinfo_groups(stream)):
                await client.xgroup_create(stream, group, id="0")
            if count:
                await client.xreadgroup(group, consumer, {stream: ">"}, count=count)

        with_redis(self.url, work)


@pytest.fixture
def data(redis_url: str, keys: Keys) -> Iterator[Setup]:
    """tick: A normal (3 entries; c1 read 2), A high (1), B normal (2; c2 read 1); bar: A normal (1)."""
    setup = Setup(redis_url, keys)
    setup.publish(*[("tick", "normal", "A")] * 3, ("tick", "high", "A"), *[("tick", "normal", "B")] * 2,
                  ("bar", "normal", "A"))
    setup.read(setup.stream("A"), "c1", 2)
    setup.read(setup.stream("B"), "c2", 1)
    yield setup


# ---- streams ---------------------------------------------------------------------------------------------


def test_streams_table_has_a_row_per_stream(data: Setup) -> None:
    result = fabric(data.url, data.keys, "streams")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TOPIC", "PRIORITY", "SYMBOL", "LENGTH", "FIRST", "ENTRY", "LAST", "ENTRY", "GROUPS",
                                "LAG", "PENDING"]
    rows = [line.split()[:4] for line in lines[1:]]
    assert rows == [["bar", "normal", "A", "1"], ["tick", "high", "A", "1"], ["tick", "normal", "A", "3"],
                    ["tick", "normal", "B", "2"]]


def test_streams_json_has_every_field(data: Setup) -> None:
    # When the streams of tick are listed as JSON
    rows = as_json(fabric(data.url, data.keys, "streams", "--topic", "tick", "--json"))

    # Then each object is one stream, with its entries' times and its group's figures
    assert [r["key"] for r in rows] == [data.stream("A", Priority.HIGH), data.stream("A"), data.stream("B")]
    a = rows[1]
    ids = data.ids[data.stream("A")]
    assert {k: a[k] for k in ("topic", "priority", "symbol", "exists", "length", "first_ms", "last_ms", "pending",
                              "lag")} == {
        "topic": "tick", "priority": "normal", "symbol": "A", "exists": True, "length": 3,
        "first_ms": ms_of(ids[0]), "last_ms": ms_of(ids[-1]), "pending": 2, "lag": 1}
    assert a["groups"] == [{"group": GROUP, "consumers": 1, "pending": 2, "lag": 1, "last_delivered_id": ids[1],
                            "last_delivered_ms": ms_of(ids[1])}]
    assert (rows[0]["groups"], rows[0]["pending"], rows[0]["lag"]) == ([], 0, 0)


def test_streams_filter_by_symbol_and_priority(data: Setup) -> None:
    by_symbol = as_json(fabric(data.url, data.keys, "streams", "--symbol", "B", "--json"))
    by_priority = as_json(fabric(data.url, data.keys, "streams", "--priority", "HIGH", "--json"))
    assert [r["key"] for r in by_symbol] == [data.stream("B")]
    assert [r["key"] for r in by_priority] == [data.stream("A", Priority.HIGH)]


def test_streams_with_a_bad_priority_exit_2_naming_the_allowed_values(data: Setup) -> None:
    result = fabric(data.url, data.keys, "streams", "--priority", "urgent")
    one_error_line(result, Exit.USAGE, "urgent", "low, normal, high, critical")


def test_streams_of_a_topic_that_does_not_exist_exit_5(data: Setup) -> None:
    result = fabric(data.url, data.keys, "streams", "--topic", "nope")
    one_error_line(result, Exit.NOT_FOUND, "topic 'nope'", "fabric streams")


def test_streams_of_a_symbol_without_streams_print_an_empty_list(data: Setup) -> None:
    assert as_json(fabric(data.url, data.keys, "streams", "--symbol", "ZZZ", "--json")) == []
    result = fabric(data.url, data.keys, "streams", "--symbol", "ZZZ")
    assert (result.exit_code, result.stdout.strip()) == (0, "(no streams)")


def test_streams_on_an_unreachable_redis_exit_3_with_one_line(keys: Keys) -> None:
    result = fabric(UNREACHABLE, keys, "streams")
    one_error_line(result, Exit.UNREACHABLE, "cannot reach Redis", "--redis-url")


# ---- groups and consumers --------------------------------------------------------------------------------


def test_groups_table_has_a_row_per_group_and_topic(data: Setup) -> None:
    result = fabric(data.url, data.keys, "groups")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["GROUP", "TOPIC", "STREAMS", "CONSUMERS", "PENDING", "LAG"]
    assert [line.split()[:6] for line in lines[1:]] == [[GROUP, "tick", "2", "2", "3", "2"]]


def test_groups_json_sums_over_the_topics_streams(data: Setup) -> None:
    [row] = as_json(fabric(data.url, data.keys, "groups", "--topic", "tick", "--group", GROUP, "--json"))
    newest = max(ms_of(data.ids[data.stream("A")][1]), ms_of(data.ids[data.stream("B")][0]))
    assert row == {"group": GROUP, "topic": "tick", "streams": 2, "consumers": 2, "pending": 3, "lag": 2,
                   "last_delivered_ms": newest}


def test_groups_filter_naming_a_group_that_does_not_exist_exits_5(data: Setup) -> None:
    result = fabric(data.url, data.keys, "groups", "--group", "nope")
    one_error_line(result, Exit.NOT_FOUND, "group 'nope'", "fabric groups")


def test_groups_of_a_topic_without_groups_print_an_empty_list(data: Setup) -> None:
    assert as_json(fabric(data.url, data.keys, "groups", "--topic", "bar", "--json")) == []


def test_consumers_table_has_a_row_per_consumer(data: Setup) -> None:
    result = fabric(data.url, data.keys, "consumers")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:7] == ["GROUP", "CONSUMER", "TOPICS", "STREAMS", "OWNS", "PENDING", "IDLE"]
    assert [line.split()[:6] for line in lines[1:]] == [[GROUP, "c1", "tick", "1", "0", "2"],
                                                        [GROUP, "c2", "tick", "1", "0", "1"]]


def test_consumers_json_has_pending_idle_and_times(data: Setup) -> None:
    rows = as_json(fabric(data.url, data.keys, "consumers", "--group", GROUP, "--json"))
    assert [(r["group"], r["consumer"], r["topics"], r["streams"], r["pending"]) for r in rows] == [
        (GROUP, "c1", ["tick"], 1, 2), (GROUP, "c2", ["tick"], 1, 1)]
    for r in rows:
        assert set(r) == {"group", "consumer", "topics", "streams", "pending", "idle_ms", "inactive_ms",
                          "last_seen_ms", "last_delivery_ms", "owns"}
        assert isinstance(r["idle_ms"], int) and r["idle_ms"] >= 0
        assert isinstance(r["last_seen_ms"], int) and r["last_seen_ms"] >= ms_of(data.ids[data.stream("A")][0])
        # Redis before 7.2 does not say when a consumer last got something: null, not a guess
        assert (r["inactive_ms"] is None) == (r["last_delivery_ms"] is None)


# ---- pending ---------------------------------------------------------------------------------------------


def test_pending_table_lists_the_oldest_first(data: Setup) -> None:
    result = fabric(data.url, data.keys, "pending")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STREAM", "GROUP", "ENTRY", "ID", "AGE", "CONSUMER", "IDLE", "DELIVERIES"]
    a, b = data.ids[data.stream("A")], data.ids[data.stream("B")]
    expected = sorted([(a[0], "c1"), (a[1], "c1"), (b[0], "c2")], key=lambda x: tuple(map(int, x[0].split("-"))))
    assert [(line.split()[2], line.split()[4]) for line in lines[1:]] == expected


def test_pending_json_has_age_consumer_idle_and_deliveries(data: Setup) -> None:
    rows = as_json(fabric(data.url, data.keys, "pending", "--topic", "tick", "--group", GROUP, "--consumer", "c1",
                          "--json"))
    a = data.ids[data.stream("A")]
    assert [(r["stream"], r["topic"], r["group"], r["entry_id"], r["consumer"], r["deliveries"]) for r in rows] == [
        (data.stream("A"), "tick", GROUP, a[0], "c1", 1), (data.stream("A"), "tick", GROUP, a[1], "c1", 1)]
    for r in rows:
        assert set(r) == {"stream", "topic", "group", "entry_id", "age_ms", "consumer", "idle_ms", "deliveries"}
        assert r["age_ms"] >= 0 and r["idle_ms"] >= 0


def test_pending_limit_keeps_the_oldest(data: Setup) -> None:
    rows = as_json(fabric(data.url, data.keys, "pending", "--limit", "1", "--json"))
    everything = as_json(fabric(data.url, data.keys, "pending", "--json"))
    assert len(everything) == 3 and [r["entry_id"] for r in rows] == [everything[0]["entry_id"]]


def test_pending_of_a_consumer_that_does_not_exist_exits_5(data: Setup) -> None:
    result = fabric(data.url, data.keys, "pending", "--consumer", "nobody")
    one_error_line(result, Exit.NOT_FOUND, "consumer 'nobody'", "fabric consumers")


def test_pending_of_a_group_with_nothing_pending_prints_an_empty_list(data: Setup) -> None:
    data.read(data.stream("A", Priority.HIGH), "c3", 0, group="idle")
    assert as_json(fabric(data.url, data.keys, "pending", "--group", "idle", "--json")) == []
    result = fabric(data.url, data.keys, "pending", "--group", "idle")
    assert (result.exit_code, result.stdout.strip()) == (0, "(nothing pending)")


# ---- health ----------------------------------------------------------------------------------------------


def test_health_exits_0_with_a_consumer_that_just_read(data: Setup) -> None:
    # Given consumer c1 of group g reading just now
    data.read(data.stream("A"), "c1", 1)

    # When health is asked for that group, as JSON and as a table
    report = as_json(fabric(data.url, data.keys, "health", "--group", GROUP, "--topic", "tick", "--json"))
    table = fabric(data.url, data.keys, "health", "--group", GROUP)

    # Then it is healthy, the group's figures are there, and the table says so
    assert (report["ok"], report["problems"], report["max_idle_ms"]) == (True, [], 30_000)
    [g] = report["groups"]
    assert {k: g[k] for k in ("group", "topics", "streams", "consumers", "live_consumers", "pending")} == {
        "group": GROUP, "topics": ["tick"], "streams": 2, "consumers": 2, "live_consumers": 2, "pending": 4}
    assert table.exit_code == 0, table.stderr
    assert table.stdout.splitlines()[1].split()[0] == GROUP
    assert table.stdout.strip().endswith("healthy: Redis answers; 1 group(s) consuming")


def test_health_without_groups_exits_0_and_lists_the_groups(data: Setup) -> None:
    report = as_json(fabric(data.url, data.keys, "health", "--json"))
    assert report["ok"] is True and [g["group"] for g in report["groups"]] == [GROUP]


def test_health_exits_1_for_a_missing_group(data: Setup) -> None:
    result = fabric(data.url, data.keys, "health", "--group", GROUP, "--group", "absent")
    one_error_line(result, Exit.FAILED, "unhealthy", "group 'absent' does not exist", "--group absent")
    report = msgspec.json.decode(fabric(data.url, data.keys, "health", "--group", "absent", "--json").stdout)
    assert report["ok"] is False and report["groups"] == [
        {"group": "absent", "topics": [], "streams": 0, "consumers": 0, "live_consumers": 0, "idle_ms": None,
         "pending": 0, "lag": None}]


def test_health_exits_1_when_every_consumer_is_idle_too_long(redis_url: str, keys: Keys) -> None:
    # Given a group whose one consumer read once
    setup = Setup(redis_url, keys)
    setup.publish(("tick", "normal", "A"))
    stream = setup.stream("A")
    setup.read(stream, "c1", 1)

    # When Redis shows it idle for longer than --max-idle-ms
    async def idle_past(client: Any) -> object:
        async def check() -> bool:
            return all(int(c["idle"]) > 20 for c in await client.xinfo_consumers(stream, GROUP))

        return await eventually(check, what="c1 idle for more than 20 ms")

    with_redis(redis_url, idle_past)
    result = fabric(redis_url, keys, "health", "--group", GROUP, "--max-idle-ms", "20")

    # Then health exits 1 with one line saying no consumer is active
    one_error_line(result, Exit.FAILED, "unhealthy", "no consumer active in the last 20 ms")


def test_health_exits_1_on_an_unreachable_redis_with_one_line(keys: Keys) -> None:
    result = fabric(UNREACHABLE, keys, "health", "--group", GROUP)
    one_error_line(result, Exit.FAILED, "unhealthy", "cannot reach Redis at redis://127.0.0.1:1/0")
    assert result.stdout == ""


def test_health_json_on_an_unreachable_redis_says_why(keys: Keys) -> None:
    result = fabric(UNREACHABLE, keys, "health", "--json")
    assert result.exit_code == Exit.FAILED
    report = msgspec.json.decode(result.stdout)
    assert (report["ok"], report["groups"]) == (False, [])
    assert len(report["problems"]) == 1 and "cannot reach Redis" in report["problems"][0]


def test_health_exits_1_on_wrong_credentials_without_showing_the_password(redis_url: str, keys: Keys) -> None:
    # Given a URL with a real user and a wrong password
    user = f"u_{uuid.uuid4().hex[:8]}"
    with_redis(redis_url, lambda c: c.execute_command("ACL", "SETUSER", user, "on", ">right", "~*", "+@all"))
    try:
        secret = f"wrong-{uuid.uuid4().hex[:8]}"
        parts = urlsplit(redis_url)
        result = fabric(f"redis://{user}:{secret}@{parts.hostname}:{parts.port}/0", keys, "health")
    finally:
        with_redis(redis_url, lambda c: c.execute_command("ACL", "DELUSER", user))
    # Then health exits 1 with one line about the credentials, never printing the password
    line = one_error_line(result, Exit.FAILED, "unhealthy", "credentials")
    assert secret not in line


def test_health_is_unhealthy_when_redis_accepts_but_never_answers(keys) -> None:
    # Given a socket that accepts connections and never replies (a stalled or paused server)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"

        # When health is probed with a short timeout
        result = fabric(url, keys, "health", "--timeout-s", "0.3")

    # Then it answers unhealthy in one line instead of waiting for the socket timeout
    assert result.exit_code == Exit.FAILED
    assert result.stderr.strip().splitlines()[-1].startswith("error: unhealthy:")
    assert "did not answer within 0.3s" in result.stderr
