"""``fabric worker --processes N`` and ``--config FILE``: a supervisor of worker processes under real signals.

The supervisor runs as a subprocess, as a user would start it; its log (with its children's, relayed line by
line) goes to a file, where ``started worker LABEL (pid N, consumer C)`` lines name the children. What was
handled is recorded in Redis by ``tests/fixtures/handlers.py``; Redis's own bookkeeping (XPENDING, the group's
last delivered id) is checked against what was published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from redis.exceptions import ResponseError
from typer.testing import CliRunner

import fabric.cli
from fabric.errors import ConfigError
from fabric.keys import Keys, check_name
from fabric.supervisor import Program, Supervisor, consumer_name, describe
from fabric.worker import RELEASE_IDLE_MS
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import handled_key, subprocess_env
from tests.test_processes import GROUP, all_entries, pending, publish_ticks, records, undelivered
from tests.waiting import eventually

SHUTDOWN_DEADLINE_S = 30.0
"""A deadline for the supervisor to exit, far above its children's grace; not a timing threshold under test."""
FAULTS = ("Traceback", "Task was destroyed", "never awaited", "Exception ignored")
STARTED = re.compile(r"started worker (?P<label>\S+) \(pid (?P<pid>\d+), consumer (?P<consumer>\S+)\)")


@dataclass(frozen=True)
class Child:
    """A worker process the supervisor said it started."""

    label: str
    pid: int
    consumer: str


class SupervisorProcess:
    """``fabric worker ...`` as a subprocess; its stdout and stderr go to a file (a pipe could fill and block it)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(fabric_cmd("worker", *args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._out)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def children(self) -> list[Child]:
        """Every child started so far, in order (restarts included)."""
        return [Child(m["label"], int(m["pid"]), m["consumer"]) for m in STARTED.finditer(self.output())]

    async def started(self, n: int) -> list[Child]:
        async def enough() -> list[Child]:
            found = self.children()
            return found if len(found) >= n else []

        return await eventually(enough, what=f"{n} worker processes started")

    async def exit_code(self, timeout_s: float = SHUTDOWN_DEADLINE_S) -> int:
        """Wait for the supervisor to end; fail with its output if it is still running at the deadline."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout_s}s:\n{self.output()}") from None

    def assert_clean(self) -> None:
        out = self.output()
        for fault in FAULTS:
            assert fault not in out, f"{fault!r} in the supervisor's output:\n{out}"

    def close(self) -> None:
        """Kill whatever is left: the supervisor's process group would not include its children (own sessions)."""
        for child in self.children():
            _kill(child.pid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def supervise(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Any]:
    """Start ``fabric worker ARGS`` in the test's namespace; the supervisor and its children die at teardown."""
    started: list[SupervisorProcess] = []

    def start(*args: str, sleep_ms: int = 20) -> SupervisorProcess:
        env = subprocess_env(redis_url, keys.ns, FABRIC_TEST_SLEEP_MS=str(sleep_ms))
        sup = SupervisorProcess([*args, "--namespace", keys.ns, "--redis-url", redis_url], env,
                                tmp_path / f"supervisor-{len(started)}.log")
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.close()


def handler_args(handler: str = "slow_record", processes: int = 3) -> list[str]:
    return [f"tests.fixtures.handlers:{handler}", "--topic", "tick", "--group", GROUP, "--processes", str(processes),
            "--reclaim-idle-ms", "1000", "--block-ms", "100", "--concurrency", "4"]


async def handled_by(redis: Any, keys: Keys) -> Counter[int]:
    """How many events each process has handled, by pid."""
    return Counter(r[1] for r in await records(redis, keys.ns))


# ---- scaling and signals, through real processes -----------------------------------------------------------


@pytest.mark.real_only
async def test_a_killed_worker_process_is_restarted_under_a_fresh_name_and_nothing_is_lost(
        redis, keys, supervise) -> None:
    # Given a supervisor of 3 worker processes working through 3000 ticks over 10 symbols
    published = await publish_ticks(redis, keys, 3000)
    sup = supervise(*handler_args())
    children = await sup.started(3)

    async def one_mid_batch() -> Child | None:
        counts = await handled_by(redis, keys)
        busy = [c for c in children if counts[c.pid] >= 50 and await pending(redis, keys, c.consumer)]
        return busy[0] if busy and sum(1 for c in children if counts[c.pid]) >= 2 else None

    victim = await eventually(one_mid_batch, what="a worker process holding unacked entries, another handling")

    # When one of them is killed outright
    os.kill(victim.pid, signal.SIGKILL)
    held = await pending(redis, keys, victim.consumer)
    assert held, "the victim died holding entries it had been delivered and not acked"

    # Then the supervisor says so, and starts a fresh process in its slot under a new consumer name
    async def replaced() -> Child | None:
        fresh = [c for c in sup.children() if c.label == victim.label and c.pid != victim.pid]
        return fresh[0] if fresh else None

    successor = await eventually(replaced, what=f"a new process in slot {victim.label}")
    assert successor.consumer != victim.consumer
    assert (f"worker {victim.label} (pid {victim.pid}, consumer {victim.consumer}) died: killed by SIGKILL; "
            "restarting in") in sup.output()

    # and every published event is handled, and nothing stays pending
    async def all_handled_and_acked() -> bool:
        handled = {r[0] for r in await records(redis, keys.ns)}
        return handled >= published and not await pending(redis, keys)

    await eventually(all_handled_and_acked, timeout_s=60, what="every event handled and acked")
    rs = await records(redis, keys.ns)
    assert {r[0] for r in rs} == published

    # and only what the victim held was handled twice
    twice = {event_id for event_id, n in Counter(r[0] for r in rs).items() if n > 1}
    twice_entries = {(r[2], r[3]) for r in rs if r[0] in twice}
    assert twice_entries <= held, f"{len(twice_entries - held)} entries the victim did not hold were handled twice"

    # and the supervisor is still running, and stops cleanly on SIGTERM
    assert sup.proc.poll() is None, sup.output()
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0, sup.output()
    sup.assert_clean()


@pytest.mark.real_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_to_the_supervisor_drains_every_worker_and_exits_0(redis, keys, supervise, sig) -> None:
    # Given a supervisor of 3 worker processes in the middle of a backlog of 3000 ticks
    published = await publish_ticks(redis, keys, 3000)
    sup = supervise(*handler_args())
    children = await sup.started(3)

    async def all_joined_some_handled() -> bool:
        joined = sup.output().count("fabric.worker: joined group") == 3
        return joined and await redis.llen(handled_key(keys.ns)) >= 100

    await eventually(all_joined_some_handled, what="3 workers joined, 100 events handled")

    # When the supervisor is told to stop
    sup.proc.send_signal(sig)

    # Then every worker drains and the supervisor exits 0, leaving no worker process behind
    assert await sup.exit_code() == 0, sup.output()
    sup.assert_clean()
    assert f"{sig.name}: draining 3 workers" in sup.output()
    assert not [c for c in children if _alive(c.pid)], "a worker process outlived its supervisor"
    assert len(sup.children()) == 3, f"a worker was restarted while draining:\n{sup.output()}"

    # and no event was handled twice, and the backlog was not finished before the signal
    rs = await records(redis, keys.ns)
    handled_ids = [r[0] for r in rs]
    assert len(handled_ids) == len(set(handled_ids)), "an event was handled twice"
    assert set(handled_ids) < published, "the whole backlog was handled: the signal came too late to test"

    # and every entry is accounted for: handled entries are exactly the acked ones; the rest were handed back
    # to the group (pending) or never read
    entries = await all_entries(redis, keys)
    still_pending = await pending(redis, keys)
    not_read = await undelivered(redis, keys)
    acked = entries - still_pending - not_read
    assert {(r[2], r[3]) for r in rs} == acked
    assert len(acked) + len(still_pending) + len(not_read) == len(published)


@pytest.mark.real_only
async def test_a_second_signal_stops_every_worker_at_once_and_exits_1(redis, keys, supervise) -> None:
    # Given a supervisor of 2 processes draining after a first SIGTERM, their handlers stuck, with a long grace
    await publish_ticks(redis, keys, 4, symbols=1)
    sup = supervise("tests.fixtures.handlers:gated_record", "--topic", "tick", "--group", GROUP, "--processes", "2",
                    "--block-ms", "100", "--grace-s", "600")
    children = await sup.started(2)

    async def joined_and_delivered() -> bool:
        return sup.output().count("fabric.worker: joined group") == 2 and len(await pending(redis, keys)) == 4

    await eventually(joined_and_delivered, what="both workers joined, 4 entries delivered")
    sup.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        return sup.output().count("fabric.runner: SIGTERM: draining") == 2

    await eventually(draining, what="both workers to log that they are draining")

    # When a second SIGTERM arrives
    sup.proc.send_signal(signal.SIGTERM)

    # Then the supervisor exits 1 long before the grace, leaving no worker behind and the unfinished entries
    # pending for the group
    assert await sup.exit_code() == 1, sup.output()
    sup.assert_clean()
    assert not [c for c in children if _alive(c.pid)], "a worker process outlived its supervisor"
    assert len(await pending(redis, keys)) == 4
    assert not await records(redis, keys.ns)


@pytest.mark.real_only
async def test_a_config_file_entry_runs_its_processes_and_they_share_the_work(redis, keys, supervise, tmp_path) -> None:
    # Given a backlog of 400 ticks, and a config file with one [workers.quotes] table of 2 processes that each
    # take a few entries at a time and work on each a while
    published = await publish_ticks(redis, keys, 400)
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[workers.quotes]\nhandler = "tests.fixtures.handlers:slow_record"\nprocesses = 2\n'
        f'group = "{GROUP}"\ntopics = ["tick"]\nconcurrency = 4\nprefetch = 10\nblock_ms = 100\n'
        'reclaim_idle_ms = 1000\n'
    )

    # When `fabric worker --config FILE` runs it
    sup = supervise("--config", str(config))
    children = await sup.started(2)

    # Then every event is handled and acked
    async def all_handled_and_acked() -> bool:
        return {r[0] for r in await records(redis, keys.ns)} >= published and not await pending(redis, keys)

    await eventually(all_handled_and_acked, timeout_s=60, what="every event handled and acked")

    # by two processes with distinct consumer names, which both took part
    assert sorted(c.label for c in children) == ["quotes[0]", "quotes[1]"]
    assert len({c.consumer for c in children}) == 2
    assert set(await handled_by(redis, keys)) == {c.pid for c in children}

    # and SIGTERM stops it with exit 0
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0, sup.output()
    sup.assert_clean()


async def consumer_states(redis: Any, keys: Keys) -> dict[str, tuple[int, int]]:
    """Consumer name -> (pending, smallest idle ms) over the topic's streams."""
    states: dict[str, tuple[int, int]] = {}
    for stream in await all_streams(redis, keys):
        try:
            consumers = await redis.xinfo_consumers(stream, GROUP)
        except ResponseError:  # the workers have not created the group yet
            continue
        for c in consumers:
            name = c["name"].decode()
            pending_n, idle = states.get(name, (0, 1 << 62))
            states[name] = (pending_n + int(c["pending"]), min(idle, int(c["idle"])))
    return states


async def all_streams(redis: Any, keys: Keys) -> list[str]:
    return sorted(s.decode() for s in await redis.smembers(keys.topic_registry("tick")))


@pytest.mark.real_only
async def test_a_dead_processs_consumer_is_retired_only_once_its_pending_entries_were_taken_over(
        redis, keys, supervise, tmp_path) -> None:
    # Given 2 worker processes that retire consumers idle 300 ms with nothing pending, and take over entries idle
    # 1.5 s: a dead consumer is idle past the retire limit for a while before its entries can be taken over
    published = await publish_ticks(redis, keys, 400, symbols=1)
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[workers.quotes]\nhandler = "tests.fixtures.handlers:slow_record"\nprocesses = 2\n'
        f'group = "{GROUP}"\ntopics = ["tick"]\nconcurrency = 4\nprefetch = 50\nblock_ms = 100\n'
        'reclaim_idle_ms = 1500\nretire_idle_ms = 300\nretire_interval_ms = 50\n'
    )
    sup = supervise("--config", str(config))
    children = await sup.started(2)

    async def holding() -> Child | None:
        states = await consumer_states(redis, keys)
        busy = [c for c in children if states.get(c.consumer, (0, 0))[0] > 0]
        return busy[0] if busy else None

    victim = await eventually(holding, what="a worker process holding entries")

    # When it is killed outright
    os.kill(victim.pid, signal.SIGKILL)

    # Then, idle past the retire limit (and past several sweeps) while it still holds entries, it stays
    async def idle_but_holding() -> tuple[int, int] | None:
        state = (await consumer_states(redis, keys)).get(victim.consumer)
        assert state is not None, "a consumer holding entries was retired"
        return state if state[1] >= 600 and state[0] > 0 else None

    await eventually(idle_but_holding, what="the dead consumer idle 600 ms, still holding entries")

    # and once the living took its entries over, it is removed from the group
    async def retired() -> bool:
        return victim.consumer not in await consumer_states(redis, keys)

    await eventually(retired, timeout_s=30, what="the dead consumer retired")

    # and nothing was lost: every event handled, nothing pending
    async def all_handled_and_acked() -> bool:
        return {r[0] for r in await records(redis, keys.ns)} >= published and not await pending(redis, keys)

    await eventually(all_handled_and_acked, timeout_s=60, what="every event handled and acked")
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0, sup.output()


@pytest.mark.real_only
async def test_workers_drain_and_exit_when_their_supervisor_is_killed(redis, keys, supervise) -> None:
    # Given a supervisor of 2 worker processes in the middle of a backlog
    await publish_ticks(redis, keys, 2000)
    sup = supervise(*handler_args(processes=2))
    children = await sup.started(2)

    async def both_handling() -> bool:
        counts = await handled_by(redis, keys)
        return all(counts[c.pid] > 0 for c in children)

    await eventually(both_handling, what="both processes handling")

    # When the supervisor itself is killed outright (its children live in sessions of their own)
    sup.proc.kill()
    sup.proc.wait()

    # Then each child is told (Linux's parent-death signal), drains and exits instead of running on unsupervised
    async def all_gone() -> bool:
        return not any(_alive(c.pid) for c in children)

    await eventually(all_gone, timeout_s=30, what="the orphaned workers to exit")

    # and what they held was handed back to the group (marked idle a day, so any live worker takes it over at once)
    for stream in await all_streams(redis, keys):
        for child in children:
            held = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10_000,
                                              consumername=child.consumer)
            assert all(p["time_since_delivered"] >= RELEASE_IDLE_MS for p in held), f"{child.label} kept entries"


@pytest.mark.real_only
async def test_the_redis_url_reaches_children_in_their_environment_not_on_their_command_line(
        redis, redis_url, keys, supervise) -> None:
    # Given a supervisor of 2 worker processes, given the URL on its own command line
    sup = supervise(*handler_args(processes=2))
    children = await sup.started(2)

    # Then no child's command line carries it (`ps` would show a password to every user of the host)
    for child in children:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert redis_url not in cmdline and "--redis-url" not in cmdline, cmdline

    # and the children work against it all the same
    published = await publish_ticks(redis, keys, 50)

    async def all_handled() -> bool:
        return {r[0] for r in await records(redis, keys.ns)} >= published

    await eventually(all_handled, what="every event handled")
    sup.proc.send_signal(signal.SIGTERM)
    assert await sup.exit_code() == 0, sup.output()


# ---- what never starts -------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """A CliRunner; the root logger's handlers are put back afterwards (the worker command configures logging
    onto the runner's stderr, which does not outlive the call)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        yield CliRunner()
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def assert_one_error_line(stderr: str, *parts: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"want one error line:\n{stderr}"
    assert "Traceback" not in stderr and "started worker" not in stderr, stderr
    assert all(p in lines[0] for p in parts), f"{parts} not all in: {lines[0]}"
    return lines[0]


@pytest.mark.real_only
def test_a_handler_that_cannot_be_imported_stops_the_supervisor_before_any_process_starts(
        cli, redis_url, keys) -> None:
    # Given 3 processes of a handler whose module does not exist
    args = ["worker", "no.such.module:fn", "--topic", "tick", "--group", GROUP, "--processes", "3",
            "--namespace", keys.ns, "--redis-url", redis_url]

    # When the supervisor is started
    result = cli.invoke(fabric.cli.app, args)

    # Then it exits 2 with one error line naming the module, and starts nothing
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "no.such.module", "PYTHONPATH")


@pytest.mark.real_only
async def test_a_process_that_exits_2_at_start_fails_the_supervisor_without_a_restart_loop(
        redis_url, keys, caplog, capsys) -> None:
    # Given a supervisor whose 2 processes are `fabric worker` children that cannot import their handler
    def argv(consumer: str) -> list[str]:
        return fabric_cmd("worker", "no.such.module:fn", "--topic", "tick", "--group", GROUP, "--consumer", consumer,
                          "--namespace", keys.ns, "--redis-url", redis_url)

    supervisor = Supervisor([Program("broken", 2, argv)], backoff_base_s=0.01)

    # When it runs
    with caplog.at_level(logging.INFO, logger="fabric.supervisor"), pytest.raises(ConfigError) as info:
        await asyncio.wait_for(supervisor.run(), SHUTDOWN_DEADLINE_S)

    # Then it fails with the child's own error, having started each process once and restarted none
    assert "could not start" in str(info.value) and "no.such.module" in str(info.value)
    started = [r for r in caplog.records if r.getMessage().startswith("started worker")]
    assert len(started) == 2, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if "restarting" in r.getMessage()]

    # and the child's own error line was relayed under its label, not as an error line of its own (the other
    # child may have been stopped before it got as far)
    err = capsys.readouterr().err
    assert re.search(r"^broken\[[01]\]: error: cannot import 'no.such.module'", err, re.MULTILINE), err
    assert not [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("concurrency = 0", "workers.x.concurrency: must be at least 1"),
        ("breakers_list = 3", "workers.x.breakers_list: unknown field"),
        ("processes = 0", "workers.x.processes: must be at least 1"),
    ],
    ids=["concurrency-0", "unknown-field", "processes-0"],
)
def test_a_bad_config_file_exits_2_naming_the_field_and_starts_nothing(cli, redis_url, keys, tmp_path, table,
                                                                      named) -> None:
    # Given a [workers.x] table with one bad field
    config = tmp_path / "bad.toml"
    config.write_text(f'[workers.x]\nhandler = "tests.fixtures.handlers:record"\ngroup = "g"\ntopics = ["tick"]\n'
                      f"{table}\n")

    # When `fabric worker --config FILE` is started
    result = cli.invoke(fabric.cli.app, ["worker", "--config", str(config), "--namespace", keys.ns,
                                         "--redis-url", redis_url])

    # Then it exits 2 with one line naming the file, the worker and the field, and starts nothing
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, f"{config}: {named}")


def test_a_config_file_handler_that_cannot_be_imported_exits_2_naming_it(cli, redis_url, keys, tmp_path) -> None:
    # Given a config file with a good table and one whose handler module does not exist
    config = tmp_path / "bad.toml"
    config.write_text('[workers.good]\nhandler = "tests.fixtures.handlers:record"\ngroup = "g"\ntopics = ["tick"]\n'
                      '[workers.bad]\nhandler = "no.such.module:fn"\ngroup = "h"\ntopics = ["tick"]\n')

    # When the file's workers are started
    result = cli.invoke(fabric.cli.app, ["worker", "--config", str(config), "--namespace", keys.ns,
                                         "--redis-url", redis_url])

    # Then it exits 2 naming the table's handler field and the module, and starts nothing (not even the good one)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, f"{config}: workers.bad.handler:", "no.such.module")


def test_only_naming_a_missing_table_exits_2_listing_the_tables(cli, redis_url, keys) -> None:
    result = cli.invoke(fabric.cli.app, ["worker", "--config", str(ROOT / "config" / "example.toml"),
                                         "--only", "nope", "--namespace", keys.ns, "--redis-url", redis_url])
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, "[workers.nope]", "indicators")


# ---- the supervisor's own rules ----------------------------------------------------------------------------


async def test_a_process_that_keeps_dying_is_restarted_with_doubling_backoff_up_to_the_cap(caplog) -> None:
    # Given a supervisor of a process that exits 1 at once, every time
    def argv(consumer: str) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(1)"]

    supervisor = Supervisor([Program("flaky", 1, argv)], backoff_base_s=0.01, backoff_max_s=0.04)
    running = asyncio.create_task(supervisor.run())

    # When it has died 5 times
    def deaths() -> list[str]:
        return [r.getMessage() for r in caplog.records if "died" in r.getMessage()]

    async def five() -> list[str]:
        return deaths() if len(deaths()) >= 5 else []

    with caplog.at_level(logging.INFO, logger="fabric.supervisor"):
        await eventually(five, what="5 deaths")
        supervisor.forward(signal.SIGTERM)
        drained = await asyncio.wait_for(running, SHUTDOWN_DEADLINE_S)

    # Then each death was said in one line with its cause, and the delay doubled up to the cap
    delays = [re.search(r"restarting in (\S+)s$", d)[1] for d in deaths()[:5]]  # type: ignore[index]
    assert delays == ["0.01", "0.02", "0.04", "0.04", "0.04"], deaths()
    assert all("exited 1" in d and "consumer " in d for d in deaths())
    # and a stop while it waits to restart ends it cleanly
    assert drained


def test_consumer_names_are_distinct_per_slot_and_restart_and_always_valid() -> None:
    names = {consumer_name("indicators", slot, gen) for slot in range(3) for gen in range(3)}
    assert len(names) == 9
    assert all(str(os.getpid()) in n for n in names)
    longest = consumer_name("w" * 40, 999, 99_999)
    assert len(longest) <= 100 and check_name("consumer", longest)


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe(3) == "exited 3"
    assert describe(-signal.SIGKILL) == "killed by SIGKILL"
