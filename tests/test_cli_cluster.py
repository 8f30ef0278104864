"""The inspection commands (``fabric streams | groups | consumers | pending | health | tail | dlq | breaker``) on
the session's Redis Cluster, through typer's test runner: a namespace whose streams are served by several nodes
lists every stream, sums over every node, and finds dead letters and breakers wherever they live. (The other
CLI tests take ``redis_url`` without a backend: they run on the single redis-server.)"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest
from typer.testing import Result

from fabric import Publisher, deadletter
from fabric.breaker import BreakerStore
from fabric.config import BreakerConfig
from fabric.events import Tick
from fabric.keys import Keys, Priority
from tests.cli_runner import invoke, with_redis

SYMBOLS = ("A", "B", "C", "D", "E", "F")
GROUP = "g"
PER_SYMBOL = 3
READ = 2
"""Entries of each stream delivered to consumer c1 (one of them then dead-lettered on A and B)."""
DEAD = ("A", "B")


class Seeded:
    """A namespace on the cluster: PER_SYMBOL ticks per symbol, group g read READ deep by c1 on every stream, the
    first delivered entry of A's and B's streams dead-lettered, breaker x forced open."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.url = url
        self.keys = keys
        self.nodes: set[str] = set()

    def stream(self, symbol: str) -> str:
        return self.keys.stream("tick", Priority.NORMAL, symbol)

    async def seed(self, client: Any) -> None:
        async with Publisher(client, keys=self.keys) as pub:
            await pub.publish_many([Tick(symbol=s, bid=1.0, ask=2.0) for s in SYMBOLS for _ in range(PER_SYMBOL)])
        for symbol in SYMBOLS:
            stream = self.stream(symbol)
            self.nodes.add(client.get_node_from_key(stream).name)
            await client.xgroup_create(stream, GROUP, id="0")
            got = await client.xreadgroup(GROUP, "c1", {stream: ">"}, count=READ)
            if symbol in DEAD:
                await deadletter.move(client, self.keys, stream, got[0][1][0][0], group=GROUP, consumer="c1",
                                      handler="h", error_type="Boom", error="it broke", deliveries=3)
        await BreakerStore(client, self.keys, BreakerConfig(name="x")).force("open", "maintenance")


@pytest.fixture
def data(redis_cluster: Any) -> Seeded:
    seeded = Seeded(str(redis_cluster.url), Keys(f"t{uuid.uuid4().hex[:12]}"))
    with_redis(seeded.url, seeded.seed)
    assert len(seeded.nodes) > 1, "the symbols' streams are served by several nodes"
    return seeded


def fabric(data: Seeded, *args: str) -> Result:
    return invoke(data.url, data.keys, *args)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return msgspec.json.decode(result.stdout)


def as_json_lines(result: Result) -> list[Any]:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return [msgspec.json.decode(line) for line in result.stdout.splitlines() if line.strip()]


def test_streams_lists_every_stream_on_every_node(data: Seeded) -> None:
    rows = as_json(fabric(data, "streams", "--topic", "tick", "--json"))
    assert [(r["symbol"], r["length"], r["pending"]) for r in rows] == [
        (s, PER_SYMBOL, READ - (s in DEAD)) for s in SYMBOLS]


def test_streams_table_has_a_row_per_stream(data: Seeded) -> None:
    result = fabric(data, "streams")
    assert result.exit_code == 0, result.stderr
    rows = [line.split()[:4] for line in result.stdout.splitlines()[1:]]
    assert rows == [["breaker_state_changed", "critical", "-", "1"],
                    *(["tick", "normal", s, str(PER_SYMBOL)] for s in SYMBOLS)]


def test_groups_sum_over_the_streams_of_every_node(data: Seeded) -> None:
    (row,) = as_json(fabric(data, "groups", "--json"))
    assert (row["group"], row["topic"], row["streams"], row["consumers"], row["pending"], row["lag"]) == (
        GROUP, "tick", len(SYMBOLS), 1, READ * len(SYMBOLS) - len(DEAD), (PER_SYMBOL - READ) * len(SYMBOLS))


def test_consumers_sum_over_every_node(data: Seeded) -> None:
    (row,) = as_json(fabric(data, "consumers", "--json"))
    assert (row["group"], row["consumer"], row["streams"], row["pending"]) == (
        GROUP, "c1", len(SYMBOLS), READ * len(SYMBOLS) - len(DEAD))


def test_pending_lists_the_oldest_over_every_node_oldest_first(data: Seeded) -> None:
    rows = as_json(fabric(data, "pending", "--limit", "100", "--json"))
    assert len(rows) == READ * len(SYMBOLS) - len(DEAD)
    assert {r["stream"] for r in rows} == {data.stream(s) for s in SYMBOLS}
    order = [tuple(map(int, r["entry_id"].split("-"))) for r in rows]
    assert order == sorted(order)


def test_health_is_ok_for_the_group_and_fails_for_a_missing_one(data: Seeded) -> None:
    ok = fabric(data, "health", "--group", GROUP)
    assert ok.exit_code == 0, (ok.stdout, ok.stderr)
    assert "healthy" in ok.stdout
    missing = fabric(data, "health", "--group", "nosuch")
    assert missing.exit_code == 1, (missing.stdout, missing.stderr)
    assert "'nosuch' does not exist" in missing.stdout + missing.stderr


def test_tail_reads_every_stream_from_the_start(data: Seeded) -> None:
    rows = as_json_lines(fabric(data, "tail", "tick", "--from", "0", "--limit", str(PER_SYMBOL * len(SYMBOLS)),
                                "--json"))
    assert sorted(r["event"]["symbol"] for r in rows) == sorted(s for s in SYMBOLS for _ in range(PER_SYMBOL))


def test_dlq_list_finds_the_dead_letters_of_every_node(data: Seeded) -> None:
    rows = as_json(fabric(data, "dlq", "list", "--json"))
    assert sorted((r["origin_stream"], r["error_type"], r["deliveries"]) for r in rows) == [
        (data.stream(s), "Boom", 3) for s in DEAD]


def test_dlq_show_and_replay_on_the_cluster(data: Seeded) -> None:
    (first, second) = sorted(as_json(fabric(data, "dlq", "list", "--json")), key=lambda r: r["origin_stream"])
    shown = fabric(data, "dlq", "show", first["id"])
    assert shown.exit_code == 0, shown.stderr
    assert first["origin_stream"] in shown.stdout and "it broke" in shown.stdout

    replayed = fabric(data, "dlq", "replay", "--stream", second["origin_stream"])
    assert replayed.exit_code == 0, (replayed.stdout, replayed.stderr)
    left = as_json(fabric(data, "dlq", "list", "--json"))
    assert [r["id"] for r in left] == [first["id"]]
    lengths = {r["symbol"]: r["length"] for r in as_json(fabric(data, "streams", "--topic", "tick", "--json"))}
    assert lengths[second["origin_stream"].rsplit("{", 1)[1].rstrip("}")] == PER_SYMBOL + 1


def test_breaker_list_show_and_close(data: Seeded) -> None:
    (row,) = as_json(fabric(data, "breaker", "list", "--json"))
    assert (row["name"], row["state"], row["forced"]) == ("x", "OPEN", True)
    assert row["transitions"][0]["reason"] == "maintenance"
    shown = fabric(data, "breaker", "show", "x")
    assert shown.exit_code == 0, shown.stderr
    assert "OPEN (forced)" in shown.stdout

    closed = fabric(data, "breaker", "close", "x", "--reason", "done")
    assert closed.exit_code == 0, closed.stderr
    (row,) = as_json(fabric(data, "breaker", "list", "--json"))
    assert (row["state"], row["forced"], row["transitions"][0]["reason"]) == ("CLOSED", False, "done")
