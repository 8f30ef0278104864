"""``fabric breaker list | show | open | close | reset`` through typer's test runner against the session's
redis-server, and forcing a breaker from the command line while a real ``fabric worker`` process runs.

Breakers are set up through ``BreakerStore`` (as a worker would report to them) with ``asyncio.run``; the CLI
runs its own event loop, so the CliRunner tests are plain sync functions.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import Result

from fabric import Publisher
from fabric.breaker import CLOSED, HALF_OPEN, OPEN, BreakerStore
from fabric.config import BreakerConfig
from fabric.events import Tick
from fabric.keys import Keys
from tests.cli_runner import invoke, parsed, with_redis
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import handled_key, parse_record, subprocess_env
from tests.waiting import eventually

pytestmark = pytest.mark.real_only  # breaker.lua needs cjson, which fakeredis's Lua lacks

INFO_FIELDS = {"name", "state", "forced", "since_ms", "age_ms", "consecutive_failures", "trials", "successes",
               "generation", "window_ms", "window_calls", "window_failures", "transitions"}
DEFAULT_WINDOW_MS = 10_000


def fabric_breaker(redis_url: str, keys: Keys, *args: str) -> Result:
    """Run ``fabric breaker ARGS`` in this process on the test's server and namespace."""
    return invoke(redis_url, keys, "breaker", *args)


def report(redis_url: str, keys: Keys, name: str, *outcomes: tuple[int, int, int, int, int],
           **policy: Any) -> None:
    """Report batches of outcomes (calls, failures, trailing, trial_ok, trial_failed) as workers would."""

    async def work(client: Any) -> None:
        store = BreakerStore(client, keys, BreakerConfig(name=name, **policy))
        for batch in outcomes:
            await store.record(*batch)

    with_redis(redis_url, work)


def cycle(redis_url: str, keys: Keys, name: str) -> None:
    """Take a breaker through CLOSED → OPEN → HALF_OPEN → CLOSED (three transitions)."""

    async def work(client: Any) -> None:
        store = BreakerStore(client, keys, BreakerConfig(name=name, failure_threshold=1, recovery_ms=0))
        await store.record(1, 1, 1, 0, 0)
        assert (await store.admit()).admitted
        assert (await store.record(1, 0, 0, 1, 0)).state == CLOSED

    with_redis(redis_url, work)


def redis_now_ms(redis_url: str) -> int:
    async def work(client: Any) -> int:
        seconds, micros = await client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    return with_redis(redis_url, work)


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# ---- list and show -----------------------------------------------------------------------------------------


def test_list_json_has_every_breaker_with_its_state_counts_and_last_transition(redis_url, keys) -> None:
    # Given "exchange" with 2 trailing failures among 5 calls (threshold 3: still closed) and "feed" tripped
    before = redis_now_ms(redis_url)
    report(redis_url, keys, "exchange", (5, 2, 2, 0, 0), failure_threshold=3)
    report(redis_url, keys, "feed", (1, 1, 1, 0, 0), failure_threshold=1)

    # When the breakers are listed as JSON
    exchange, feed = parsed(fabric_breaker(redis_url, keys, "list", "--json"))

    # Then each is an object with every field, by name
    assert set(exchange) == set(feed) == INFO_FIELDS
    assert (exchange["name"], exchange["state"], exchange["forced"]) == ("exchange", CLOSED, False)
    assert (exchange["consecutive_failures"], exchange["window_calls"], exchange["window_failures"]) == (2, 5, 2)
    assert (exchange["generation"], exchange["trials"], exchange["successes"]) == (0, 0, 0)
    assert exchange["window_ms"] == DEFAULT_WINDOW_MS and exchange["transitions"] == []
    assert before <= exchange["since_ms"] and exchange["age_ms"] >= 0
    assert (feed["name"], feed["state"], feed["forced"], feed["generation"]) == ("feed", OPEN, False, 1)
    assert (feed["consecutive_failures"], feed["window_calls"], feed["window_failures"]) == (1, 1, 1)
    # and the tripped one's latest transition, with its reason, at the time it entered its state
    (last,) = feed["transitions"]
    assert last == {"time_ms": feed["since_ms"], "old_state": CLOSED, "new_state": OPEN,
                    "reason": "1 consecutive failures"}


def test_list_table_has_a_row_per_breaker(redis_url, keys) -> None:
    # Given two breakers, one tripped
    report(redis_url, keys, "exchange", (5, 2, 2, 0, 0), failure_threshold=3)
    report(redis_url, keys, "feed", (1, 1, 1, 0, 0), failure_threshold=1)

    # When they are listed
    result = fabric_breaker(redis_url, keys, "list")

    # Then a header and one row each, with state, counts and the latest transition's reason
    assert result.exit_code == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "FOR"] and "LAST TRANSITION" in header
    assert len(rows) == 2
    assert rows[0].split()[:2] == ["exchange", CLOSED] and rows[0].split()[3:6] == ["2", "5", "2"]
    assert rows[1].split()[:2] == ["feed", OPEN] and rows[1].endswith("OPEN: 1 consecutive failures")


def test_list_with_no_breakers_says_so(redis_url, keys) -> None:
    # Given a namespace no breaker has been used in
    # When listed as a table and as JSON
    text = fabric_breaker(redis_url, keys, "list")
    listed = parsed(fabric_breaker(redis_url, keys, "list", "--json"))

    # Then the table says there are none, and JSON is an empty list
    assert text.exit_code == 0 and text.stdout.startswith("(no breakers")
    assert listed == []


def test_show_json_lists_the_latest_transitions_of_that_breaker_newest_first(redis_url, keys) -> None:
    # Given a breaker that went round CLOSED → OPEN → HALF_OPEN → CLOSED, and another one's transition after
    cycle(redis_url, keys, "exchange")
    report(redis_url, keys, "feed", (1, 1, 1, 0, 0), failure_threshold=1)

    # When it is shown as JSON
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))

    # Then it is closed after 3 transitions, which are listed newest first, the other breaker's left out
    assert set(info) == INFO_FIELDS
    assert (info["name"], info["state"], info["forced"], info["generation"]) == ("exchange", CLOSED, False, 3)
    moves = [(t["old_state"], t["new_state"]) for t in info["transitions"]]
    assert moves == [(HALF_OPEN, CLOSED), (OPEN, HALF_OPEN), (CLOSED, OPEN)]
    assert info["transitions"][0]["reason"] == "1 trial calls succeeded"
    assert info["transitions"][0]["time_ms"] == info["since_ms"]
    times = [t["time_ms"] for t in info["transitions"]]
    assert times == sorted(times, reverse=True)


def test_show_table_has_the_state_counts_and_transitions(redis_url, keys) -> None:
    # Given a tripped breaker
    report(redis_url, keys, "feed", (3, 3, 3, 0, 0), failure_threshold=3)

    # When it is shown
    result = fabric_breaker(redis_url, keys, "show", "feed")

    # Then its fields are named one a line, then its transitions as a table
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = {line[:22].strip(): line[22:].strip() for line in lines[: lines.index("")]}
    assert fields["name"] == "feed" and fields["state"] == OPEN
    assert fields["consecutive failures"] == "3" and fields["window (10.0s)"] == "3 calls, 3 failed"
    assert fields["transitions so far"] == "1" and fields["since"].endswith("ago)")
    header, row = lines[lines.index("") + 1 :]
    assert header.split() == ["TIME", "FROM", "TO", "REASON"]
    assert row.split()[2:] == [CLOSED, OPEN, "3", "consecutive", "failures"]


def test_show_changes_nothing_in_redis(redis_url, keys) -> None:
    # Given a breaker with counts, whose window also holds a bucket long expired
    report(redis_url, keys, "exchange", (5, 2, 2, 0, 0), failure_threshold=3)

    async def snapshot(client: Any) -> tuple[Any, ...]:
        await client.hset(keys.breaker_window("exchange"), mapping={"1000": 7, "1000:f": 7})
        return await dump(client)

    async def dump(client: Any) -> tuple[Any, ...]:
        return (await client.hgetall(keys.breaker("exchange")), await client.hgetall(keys.breaker_window("exchange")),
                await client.xlen(keys.breaker_events()))

    before = with_redis(redis_url, snapshot)

    # When it is shown
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))

    # Then the expired bucket is not counted, and the state, the window and the system stream are as they were
    assert (info["window_calls"], info["window_failures"]) == (5, 2)
    assert with_redis(redis_url, dump) == before


def test_window_counts_cover_the_config_files_window(redis_url, keys, tmp_path) -> None:
    # Given a breaker whose only window bucket is 5 s old, and a config file giving it a 2 s window
    report(redis_url, keys, "exchange", (1, 0, 0, 0, 0))
    five_s_ago = redis_now_ms(redis_url) // 1000 - 5

    async def age_bucket(client: Any) -> None:
        await client.delete(keys.breaker_window("exchange"))
        await client.hset(keys.breaker_window("exchange"), mapping={str(five_s_ago): 4, f"{five_s_ago}:f": 1})

    with_redis(redis_url, age_bucket)
    config = tmp_path / "fabric.toml"
    config.write_text("[breakers.exchange]\nwindow_ms = 2000\n")

    # When it is shown without and with the config file
    default = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    configured = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json", "--config", str(config)))

    # Then the default 10 s window counts the bucket, the configured 2 s one does not
    assert (default["window_ms"], default["window_calls"], default["window_failures"]) == (DEFAULT_WINDOW_MS, 4, 1)
    assert (configured["window_ms"], configured["window_calls"], configured["window_failures"]) == (2000, 0, 0)


@pytest.mark.parametrize("command", ["show", "open", "close", "reset"])
def test_an_unknown_breaker_exits_5(redis_url, keys, command) -> None:
    # Given a namespace where only "exchange" is in use
    report(redis_url, keys, "exchange", (1, 0, 0, 0, 0))

    # When a breaker nobody used is named
    result = fabric_breaker(redis_url, keys, command, "nope")

    # Then one line says so and how to list those in use, exit 5, and nothing was created
    line = one_error_line(result, 5)
    assert "no breaker 'nope'" in line and "fabric breaker list" in line
    assert [b["name"] for b in parsed(fabric_breaker(redis_url, keys, "list", "--json"))] == ["exchange"]


# ---- open, close, reset ------------------------------------------------------------------------------------


def test_open_forces_it_open_and_show_says_so_with_the_reason(redis_url, keys) -> None:
    # Given a closed breaker
    report(redis_url, keys, "exchange", (1, 0, 0, 0, 0))

    # When it is forced open, with a reason
    opened = parsed(fabric_breaker(redis_url, keys, "open", "exchange", "--reason", "exchange maintenance", "--json"))

    # Then the command reports it open and forced, and show agrees, with the reason in its latest transition
    assert opened == {"name": "exchange", "state": OPEN, "forced": True, "generation": 1,
                      "reason": "exchange maintenance"}
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    assert (info["state"], info["forced"], info["generation"]) == (OPEN, True, 1)
    latest = info["transitions"][0]
    assert (latest["old_state"], latest["new_state"], latest["reason"]) == (CLOSED, OPEN, "exchange maintenance")


def test_open_prints_one_line_and_records_who_by_default(redis_url, keys) -> None:
    # Given a closed breaker
    report(redis_url, keys, "exchange", (1, 0, 0, 0, 0))

    # When it is forced open without a reason
    result = fabric_breaker(redis_url, keys, "open", "exchange")

    # Then one line gives the new state and how to undo it, and the reason names the command, user and host
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "exchange: OPEN (forced: no calls until `fabric breaker close exchange`)\n"
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    reason = info["transitions"][0]["reason"]
    assert reason.startswith("forced open by fabric breaker open (") and "@" in reason


def test_close_closes_a_forced_open_breaker(redis_url, keys) -> None:
    # Given a breaker forced open
    report(redis_url, keys, "exchange", (1, 0, 0, 0, 0))
    parsed(fabric_breaker(redis_url, keys, "open", "exchange", "--json"))

    # When it is closed
    result = fabric_breaker(redis_url, keys, "close", "exchange")

    # Then it is closed and no longer forced, after a transition that says who closed it
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "exchange: CLOSED\n"
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    assert (info["state"], info["forced"], info["generation"]) == (CLOSED, False, 2)
    latest = info["transitions"][0]
    assert (latest["old_state"], latest["new_state"]) == (OPEN, CLOSED)
    assert latest["reason"].startswith("forced closed by fabric breaker close (")


def test_reset_closes_it_and_clears_its_counts(redis_url, keys) -> None:
    # Given a tripped breaker with failures counted in its window
    report(redis_url, keys, "exchange", (5, 3, 3, 0, 0), failure_threshold=3)
    before = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    assert (before["state"], before["consecutive_failures"], before["window_failures"]) == (OPEN, 3, 3)

    # When it is reset
    reset = parsed(fabric_breaker(redis_url, keys, "reset", "exchange", "--json"))

    # Then it is closed with no failures counted, consecutive or in the window
    assert (reset["state"], reset["forced"]) == (CLOSED, False)
    info = parsed(fabric_breaker(redis_url, keys, "show", "exchange", "--json"))
    assert info["state"] == CLOSED
    assert (info["consecutive_failures"], info["window_calls"], info["window_failures"]) == (0, 0, 0)
    assert info["transitions"][0]["reason"].startswith("reset by fabric breaker reset (")


# ---- a running worker follows the command line -------------------------------------------------------------

GROUP = "g"
WORKER_CONFIG = """
[breakers.exchange]
failure_threshold = 5

[workers.w]
handler = "tests.fixtures.handlers:record"
processes = 1
group = "g"
topics = ["tick"]
block_ms = 100
discover_interval_ms = 200    # longer than block_ms: two discoveries apart, a read in flight has returned
breakers = ["exchange"]
"""


class Operator:
    """A ``fabric worker --config`` process guarded by breaker "exchange", and ``fabric breaker`` commands run as
    an operator runs them: each its own process."""

    def __init__(self, redis_url: str, keys: Keys, tmp_path: Path) -> None:
        self.redis_url, self.keys = redis_url, keys
        self.env = subprocess_env(redis_url, keys.ns)
        config = tmp_path / "fabric.toml"
        config.write_text(WORKER_CONFIG)
        self.log = tmp_path / "worker.log"
        self._out: IO[bytes] = self.log.open("wb")
        self.worker = subprocess.Popen(
            fabric_cmd("worker", "--config", str(config), "--redis-url", redis_url, "--namespace", keys.ns),
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out)

    async def breaker(self, *args: str) -> str:
        """Run ``fabric breaker ARGS``; return its stdout after checking it exited 0."""
        done = await asyncio.to_thread(
            subprocess.run, fabric_cmd("breaker", *args, "--redis-url", self.redis_url, "--namespace", self.keys.ns),
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done.stdout

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()
        self._out.close()


@pytest.fixture
def operator(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(redis_url, keys, tmp_path)
    try:
        yield op
    finally:
        op.close()


async def publish(redis: Any, keys: Keys, n: int, symbol: str = "A") -> set[str]:
    events = [Tick(symbol=symbol, bid=1.0, ask=2.0) for _ in range(n)]
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many(events)
    return {e.event_id for e in events}


async def handled(redis: Any, keys: Keys) -> set[str]:
    return {parse_record(r)[0] for r in await redis.lrange(handled_key(keys.ns), 0, -1)}


async def discovered(redis: Any, keys: Keys, symbol: str) -> set[str]:
    """Publish a tick of a new symbol and wait for the worker's discovery loop to join the group on its stream:
    proof that the worker process is alive and its loops run. Return the tick's id."""
    published = await publish(redis, keys, 1, symbol)
    stream = keys.stream("tick", Tick.default_priority, symbol)

    async def joined() -> bool:
        return any(g["name"] == GROUP.encode() for g in await redis.xinfo_groups(stream))

    await eventually(joined, what=f"the worker to join the group on {symbol}'s stream")
    return published


async def lag(redis: Any, keys: Keys, symbol: str) -> int:
    (group,) = await redis.xinfo_groups(keys.stream("tick", Tick.default_priority, symbol))
    return int(group["lag"])


async def test_forcing_a_breaker_from_the_cli_takes_effect_in_a_running_worker(redis, keys, operator) -> None:
    # Given a running `fabric worker` process whose handler is guarded by breaker "exchange", handling events
    first = await publish(redis, keys, 5)
    await eventually(lambda: _contains(handled(redis, keys), first), what="the first events handled")

    # When an operator forces the breaker open
    said = await operator.breaker("open", "exchange", "--reason", "exchange maintenance")
    assert said.startswith("exchange: OPEN (forced")

    # Then the worker's view follows (it logs the change), and once two of its discovery rounds have passed (a read
    # in flight when the view changed has returned by then), events published meanwhile are neither read nor handled
    # while further rounds pass
    await eventually(lambda: _says(operator, "breaker exchange: OPEN (forced)"), what="the worker's view to open")
    witnesses = await discovered(redis, keys, "W1") | await discovered(redis, keys, "W2")
    later = await publish(redis, keys, 20)
    witnesses |= await discovered(redis, keys, "W3") | await discovered(redis, keys, "W4")
    assert not (await handled(redis, keys)) & (later | witnesses), "the handler was called while forced open"
    assert await lag(redis, keys, "A") == len(later), "the worker read entries while forced open"

    # When the operator closes it
    said = await operator.breaker("close", "exchange")
    assert said == "exchange: CLOSED\n"

    # Then the worker reads and calls again: every event is handled
    await eventually(lambda: _says(operator, "breaker exchange: CLOSED"), what="the worker's view to close")
    everything = first | later | witnesses
    await eventually(lambda: _contains(handled(redis, keys), everything), what="every event handled after close")
    assert await lag(redis, keys, "A") == 0

    # and the worker still drains and exits 0 on SIGTERM, without a traceback
    operator.worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(operator.worker.wait, 30) == 0, operator.output()
    assert "Traceback" not in operator.output()


async def _contains(found: Any, wanted: set[str]) -> bool:
    return wanted <= await found


async def _says(operator: Operator, text: str) -> bool:
    return text in operator.output()
