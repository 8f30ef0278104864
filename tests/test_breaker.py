"""The shared breaker's state machine (breaker.lua through BreakerStore), on Redis's clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from fabric import Publisher, Worker, WorkerConfig
from fabric.breaker import CLOSED, HALF_OPEN, OPEN, POLL_MS, REPORT_MS, BreakerStore, breaker_names
from fabric.codec import decode_fields
from fabric.config import BreakerConfig
from fabric.events import BreakerStateChanged, Tick
from fabric.handler import Context, as_handler
from fabric.keys import Keys
from tests.backends import client_list
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.real_only  # fakeredis's Lua has no cjson; the breaker script needs it


def store(redis: Any, keys: Keys, **policy: Any) -> BreakerStore:
    return BreakerStore(redis, keys, BreakerConfig(name="exchange", **policy))


async def test_consecutive_failures_across_reports_trip_it(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=3)
    # Given two batches of failures from different processes, 2 then 1
    assert (await s.record(2, 2, 2, 0, 0)).state == CLOSED
    # When the third consecutive failure is reported
    state = await s.record(1, 1, 1, 0, 0)
    # Then the breaker is open, and waits its recovery time
    assert state.state == OPEN and state.wait_ms > 0


async def test_a_success_in_between_resets_the_consecutive_count(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=3)
    await s.record(2, 2, 2, 0, 0)
    await s.record(2, 1, 0, 0, 0)  # a failure, then a success
    assert (await s.record(2, 2, 2, 0, 0)).state == CLOSED  # only 2 consecutive since the success


async def test_the_failure_rate_over_the_window_trips_it_once_there_are_enough_calls(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=0, failure_rate=0.5, min_calls=10)
    assert (await s.record(6, 4, 0, 0, 0)).state == CLOSED  # 4 of 6: too few calls to judge
    assert (await s.record(4, 2, 0, 0, 0)).state == OPEN  # 6 of 10 failed


async def test_recovery_admits_exactly_k_trials_then_closes_after_m_successes(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=1, recovery_ms=0, half_open_trials=2, close_after=2)
    await s.record(1, 1, 1, 0, 0)
    # When 10 callers ask at once after the recovery time
    answers = await asyncio.gather(*(s.admit() for _ in range(10)))
    # Then exactly 2 are admitted, in HALF_OPEN
    assert sum(a.admitted for a in answers) == 2
    assert all(a.state == HALF_OPEN for a in answers)
    # and two successful trials close it
    assert (await s.record(1, 0, 0, 1, 0)).state == HALF_OPEN
    assert (await s.record(1, 0, 0, 1, 0)).state == CLOSED


async def test_a_failed_trial_opens_it_again(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=1, recovery_ms=0)
    await s.record(1, 1, 1, 0, 0)
    assert (await s.admit()).admitted
    assert (await s.record(1, 1, 1, 0, 1)).state == OPEN


async def test_forced_open_stays_open_until_closed_by_hand(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=1, recovery_ms=0)
    forced = await s.force("open", "maintenance")
    assert forced.state == OPEN and forced.forced and forced.wait_ms == -1
    assert not (await s.admit()).admitted  # no trials past the recovery time while forced
    assert (await s.force("closed", "done")).state == CLOSED


async def test_forcing_open_a_tripped_breaker_is_recorded_with_its_reason(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=1)
    await s.record(1, 1, 1, 0, 0)
    assert (await s.force("open", "exchange maintenance")).forced
    last = decode_fields((await redis.xrevrange(keys.breaker_events(), count=1))[0][1])
    assert isinstance(last, BreakerStateChanged)
    assert (last.old_state, last.new_state, last.reason) == (OPEN, OPEN, "exchange maintenance")


async def test_each_transition_is_an_event_on_the_system_stream(redis, keys) -> None:
    s = store(redis, keys, failure_threshold=1, recovery_ms=0)
    await s.record(1, 1, 1, 0, 0)
    await s.admit()
    await s.record(1, 0, 0, 1, 0)
    entries = await redis.xrange(keys.breaker_events())
    events = [decode_fields(fields) for _, fields in entries]
    assert all(isinstance(e, BreakerStateChanged) for e in events)
    assert [(e.old_state, e.new_state) for e in events] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert all(e.breaker == "exchange" and e.reason for e in events)
    assert len({e.event_id for e in events}) == 3
    assert await breaker_names(redis, keys) == ["exchange"]
    assert msgspec.json.decode(msgspec.json.encode(events[0]), type=BreakerStateChanged) == events[0]


# ---- a worker guarded by a breaker --------------------------------------------------------------------------

FAST = {"block_ms": 50, "reclaim_idle_ms": 300, "reclaim_interval_ms": 50, "discover_interval_ms": 50,
        "backoff_base_ms": 10, "backoff_max_ms": 20, "concurrency": 4}


BOUND_MS = REPORT_MS + POLL_MS
"""breaker.py's written bound: every process stops calling within this long of the breaker opening."""


class Downstream:
    """A handler's dependency that is down until healed; counts calls begun past the bound after the breaker
    opened (on Redis's clock, from the breaker's own record of when it opened)."""

    def __init__(self, s: BreakerStore) -> None:
        self.store = s
        self.healthy = False
        self.handled: set[str] = set()
        self.calls_while_open = 0

    async def __call__(self, event: Tick) -> None:
        client, key = self.store.client, self.store.keys.breaker(self.store.config.name)
        state, since = await client.hmget(key, "state", "since")
        seconds, micros = await client.time()
        if state == b"OPEN" and seconds * 1000 + micros // 1000 - int(since) > BOUND_MS:
            self.calls_while_open += 1
        if not self.healthy:
            raise ConnectionError("exchange down")
        self.handled.add(event.event_id)


def guarded_worker(redis: Any, keys: Keys, s: BreakerStore, downstream: Downstream) -> Worker:
    config = WorkerConfig(group="g", topics=["tick"], max_deliveries=50, breakers=[s.config], **FAST)
    return Worker(redis, as_handler(downstream.__call__, "downstream"), config, keys=keys)


async def publish(redis: Any, keys: Keys, n: int) -> set[str]:
    events = [Tick(symbol="A", bid=1.0, ask=2.0) for _ in range(n)]
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many(events)
    return {e.event_id for e in events}


async def test_an_open_breaker_stops_reading_and_calling(redis, keys) -> None:
    # Given a worker whose downstream is down, guarded by a breaker that trips after 3 failures and stays open
    s = store(redis, keys, failure_threshold=3, recovery_ms=60_000)
    downstream = Downstream(s)
    worker = guarded_worker(redis, keys, s, downstream)
    async with running(worker):
        await publish(redis, keys, 10)
        view = worker._breakers[0]

        async def tripped() -> bool:
            return view.state == OPEN

        await eventually(tripped, what="the worker to see the breaker open")

        # When more events arrive while it is open (once no read of the worker's waits in Redis: a read in flight
        # when it opened has returned; its readers send no more), and the view is refreshed three times (a second
        # or more, in which an ungated reader would have read 20 times)
        refreshes = 0
        refresh = view._refresh

        async def counted() -> None:
            nonlocal refreshes
            refreshes += 1
            await refresh()

        async def no_read_waiting() -> bool:
            return not [c for c in await client_list(redis) if c.get("cmd") == "xreadgroup" and "b" in c["flags"]]

        view._refresh = counted  # type: ignore[method-assign]
        await eventually(no_read_waiting, what="no read of the worker's waiting in Redis")
        start = refreshes
        later = await publish(redis, keys, 20)
        await eventually(lambda: _at_least(refreshes, start + 3), what="three refreshes of the worker's view")

        # Then the new events wait in Redis, undelivered, and the handler was not called while it was open
        stream = keys.stream("tick", Tick.default_priority, "A")
        assert (await redis.xinfo_groups(stream))[0]["lag"] == len(later)
    assert downstream.calls_while_open == 0


async def test_after_recovery_the_backlog_is_handled_and_nothing_is_dead_lettered(redis, keys) -> None:
    # Given a guarded worker whose downstream is down, its breaker open (300 ms to recover), events waiting
    s = store(redis, keys, failure_threshold=3, recovery_ms=300)
    downstream = Downstream(s)
    worker = guarded_worker(redis, keys, s, downstream)
    async with running(worker):
        published = await publish(redis, keys, 40)

        async def is_open() -> bool:
            return (await s.get()).state == OPEN

        await eventually(is_open, what="the breaker to open")

        # When the downstream heals
        downstream.healthy = True

        # Then trials close the breaker and every event is handled, none dead-lettered
        async def all_handled() -> bool:
            return downstream.handled >= published

        await eventually(all_handled, timeout_s=30, what="the backlog handled after recovery")
    assert (await s.get()).state == CLOSED
    assert not await redis.exists(keys.dlq(keys.stream("tick", Tick.default_priority, "A")))
    assert downstream.calls_while_open == 0


async def _at_least(value: int, n: int) -> bool:
    return value >= n


async def test_a_call_waiting_for_an_open_breaker_is_not_timed_out_by_the_handler_timeout(redis, keys) -> None:
    # Given a guarded worker with one handler slot and a 0.2 s handler timeout, and two events read together;
    # the first one's handler forces the breaker open (and brings the worker's view up to date at once)
    s = store(redis, keys, failure_threshold=100)
    deliveries: list[int] = []
    opened: list[float] = []

    async def handle(event: Tick, ctx: Context) -> None:
        deliveries.append(ctx.delivery_count)
        if len(deliveries) == 1:
            await s.force("open", "maintenance")
            await worker._breakers[0]._refresh()
            opened.append(time.monotonic())

    config = WorkerConfig(group="g", topics=["tick"], breakers=[s.config], handler_timeout_s=0.2,
                          **{**FAST, "concurrency": 1})
    worker = Worker(redis, as_handler(handle, "h"), config, keys=keys)
    await publish(redis, keys, 2)
    async with running(worker):
        # When the second event's call waits for the breaker three times as long as the handler timeout
        await eventually(lambda: asyncio.sleep(0, result=bool(opened) and time.monotonic() - opened[0] > 0.6),
                         what="the second call waiting for the breaker past the handler timeout")
        assert deliveries == [1]
        # and the breaker is then closed by hand
        await s.force("closed", "maintenance over")
        await eventually(lambda: asyncio.sleep(0, result=worker.stats.handled == 2), what="both events handled")
    # Then the waiting call went ahead on its first delivery: nothing failed or timed out
    assert deliveries == [1, 1]
    assert worker.stats.failed == 0


async def test_handler_timeouts_count_as_failures_and_trip_the_breaker(redis, keys) -> None:
    # Given a guarded worker (3 failures trip it) whose handler hangs, under a 0.1 s handler timeout
    s = store(redis, keys, failure_threshold=3, recovery_ms=60_000)

    async def hang(event: Tick) -> None:
        await asyncio.Event().wait()

    config = WorkerConfig(group="g", topics=["tick"], breakers=[s.config], handler_timeout_s=0.1,
                          **{**FAST, "max_deliveries": 50})
    worker = Worker(redis, as_handler(hang, "h"), config, keys=keys)
    await publish(redis, keys, 6)
    # When its calls time out
    async with running(worker):
        async def is_open() -> bool:
            return (await s.get()).state == OPEN

        # Then the breaker sees each timeout as a failure (TimeoutError, inside the middleware) and opens
        await eventually(is_open, what="the breaker opened by the handler's timeouts")
    assert worker.stats.failed >= 3
