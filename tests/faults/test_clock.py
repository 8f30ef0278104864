"""Clock skew on worker hosts: no premature reclaim, nothing lost, whatever the workers' clocks say.

What fabric times, and on which clock: whether an entry is abandoned is Redis's own idle time (XAUTOCLAIM
min-idle), kept fresh by heartbeats the worker paces on its monotonic clock; breakers, failure records and dead
letters are stamped with Redis TIME inside their scripts (``breaker.lua``, ``fail.lua``, ``deadletter.lua``), so
processes agree on a breaker whatever their clocks (``tests/test_breaker_processes.py`` shows it with skewed
processes). Only event ids, ``ts_ns`` (latency figures) and producer session ids use the wall clock.

Two workers share a group here; each handler call takes longer than ``reclaim_idle_ms``, so an entry survives
only if its holder's heartbeats keep it fresh. The clocks are skewed two ways: with libfaketime (every clock
of the process, C libraries included, shifted by hours) and with an injected wall clock that steps back and
forth by an hour mid-run (as NTP stepping a clock does; monotonic clocks never step). The handler
(``flaky_record``) notes each call's own clock beside Redis's, which shows the skew was in force.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from fabric.client import connect
from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from tests.conftest import ROOT, RedisServer, fabric_cmd
from tests.faults.checker import Handling, Journal, Score, read_dead_letters, read_journals, score
from tests.fixtures.handlers import Call, calls_key, handled_key, parse_record, subprocess_env
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)

TOPIC = "tick"
GROUP = "g"
RECLAIM_IDLE_MS = 1000
HANDLER_MS = 1500
"""Each call outlasts reclaim_idle_ms: only heartbeats keep the entry from being reclaimed."""
EVENTS = 16
HOUR_MS = 3_600_000
EXIT_DEADLINE_S = 30.0
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
"""Preloaded into the process itself (the ``faketime`` wrapper would stand between the test and its signals)."""

CLOCK = '''"""An injected wall clock: time.time and time.time_ns shifted by the seconds in $FAULTS_CLOCK_FILE, read at
each call, so the test can step it mid-run."""
import os
import time

_path = os.environ["FAULTS_CLOCK_FILE"]
_time, _time_ns = time.time, time.time_ns


def _offset_s():
    try:
        with open(_path) as f:
            return float(f.read() or 0)
    except (OSError, ValueError):
        return 0.0


time.time = lambda: _time() + _offset_s()
time.time_ns = lambda: _time_ns() + int(_offset_s() * 1e9)
'''


class Worker:
    """A ``fabric worker`` process running ``flaky_record``."""

    def __init__(self, env: dict[str, str], url: str, ns: str, name: str, log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        argv = [*fabric_cmd(
            "worker", "tests.fixtures.handlers:flaky_record", "--topic", TOPIC, "--group", GROUP, "--consumer", name,
            "--namespace", ns, "--redis-url", url, "--reclaim-idle-ms", str(RECLAIM_IDLE_MS), "--block-ms", "100",
            "--concurrency", "8")]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._out)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    async def stop(self) -> None:
        """SIGTERM: drain and exit 0."""
        self.proc.terminate()
        code = await asyncio.to_thread(self.proc.wait, EXIT_DEADLINE_S)
        assert code == 0, self.output()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def ns() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def direct(redis_server: RedisServer) -> Any:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def spawn(redis_server: RedisServer, ns: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Worker] = []

    def start(name: str, *, path: str = "", **env: str) -> Worker:
        environ = subprocess_env(redis_server.url, ns, FABRIC_TEST_SLEEP_MS=str(HANDLER_MS), **env)
        if path:
            environ["PYTHONPATH"] = f"{path}:{environ['PYTHONPATH']}"
        w = Worker(environ, redis_server.url, ns, name, tmp_path / f"{name}.log")
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.close()


async def _publish(client: Redis, keys: Keys, journal_dir: Path) -> None:
    journal = Journal(journal_dir / "publish.log")
    events = [Tick(symbol=f"S{i % 4}", bid=1.0, ask=2.0, seq=i) for i in range(EVENTS)]
    async with Publisher(client, keys=keys) as pub:
        await pub.publish_many(events)
    for e in events:
        journal.published("ack", [e.event_id], keys.stream(TOPIC, Priority.NORMAL, e.symbol))
    journal.close()


async def _score(client: Redis, keys: Keys, journal_dir: Path) -> Score:
    publishes, _ = read_journals(journal_dir)
    records = map(parse_record, await client.lrange(handled_key(keys.ns), 0, -1))
    handlings = [Handling(event_id, stream, entry_id, 1, pid, 0.0) for event_id, pid, stream, entry_id in records]
    return score(publishes, handlings, await read_dead_letters(client, keys))


async def _handled(client: Redis, ns: str) -> bool:
    return bool(await client.llen(handled_key(ns)) >= EVENTS)


async def _skews_ms(client: Redis, ns: str) -> dict[int, list[int]]:
    """Per process, each call's own clock minus Redis's, ms."""
    out: dict[int, list[int]] = {}
    for raw in await client.lrange(calls_key(ns), 0, -1):
        call = Call.parse(raw)
        out.setdefault(call.pid, []).append(call.clock_ms - call.redis_ms)
    return out


def _need_libfaketime() -> Path:
    """libfaketime's library; without it the test skips, or fails under CI (``CI`` set: ``.ci/run`` installs it),
    so a CI machine can never pass by skipping."""
    if LIBFAKETIME is None:
        message = "libfaketime is not installed (apt-get install -y libfaketime)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return LIBFAKETIME


async def test_workers_hours_apart_never_reclaim_each_others_live_entries(direct: Redis, ns: str, spawn: Any,
                                                                          tmp_path: Path) -> None:
    libfaketime = _need_libfaketime()
    # Given two workers of one group, one clock two hours ahead and one two hours behind (every clock of the
    # process, libfaketime), with a handler slower than reclaim_idle_ms
    keys = Keys(ns)
    await _publish(direct, keys, tmp_path / "journal")

    # When they share a backlog
    ahead = spawn("ahead", LD_PRELOAD=str(libfaketime), FAKETIME="+2h")
    behind = spawn("behind", LD_PRELOAD=str(libfaketime), FAKETIME="-2h")
    await eventually(lambda: _handled(direct, ns), timeout_s=EXIT_DEADLINE_S, what="every event handled")
    await ahead.stop()
    await behind.stop()

    # Then their clocks were hours off Redis's, and still no entry was taken from a live worker: each event
    # handled once, nothing lost, nothing reclaimed
    skews = await _skews_ms(direct, ns)
    assert skews and all(abs(abs(s) - 2 * HOUR_MS) < 60_000 for ss in skews.values() for s in ss), skews
    s = await _score(direct, keys, tmp_path / "journal")
    print(f"\n[faults] worker clocks 2 h ahead and behind (libfaketime): {s.describe()}")
    assert s.lost == 0 and s.duplicated == 0 and s.unexpected == 0, s.describe()
    assert _reclaimed(ahead) == _reclaimed(behind) == 0


async def test_a_wall_clock_stepping_an_hour_mid_run_causes_no_reclaim(direct: Redis, ns: str, spawn: Any,
                                                                        tmp_path: Path) -> None:
    # Given two workers whose wall clock the test steps (an injected clock: time.time, time.time_ns)
    keys = Keys(ns)
    clock_dir = tmp_path / "clock"
    clock_dir.mkdir()
    (clock_dir / "sitecustomize.py").write_text(CLOCK)
    offset = tmp_path / "offset"
    offset.write_text("0")
    await _publish(direct, keys, tmp_path / "journal")
    first = spawn("first", path=str(clock_dir), FAULTS_CLOCK_FILE=str(offset))
    second = spawn("second", path=str(clock_dir), FAULTS_CLOCK_FILE=str(offset))

    # When their clock steps back an hour, then forward two, while they hold the backlog
    offset.write_text("-3600")
    await eventually(lambda: _calls_with_skew(direct, ns, -HOUR_MS), what="calls begun an hour behind")
    offset.write_text("3600")
    await eventually(lambda: _handled(direct, ns), timeout_s=EXIT_DEADLINE_S, what="every event handled")
    await first.stop()
    await second.stop()

    # Then nothing was reclaimed, handled twice or lost
    s = await _score(direct, keys, tmp_path / "journal")
    print(f"\n[faults] wall clock stepped -1 h then +1 h mid-run: {s.describe()}")
    assert s.lost == 0 and s.duplicated == 0 and s.unexpected == 0, s.describe()
    assert _reclaimed(first) == _reclaimed(second) == 0


async def _calls_with_skew(client: Redis, ns: str, skew_ms: int) -> bool:
    return any(abs(s - skew_ms) < 60_000 for ss in (await _skews_ms(client, ns)).values() for s in ss)


def _reclaimed(w: Worker) -> int:
    """Entries the worker reclaimed, from the stats it logs when it stops."""
    found = re.findall(r"reclaimed=(\d+)", w.output())
    assert found, w.output()
    return int(found[-1])
