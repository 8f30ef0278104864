"""Redis faults, scored by the checker: restarts (graceful, SIGKILL under each appendfsync, a power loss that cuts
the AOF's tail), maxmemory, CLIENT PAUSE, a stream trimmed under pending entries, the group or a stream deleted
under a running worker.

Where Redis itself may lose confirmed writes (SIGKILL under ``everysec``, a cut AOF) the promise is that the loss is
reported by the fabric (the publisher's loss audit), never silent: the checker's ``lost`` must not exceed it."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fabric.config import PublisherConfig
from fabric.errors import RedisOutOfMemory
from fabric.events import Tick
from fabric.publisher import Publisher
from tests.faults.checker import Score, read_journals
from tests.faults.harness import GROUP, Published, RedisNode, WorkerProc, World, case, joined, rate, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 240


async def _restart_under_load(w: World, events: int, fault: Callable[[RedisNode], None], *,
                              accounted: bool = True) -> tuple[Score, Published]:
    """A worker handling a producer's flow; a third of the way in, ``fault`` stops Redis, which then starts again
    from its files on the same port."""
    await w.create_streams()
    (worker,) = await joined(w.spawn("w", sleep_ms=2))
    producing = asyncio.create_task(w.publish(events, rate=rate(events)))
    await until(lambda: _handled_at_least(w, events // 3), what="a third of the flow handled")
    fault(w.redis)
    w.redis.start()
    fault_end = time.time()
    published = await producing
    await w.settle(accounted=accounted)
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end, reported_lost=published.detected_lost), published


async def _handled_at_least(w: World, n: int) -> bool:
    _, handlings = read_journals(w.journal_dir)
    return len(handlings) >= n


@case("Redis graceful restart (AOF everysec)", "no loss")
async def case_redis_graceful_restart(w: World, events: int) -> Score:
    return (await _restart_under_load(w, events, RedisNode.stop))[0]


@case("Redis SIGKILL, appendfsync always", "no loss", appendfsync="always")
async def case_redis_sigkill_always(w: World, events: int) -> Score:
    return (await _restart_under_load(w, events, RedisNode.kill))[0]


@case("Redis SIGKILL, appendfsync everysec", "loss reported", appendfsync="everysec")
async def case_redis_sigkill_everysec(w: World, events: int) -> Score:
    return (await _restart_under_load(w, events, RedisNode.kill, accounted=False))[0]


CUT_FRACTION = 0.3
"""How much of the AOF's newest file a simulated power loss takes away."""


def _power_loss(node: RedisNode) -> None:
    node.kill()
    node.cut_aof_tail(int(node.aof_tail().stat().st_size * CUT_FRACTION))


@case("Redis power loss (AOF tail cut)", "loss reported", appendfsync="everysec")
async def case_redis_power_loss(w: World, events: int) -> Score:
    return (await _restart_under_load(w, events, _power_loss, accounted=False))[0]


ENTRY_BYTES = 270
HEADROOM_BYTES = 256 * 1024


@case("Redis maxmemory reached (noeviction)", "no loss")
async def case_redis_maxmemory(w: World, events: int) -> Score:
    # Given a worker, and a Redis with room for a thousand more entries or so (some 270 bytes each)
    await w.create_streams()
    (worker,) = await joined(w.spawn("w"))
    warm = await _near_maxmemory(w, events // 8)

    # When a producer publishes more than fits
    more = max(events, 4 * HEADROOM_BYTES // ENTRY_BYTES)
    first = await w.publish(more, batch=10, first_seq=warm + 1, on_error_pause_s=0)

    # Then the publishes past the limit fail loudly, as RedisOutOfMemory saying what to do
    assert first.acked and first.failed, f"the limit was not reached: {first.acked} acked, {first.failed} failed"
    assert first.errors and all(e.startswith("RedisOutOfMemory:") and "maxmemory" in e for e in first.errors)

    # and the worker handles what landed meanwhile; once maxmemory is raised, publishing works again
    await w.settle()
    await w.client.config_set("maxmemory", 0)
    fault_end = time.time()
    second = await w.publish(events // 4, first_seq=warm + more + 1)
    assert second.failed == 0, second.errors
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


async def _near_maxmemory(w: World, warm: int) -> int:
    """Publish ``warm`` events (the first publish's own costs, a connection and a script, come before the limit),
    then set maxmemory ``HEADROOM_BYTES`` above what Redis uses, with no eviction; return ``warm``."""
    await w.publish(warm)
    info: Any = await w.client.info("memory")
    await w.client.config_set("maxmemory", int(info["used_memory"]) + HEADROOM_BYTES)
    await w.client.config_set("maxmemory-policy", "noeviction")
    return warm


@case("CLIENT PAUSE WRITE 1s", "no loss, no duplicates")
async def case_redis_client_pause(w: World, events: int) -> Score:
    # Given a worker handling a producer's flow
    await w.create_streams()
    (worker,) = await joined(w.spawn("w", sleep_ms=2))
    producing = asyncio.create_task(w.publish(events, rate=rate(events)))
    await until(lambda: _handled_at_least(w, events // 3), what="a third of the flow handled")

    # When Redis pauses every writer for a second (a failover's pause, or an operator's)
    await w.client.execute_command("CLIENT", "PAUSE", 1000, "WRITE")
    await w.client.set(f"{w.keys.ns}:probe", 1)  # a write: answered once the pause ends
    fault_end = time.time()

    # Then everything resumes: nothing lost, nothing handled twice
    published = await producing
    assert published.failed == 0, published.errors
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


@case("stream trimmed under pending entries", "loss reported")
async def case_trimmed_under_pending(w: World, events: int) -> Score:
    # Given a worker that read the whole backlog and died holding it
    await w.create_streams()
    (victim,) = await joined(w.spawn("victim", sleep_ms=20, concurrency=2))
    await w.publish(events)
    await until(lambda: w.all_read(), what="the whole backlog read by the victim")
    victim.send(signal.SIGKILL)
    await victim.exit_code()

    # When every stream is trimmed empty (an operator's XTRIM, not fabric's retention, which never drops pending)
    for stream in await w.streams():
        await w.client.xtrim(stream, maxlen=0, approximate=False)
    fault_end = time.time()

    # Then the survivor's reclaim finds the pending entries gone and counts each one: the loss is reported
    survivor = w.spawn("survivor")
    await w.settle(accounted=False)
    await survivor.stopped_cleanly()
    return await w.score(fault_end=fault_end, reported_lost=await w.counter("trimmed_pending:"))


@case("consumer group deleted under a running worker", "no loss")
async def case_group_deleted(w: World, events: int) -> Score:
    # Given a worker handling a producer's flow
    await w.create_streams()
    (worker,) = await joined(w.spawn("w", sleep_ms=2))
    producing = asyncio.create_task(w.publish(events, rate=rate(events)))
    await until(lambda: _handled_at_least(w, events // 3), what="a third of the flow handled")

    # When the group is destroyed on every stream
    for stream in await w.streams():
        await w.client.xgroup_destroy(stream, GROUP)
    fault_end = time.time()

    # Then the worker rejoins from the start of each stream: redelivered, never lost
    await producing
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


@case("stream key deleted under a running worker", "no loss")
async def case_stream_deleted(w: World, events: int) -> Score:
    # Given a worker blocked reading, its backlog handled
    await w.create_streams()
    (worker,) = await joined(w.spawn("w"))
    await w.publish(events // 2)
    await w.settle()

    # When a stream's key is deleted under it, and the producer goes on publishing to it and the others
    (doomed, *_) = await w.streams()
    await w.client.delete(doomed)
    fault_end = time.time()
    await w.publish(events - events // 2, first_seq=events // 2 + 1)

    # Then the worker joins the stream again as it is recreated and handles what arrives there
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


# ---- the short form ------------------------------------------------------------------------------------


def _assert_no_loss(s: Score) -> None:
    assert s.lost == 0 and s.unexpected == 0, s.describe()


async def test_a_graceful_redis_restart_with_aof_loses_nothing(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_redis_graceful_restart(w, EVENTS)
    _assert_no_loss(s)
    assert s.reported_lost == 0


async def test_redis_killed_under_appendfsync_always_loses_nothing(tmp_path: Path) -> None:
    async with World.open(tmp_path, appendfsync="always") as w:
        s = await case_redis_sigkill_always(w, EVENTS)
    _assert_no_loss(s)
    assert s.reported_lost == 0


async def test_redis_killed_under_appendfsync_everysec_loses_nothing_unreported(tmp_path: Path) -> None:
    async with World.open(tmp_path, appendfsync="everysec") as w:
        s = await case_redis_sigkill_everysec(w, EVENTS)
    assert s.lost <= s.reported_lost and s.unexpected == 0, s.describe()


async def test_a_power_loss_that_cuts_the_aof_tail_is_reported_per_stream(tmp_path: Path) -> None:
    # Given a flow through a worker, when Redis loses the last 30 % of its AOF file and restarts
    async with World.open(tmp_path, appendfsync="everysec") as w:
        s, published = await _restart_under_load(w, EVENTS, _power_loss, accounted=False)
        publishes, _ = read_journals(w.journal_dir)
        counted = {k.decode(): int(v) for k, v in (await w.client.hgetall(w.keys.counters())).items()}

    # Then Redis did lose confirmed events, and the publisher reported them
    assert published.detected_lost > 0, f"the cut lost no confirmed event: {s.describe()}"
    assert s.lost <= s.reported_lost and s.unexpected == 0, s.describe()

    # stream by stream: what the checker finds lost never exceeds what was reported there, and the report is
    # in Redis's counters too
    stream_of = {p.event_id: p.stream for p in publishes}
    lost_by_stream = Counter(stream_of[e] for e in s.lost_ids)
    reported = {k.removeprefix("lost_confirmed:"): v for k, v in counted.items() if k.startswith("lost_confirmed:")}
    assert all(n <= reported.get(stream, 0) for stream, n in lost_by_stream.items()), (lost_by_stream, reported)
    assert sum(reported.values()) == published.detected_lost


async def test_maxmemory_fails_publishes_loudly_and_recovers_once_raised(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_redis_maxmemory(w, EVENTS)
    _assert_no_loss(s)
    assert s.refused > 0


async def test_a_publish_past_maxmemory_raises_redis_out_of_memory_and_buffers_nothing(tmp_path: Path) -> None:
    # Given a Redis already at its limit
    async with World.open(tmp_path) as w:
        await w.client.config_set("maxmemory", 1)
        # When a publisher publishes, Then it raises RedisOutOfMemory at once, and holds nothing back for later
        async with Publisher(w.client, PublisherConfig(), w.keys) as pub:
            with pytest.raises(RedisOutOfMemory, match="raise maxmemory"):
                await pub.publish_many([Tick(symbol="S0", bid=1.0, ask=2.0) for _ in range(10)])
            assert pub._buffered == 0
        await w.client.config_set("maxmemory", 0)
        assert await w.client.xlen(w.stream("S0")) == 0


# A regression case: XGROUP CREATE is deny-oom, so at maxmemory Redis refused it even where the group existed, and
# the worker exited exactly when consumers were needed to drain the backlog.
async def test_a_worker_started_while_redis_is_at_maxmemory_starts_and_drains_the_backlog(tmp_path: Path) -> None:
    # Given a Redis at its maxmemory with a backlog no worker has read
    async with World.open(tmp_path) as w:
        await w.create_streams()
        warm = await _near_maxmemory(w, EVENTS // 8)
        more = await w.publish(4 * HEADROOM_BYTES // ENTRY_BYTES, batch=10, first_seq=warm + 1,
                               on_error_pause_s=0)
        assert more.failed, "the limit was not reached"

        # When a worker is started to drain it (what RedisOutOfMemory's message advises)
        worker = w.spawn("w")

        # Then it starts, and handles every acknowledged event
        await until(lambda: _started_or_exited(worker), what="the worker to join or exit")
        assert worker.proc.poll() is None, worker.output()
        await w.settle()
        await worker.stopped_cleanly()
        s = await w.score()
    _assert_no_loss(s)


async def _started_or_exited(worker: WorkerProc) -> bool:
    return worker.proc.poll() is not None or "joined group" in worker.output()


async def test_client_pause_delays_but_loses_and_doubles_nothing(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_redis_client_pause(w, EVENTS)
    _assert_no_loss(s)
    assert s.duplicated == 0, s.describe()


async def test_pending_entries_trimmed_away_are_counted_never_silently_lost(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_trimmed_under_pending(w, EVENTS)
    assert s.lost > 0, f"nothing was pending when the streams were trimmed: {s.describe()}"
    assert s.lost <= s.reported_lost, s.describe()


async def test_the_group_deleted_under_a_running_worker_is_rejoined_and_nothing_lost(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_group_deleted(w, EVENTS)
    _assert_no_loss(s)
    assert s.duplicated > 0, "the rejoin from the start of each stream redelivers what was retained"


async def test_a_stream_deleted_under_a_running_worker_is_rejoined_when_recreated(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_stream_deleted(w, EVENTS)
    _assert_no_loss(s)
    assert s.handled == s.acknowledged == EVENTS, s.describe()


async def test_a_flushall_under_a_publisher_is_reported_as_loss_of_what_it_had_confirmed(tmp_path: Path) -> None:
    # Given a publisher that had 10 events confirmed on a stream
    async with World.open(tmp_path) as w, Publisher(w.client, PublisherConfig(), w.keys) as pub:
        await pub.publish_many([Tick(symbol="S0", bid=1.0, ask=2.0) for _ in range(10)])
        # When Redis loses everything, and the publisher publishes again
        await w.client.flushall()
        await pub.publish_many([Tick(symbol="S0", bid=1.0, ask=2.0) for _ in range(3)])
        # Then it reports the 10 as lost, in its own figures and in Redis's counters, and the new ones landed
        assert pub.lost == {w.stream("S0"): 10}
        assert await w.counter("lost_confirmed:") == 10
        assert await w.client.xlen(w.stream("S0")) == 3


async def test_a_session_number_that_may_have_expired_is_not_reported_as_loss(tmp_path: Path, monkeypatch) -> None:
    # Given a publisher whose session and last write are older than its numbers are sure to be kept
    import fabric.publisher

    monkeypatch.setattr(fabric.publisher, "VERIFIABLE_S", 0.0)
    async with World.open(tmp_path) as w, Publisher(w.client, PublisherConfig(), w.keys) as pub:
        await pub.publish_many([Tick(symbol="S0", bid=1.0, ask=2.0) for _ in range(10)])
        # When its number is gone (as after SESSION_TTL_MS without a write) and it publishes again
        await w.client.delete(w.keys.producers(w.stream("S0")))
        await pub.publish_many([Tick(symbol="S0", bid=1.0, ask=2.0) for _ in range(3)])
        # Then nothing is reported lost (it cannot tell), and everything is there
        assert pub.lost == {}
        assert await w.counter("lost_confirmed:") == 0
        assert await w.client.xlen(w.stream("S0")) == 13
