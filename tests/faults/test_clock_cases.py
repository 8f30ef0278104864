"""Clock skew on worker hosts as scored cases of the suite (``@case``: the short form here, the long form in
``python -m bench.faults``): no premature reclaim, nothing lost, whatever the workers' clocks say.

What fabric times, and on which clock: whether an entry is abandoned is Redis's own idle time (XAUTOCLAIM
min-idle), kept fresh by heartbeats the worker paces on its monotonic clock; breakers, failure records and dead
letters are stamped with Redis TIME inside their scripts (``breaker.lua``, ``fail.lua``, ``deadletter.lua``), so
processes agree on a breaker whatever their clocks (``tests/test_breaker_processes.py`` shows it with skewed
processes). Only event ids, ``ts_ns`` (latency figures) and producer session ids use the wall clock.

Two ``fabric worker`` processes share a group here; each handler call takes longer than ``reclaim_idle_ms``, so an
entry survives only if its holder's heartbeats keep it fresh. The clocks are skewed two ways: with libfaketime
(every clock of the process, C libraries included, shifted by hours) and with an injected wall clock that steps
back and forth by an hour mid-run (as NTP stepping a clock does; monotonic clocks never step). Each handler call's
journal line is stamped with the process's own wall clock, which shows the skew was in force. Those stamps are
skewed, so these cases have no recovery time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.checker import Score, read_journals
from tests.faults.harness import ROOT, World, case, joined, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 48
"""The short form's events per case (the long form passes more)."""
HANDLER_MS = 1500
"""Each call outlasts the harness's reclaim_idle_ms (1 s): only heartbeats keep the entry from being reclaimed."""
HOUR_S = 3600
SKEW_TOLERANCE_S = 60
"""How far a call's stamp may be from the skew it should show (the call ended up to this long before the check)."""
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


def _concurrency(events: int) -> int:
    """Calls in flight per worker: enough that a long run takes seconds, not minutes, at HANDLER_MS a call."""
    return max(8, events // 16)


def _skews_h(w: World) -> dict[int, set[int]]:
    """Per worker process, the skews its calls' stamps show against this process's clock, in whole hours (a stamp
    farther than the tolerance from a whole hour shows as -99, which no check accepts)."""
    _, handlings = read_journals(w.journal_dir)
    now = time.time()
    out: dict[int, set[int]] = {}
    for h in handlings:
        off = h.t - now
        hours = round(off / HOUR_S)
        out.setdefault(h.pid, set()).add(hours if abs(off - hours * HOUR_S) < SKEW_TOLERANCE_S else -99)
    return out


def _need_libfaketime() -> Path:
    """libfaketime's library; without it the case fails under CI (``CI`` set: ``.ci/run`` installs it), so a CI
    machine can never pass by skipping, and skips elsewhere."""
    if LIBFAKETIME is None:
        message = "libfaketime is not installed (apt-get install -y libfaketime)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return LIBFAKETIME


@case("worker clocks 2 h ahead and behind (libfaketime)", "no loss, no duplicates")
async def case_clocks_hours_apart(w: World, events: int) -> Score:
    libfaketime = _need_libfaketime()
    # Given two workers of one group, one clock two hours ahead and one two hours behind (every clock of the
    # process, libfaketime), with a handler slower than reclaim_idle_ms
    await w.create_streams()
    workers = await joined(*(w.spawn(name, sleep_ms=HANDLER_MS, concurrency=_concurrency(events),
                                     env={"LD_PRELOAD": str(libfaketime), "FAKETIME": skew})
                             for name, skew in (("ahead", "+2h"), ("behind", "-2h"))))
    await until(lambda: _reading(w, len(workers)), what="both workers reading the streams")

    # When they share a backlog
    await w.publish(events)
    await w.settle()
    skews = _skews_h(w)
    w.notes["skews_h"] = {p.consumer: sorted(skews.get(p.pid, ())) for p in workers}
    await w.stop_workers()

    # Then no entry was taken from a live worker: nothing reclaimed (and the score: each event handled once)
    w.notes["reclaimed"] = sum(p.stat("reclaimed") for p in workers)
    return await w.score()


@case("wall clock stepped back and forth an hour mid-run", "no loss, no duplicates")
async def case_wall_clock_stepped(w: World, events: int) -> Score:
    # Given a backlog, and two workers whose wall clock the test steps (an injected clock: time.time, time.time_ns)
    clock_dir = w.tmp / "clock"
    clock_dir.mkdir()
    (clock_dir / "sitecustomize.py").write_text(CLOCK)
    offset = w.tmp / "offset"
    offset.write_text("0")
    await w.create_streams()
    env = {"PYTHONPATH": f"{clock_dir}:{ROOT}", "FAULTS_CLOCK_FILE": str(offset)}
    workers = await joined(*(w.spawn(name, sleep_ms=HANDLER_MS, concurrency=_concurrency(events), env=env)
                             for name in ("first", "second")))
    await w.publish(events)

    # When their clock steps back an hour, then forward two, while they hold the backlog
    offset.write_text(str(-HOUR_S))
    await until(lambda: _calls_skewed(w, -1), what="calls stamped an hour behind")
    offset.write_text(str(HOUR_S))
    await w.settle()
    w.notes["skews_h"] = sorted(set().union(*_skews_h(w).values()))
    await w.stop_workers()

    # Then nothing was reclaimed (and the score: nothing handled twice or lost)
    w.notes["reclaimed"] = sum(p.stat("reclaimed") for p in workers)
    return await w.score()


async def _reading(w: World, workers: int) -> bool:
    """As many reads blocked in the run's Redis as workers (joining the group is logged before the first read: a
    worker slow to start, under libfaketime on a loaded machine, could find the backlog taken by the other)."""
    clients = await w.client.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")) >= workers


async def _calls_skewed(w: World, hours: int) -> bool:
    return any(hours in s for s in _skews_h(w).values())


# ---- the short form ------------------------------------------------------------------------------------


async def test_workers_hours_apart_never_reclaim_each_others_live_entries(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_clocks_hours_apart(w, EVENTS)
    # every call saw its process's skew (both shared the backlog)
    assert w.notes == {"skews_h": {"ahead": [2], "behind": [-2]}, "reclaimed": 0}, w.notes
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()


async def test_a_wall_clock_stepping_an_hour_mid_run_causes_no_reclaim(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_wall_clock_stepped(w, EVENTS)
    assert w.notes["reclaimed"] == 0, w.notes
    assert {-1, 1} <= set(w.notes["skews_h"]) <= {-1, 0, 1}, w.notes  # calls ended on both sides of the step
    assert (s.lost, s.duplicated, s.unexpected) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS, s.describe()
