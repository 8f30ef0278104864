"""The ordered mode in-process: one owner per stream, entries one after another, committed in order, an entry with
outputs before the next starts.

Real Redis only: the fenced read runs on a connection of fabric's own (on a cluster, XREADGROUP inside a script,
whose reply fakeredis nests differently).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from typing import Any, NamedTuple

import pytest
import redis.exceptions as redis_errors

from fabric import Worker, ordered, scripts
from fabric.codec import decode_fields
from fabric.events import Action, Event, Indicator, Signal, Tick
from fabric.handler import Context, as_handler
from fabric.keys import Keys, Priority
from fabric.nodes import is_cluster
from fabric.ownership import Leases
from tests.cli_runner import invoke as fabric
from tests.cli_runner import parsed
from tests.contract.test_worker import config, publish, stream_of
from tests.waiting import eventually
from tests.workers import running

pytestmark = [pytest.mark.real_only, pytest.mark.timeout(60)]

ORDERED = {"ordered": True, "lease_ms": 600}


def seq_ticks(symbol: str, start: int, n: int) -> list[Tick]:
    return [Tick(symbol=symbol, bid=100.0, ask=101.0, seq=i) for i in range(start, start + n)]


class Log:
    """What the handlers saw: per symbol, the sequence numbers in handling order, and who handled them."""

    def __init__(self) -> None:
        self.seqs: defaultdict[str, list[int]] = defaultdict(list)
        self.by: defaultdict[str, set[str]] = defaultdict(set)

    def handler(self, *, fail: Any = None) -> Any:
        async def handle(tick: Tick, ctx: Context) -> Event | None:
            assert tick.symbol is not None
            if fail is not None and fail(tick, ctx):
                raise RuntimeError(f"failing {tick.symbol} {tick.seq}")
            self.seqs[tick.symbol].append(tick.seq)
            self.by[tick.symbol].add(ctx.consumer)
            await asyncio.sleep(0)  # let other streams interleave
            return None

        return handle

    def count(self, symbol: str) -> int:
        return len(self.seqs[symbol])


class ReadCall(NamedTuple):
    """One fenced read the owner made: its streams, the last ids it passed, and whether it was a small read."""

    streams: set[str]
    last: dict[str, bytes]
    few: bool


def spy_reads(monkeypatch: pytest.MonkeyPatch, before: Any = None, after: Any = None) -> None:
    """Patch ``Leases.read``: ``before(call)`` as each read starts, ``await after(call, read)`` once Redis answered
    (it may raise, as a lost reply would)."""
    real_read = Leases.read

    async def spied(self: Leases, tokens: Any, member: str, count: int, line: Any = None, last: Any = None,
                    **kw: Any) -> Any:
        call = ReadCall(set(tokens), dict(last or {}), kw.get("few", False))
        if before is not None:
            before(call)
        read = await real_read(self, tokens, member, count, line, last, **kw)
        if after is not None:
            await after(call, read)
        return read

    monkeypatch.setattr(Leases, "read", spied)


def ordered_worker(redis: Any, keys: Keys, fn: Any, **overrides: Any) -> Worker:
    return Worker(redis, as_handler(fn, "h"), config(**{**ORDERED, **overrides}), keys=keys, handler_name="h")


async def handled(log: Log, symbols: list[str], n: int) -> bool:
    return all(log.count(s) >= n for s in symbols)


async def test_each_symbols_entries_are_handled_in_publish_order(redis, keys: Keys) -> None:
    log = Log()
    symbols = [f"S{i}" for i in range(8)]
    await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 1, 5)])
    async with running(ordered_worker(redis, keys, log.handler(), concurrency=4)):
        await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 6, 45)])
        await eventually(lambda: handled(log, symbols, 50), what="50 ticks per symbol")
    assert all(log.seqs[s] == list(range(1, 51)) for s in symbols)


async def test_two_workers_split_the_streams_and_each_stream_has_one_owner(redis, keys: Keys) -> None:
    log = Log()
    symbols = [f"S{i}" for i in range(10)]
    await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 1, 1)])
    a, b = (ordered_worker(redis, keys, log.handler(), consumer=c) for c in ("a", "b"))
    async with running(a, b):
        leases = Leases(redis, keys, "g")
        streams = [stream_of(keys, s) for s in symbols]

        async def spread() -> bool:
            owners = [lease.owner for lease in (await leases.owners(streams)).values()]
            return sorted(owners) == ["a"] * 5 + ["b"] * 5

        await eventually(spread, what="five streams owned by each worker")
        await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 2, 20)])
        await eventually(lambda: handled(log, symbols, 21), what="21 ticks per symbol")
    assert all(log.seqs[s] == list(range(1, 22)) for s in symbols)
    assert {len(log.by[s]) for s in symbols} <= {1, 2}  # the first tick may be handled before the split


async def test_the_next_entry_starts_only_after_the_previous_one_is_committed(redis, keys: Keys) -> None:
    stream = stream_of(keys, "A")
    previous: list[str] = []
    still_pending: list[str] = []

    async def handle(tick: Tick, ctx: Context) -> Signal:
        if previous and await redis.xpending_range(stream, "g", previous[-1], previous[-1], 1):
            still_pending.append(previous[-1])
        previous.append(ctx.entry_id)
        return Signal(symbol="A", strategy="s", action="buy", strength=0.5)

    await publish(redis, keys, seq_ticks("A", 1, 20))
    async with running(ordered_worker(redis, keys, handle)):
        await eventually(lambda: _len(previous, 20), what="20 ticks handled")
        await eventually(lambda: _pending_is(redis, stream, 0), what="all committed")
    assert still_pending == []
    assert len(await redis.xrange(keys.stream("signal", Signal.default_priority, "A"))) == 20


async def test_an_entry_without_outputs_lets_the_next_start_before_its_ack_lands(redis, keys: Keys) -> None:
    # given two ticks of one symbol, read together, and a handler that on the first pauses Redis's writes, so
    # that the first's ack (a write) waits in Redis
    stream = stream_of(keys, "A")
    ids: list[str] = []
    first_pending: list[bool] = []

    async def handle(tick: Tick, ctx: Context) -> None:
        ids.append(ctx.entry_id)
        if tick.seq == 1:
            await _client(redis, "PAUSE", 3000, "WRITE")
        else:  # (a read: not paused)
            first_pending.append(bool(await redis.xpending_range(stream, "g", ids[0], ids[0], 1)))

    await publish(redis, keys, seq_ticks("A", 1, 2))
    try:
        # when the worker handles them
        async with running(ordered_worker(redis, keys, handle, lease_ms=10_000)):
            await eventually(lambda: _len(first_pending, 1), what="the second tick handled")
            await _client(redis, "UNPAUSE")
            await eventually(lambda: _pending_is(redis, stream, 0), what="both acked")
    finally:
        await _client(redis, "UNPAUSE")
    # then the second was handled while the first's ack was still on its way (it had nothing to read back)
    assert first_pending == [True]


async def test_an_entry_with_outputs_is_committed_before_the_next_starts_behind_acks_in_flight(
        redis, keys: Keys) -> None:
    # given 30 ticks of one symbol and a handler that outputs a signal for every third and nothing for the others
    signals = keys.stream("signal", Signal.default_priority, "A")
    not_yet_there: list[int] = []
    seen: list[int] = []

    async def handle(tick: Tick, ctx: Context) -> Signal | None:
        if await redis.xlen(signals) != (tick.seq - 1) // 3:  # the signals of the ticks before
            not_yet_there.append(tick.seq)
        seen.append(tick.seq)
        if tick.seq % 3:
            return None
        return Signal(symbol="A", strategy=str(tick.seq), action=Action.BUY, strength=0.5)

    await publish(redis, keys, seq_ticks("A", 1, 30))
    # when the worker handles them
    async with running(ordered_worker(redis, keys, handle)):
        await eventually(lambda: _len(seen, 30), what="30 ticks handled")
        await eventually(lambda: _pending_is(redis, stream_of(keys, "A"), 0), what="all committed")
    # then each tick found the signals of all the ticks before it in Redis, and each signal is there once, in order
    assert not_yet_there == []
    assert seen == list(range(1, 31))
    assert [decode_fields(f).strategy for _, f in await redis.xrange(signals)] == [str(i) for i in range(3, 31, 3)]


async def test_a_stream_stops_handling_once_a_commit_call_fails_and_the_worker_stops_with_its_error(
        redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    # given 500 ticks of one symbol and a commit script whose second call fails with an error no retry can fix
    calls_after_failure: list[int] = []
    failed: list[bool] = []
    sent = itertools.count()

    def failing(call: Any) -> Any:
        async def failing_call(*args: Any) -> Any:
            if next(sent) == 1:
                failed.append(True)
                raise redis_errors.ResponseError("ERR injected: the commit call failed")
            return await call(*args)
        return failing_call

    monkeypatch.setattr(scripts.FENCED_COMMIT, "on", failing(scripts.FENCED_COMMIT.on))  # a single Redis
    monkeypatch.setattr(ordered, "eval_many", failing(ordered.eval_many))  # a cluster

    async def handle(tick: Tick, ctx: Context) -> None:
        if failed:
            calls_after_failure.append(tick.seq)
        await asyncio.sleep(0)  # (lets the committer send while the stream goes on)

    await publish(redis, keys, seq_ticks("A", 1, 500))
    # when the worker runs into the failed call
    worker = ordered_worker(redis, keys, handle)
    with pytest.raises(redis_errors.ResponseError, match="injected"):
        await asyncio.wait_for(worker.run(), 30)
    # then its stream handled at most the entry in hand after it (not its queue, throwing the acks away)
    assert failed == [True]
    assert len(calls_after_failure) <= 1


@pytest.mark.parametrize("ahead", [1, 8])
async def test_with_commit_ahead_entries_and_their_outputs_are_still_committed_once_in_order(
        redis, keys: Keys, ahead: int) -> None:
    # given 40 ticks of each of two symbols and a worker whose streams may run ahead of their commits
    symbols = ["A", "B"]
    seen: dict[str, list[int]] = {s: [] for s in symbols}

    async def handle(tick: Tick, ctx: Context) -> list[Event]:
        seen[tick.symbol].append(tick.seq)
        await asyncio.sleep(0)  # (lets the committer send while the stream goes on)
        return [Signal(symbol=tick.symbol, strategy=str(tick.seq), action=Action.BUY, strength=0.5),
                Indicator(symbol=tick.symbol, name="seq", value=tick.seq)]

    await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 1, 40)])
    # when it handles them
    async with running(ordered_worker(redis, keys, handle, commit_ahead=ahead)):
        for s in symbols:
            await eventually(lambda s=s: _len(seen[s], 40), what=f"{s}'s 40 ticks handled")
            await eventually(lambda s=s: _pending_is(redis, stream_of(keys, s), 0), what=f"{s} all committed")
    # then each was handled once in order, and its two outputs (two streams) committed once, in the same order
    for s in symbols:
        assert seen[s] == list(range(1, 41))
        signals = await redis.xrange(keys.stream("signal", Signal.default_priority, s))
        assert [decode_fields(f).strategy for _, f in signals] == [str(i) for i in range(1, 41)]
        indicators = await redis.xrange(keys.stream("indicator", Indicator.default_priority, s))
        assert [decode_fields(f).value for _, f in indicators] == list(range(1, 41))


async def test_a_failing_entry_blocks_its_stream_but_not_the_others(redis, keys: Keys) -> None:
    log = Log()
    release = asyncio.Event()
    await publish(redis, keys, [*seq_ticks("A", 1, 10), *seq_ticks("B", 1, 10)])
    worker = ordered_worker(redis, keys, log.handler(fail=lambda t, _: t.symbol == "A" and t.seq == 3
                                                    and not release.is_set()), max_deliveries=1000)
    async with running(worker):
        await eventually(lambda: handled(log, ["B"], 10), what="B's ticks, while A's third fails")
        await eventually(lambda: _at_least(lambda: worker.stats.failed, 2), what="A's third failing twice")
        assert log.seqs["A"] == [1, 2]
        failures = keys.failures(stream_of(keys, "A"))
        assert await redis.hlen(failures) == 1  # its failure recorded
        release.set()
        await eventually(lambda: handled(log, ["A"], 10), what="A's ticks after the failure clears")
        await eventually(lambda: _pending_is(redis, stream_of(keys, "A"), 0), what="A all committed")
    assert log.seqs["A"] == list(range(1, 11))
    assert await redis.hlen(failures) == 0  # and dropped with its commit


async def test_a_dead_lettered_entry_unblocks_its_stream(redis, keys: Keys) -> None:
    log = Log()
    await publish(redis, keys, seq_ticks("A", 1, 5))
    worker = ordered_worker(redis, keys, log.handler(fail=lambda t, _: t.seq == 2), max_deliveries=3)
    async with running(worker):
        await eventually(lambda: handled(log, ["A"], 4), what="A's other ticks")
    assert log.seqs["A"] == [1, 3, 4, 5]
    assert worker.stats.dead_lettered == 1 and worker.stats.failed == 3
    dead = await redis.xrange(keys.dlq(stream_of(keys, "A")))
    assert len(dead) == 1 and dead[0][1][b"error_type"] == b"RuntimeError"


async def test_a_handler_past_its_timeout_is_retried_then_dead_lettered_and_its_stream_goes_on(
        redis, keys: Keys) -> None:
    # given A's second tick, whose handler hangs on every delivery, under a 0.2 s handler timeout
    log = Log()
    never = asyncio.Event()
    inner = log.handler()

    async def handle(tick: Tick, ctx: Context) -> Event | None:
        if tick.symbol == "A" and tick.seq == 2:
            await never.wait()
        return await inner(tick, ctx)

    await publish(redis, keys, [*seq_ticks("A", 1, 4), *seq_ticks("B", 1, 4)])
    worker = ordered_worker(redis, keys, handle, handler_timeout_s=0.2, max_deliveries=2)
    # when the worker runs
    async with running(worker):
        await eventually(lambda: handled(log, ["A"], 3), what="A's other ticks")
        await eventually(lambda: handled(log, ["B"], 4), what="B's ticks")
    # then the hanging one failed twice as a timeout and was dead-lettered, and A went on after it, in order
    assert log.seqs["A"] == [1, 3, 4] and log.seqs["B"] == [1, 2, 3, 4]
    assert worker.stats.failed == 2 and worker.stats.dead_lettered == 1
    [(_, letter)] = await redis.xrange(keys.dlq(stream_of(keys, "A")))
    assert letter[b"error_type"] == b"TimeoutError" and b"0.2 s timeout" in letter[b"error"]


async def test_a_new_symbols_stream_gets_an_owner_while_the_group_runs(redis, keys: Keys) -> None:
    log = Log()
    await publish(redis, keys, seq_ticks("A", 1, 1))
    async with running(ordered_worker(redis, keys, log.handler())):
        await eventually(lambda: handled(log, ["A"], 1), what="A's tick")
        await publish(redis, keys, seq_ticks("NEW", 1, 5))
        await eventually(lambda: handled(log, ["NEW"], 5), what="the new symbol's ticks")
    assert log.seqs["NEW"] == [1, 2, 3, 4, 5]


async def test_a_stopping_owner_hands_its_streams_over_in_order(redis, keys: Keys) -> None:
    log = Log()
    gate = asyncio.Event()

    async def slow(tick: Tick, ctx: Context) -> None:
        if ctx.consumer == "a":
            await gate.wait()
        log.seqs[tick.symbol or ""].append(tick.seq)

    await publish(redis, keys, seq_ticks("A", 1, 30))
    a = ordered_worker(redis, keys, slow, consumer="a", grace_s=5.0)
    async with running(a):
        await eventually(lambda: _at_least(lambda: a.stats.delivered, 2), what="a reading ahead")
        b = ordered_worker(redis, keys, slow, consumer="b")
        async with running(b):
            a.stop()
            gate.set()  # a finishes the entry in hand, then releases; b takes the rest over, oldest first
            await eventually(lambda: handled(log, ["A"], 30), what="all 30 ticks")
    assert log.seqs["A"] == list(range(1, 31))


async def test_a_writer_whose_lease_moved_is_fenced_out(redis, keys: Keys) -> None:
    gate = asyncio.Event()

    async def stuck(tick: Tick) -> Signal:
        await gate.wait()  # paused in its handler past its lease
        return Signal(symbol="A", strategy="s", action="buy", strength=1.0)

    await publish(redis, keys, seq_ticks("A", 1, 3))
    a = ordered_worker(redis, keys, stuck, consumer="a", handler_timeout_s=None)
    async with running(a):
        await eventually(lambda: _at_least(lambda: a.stats.delivered, 1), what="a holding the first tick")
        stream = stream_of(keys, "A")
        leases = Leases(redis, keys, "g")
        await redis.delete(leases.key(stream))  # as if a's lease expired while it was paused
        assert await leases.acquire(stream, "b") is not None  # and another member took the stream
        gate.set()  # a resumes: its commit must be refused
        await eventually(lambda: _at_least(lambda: a.stats.refused, 1), what="a's late commit refused")
    assert await redis.xrange(keys.stream("signal", Signal.default_priority, "A")) == []
    assert a.stats.handled == 0


@pytest.mark.single_redis  # (the rogue consumer's XADD and read in one MULTI)
async def test_an_owner_woken_for_an_entry_someone_else_read_asks_where_to_wait_from(
        redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[dict[str, bytes]] = []
    spy_reads(monkeypatch, before=lambda call: reads.append(call.last))
    log = Log()
    stream = stream_of(keys, "A")
    await publish(redis, keys, seq_ticks("A", 1, 1))
    async with running(ordered_worker(redis, keys, log.handler())):
        await eventually(lambda: handled(log, ["A"], 1), what="A's tick")
        # Given a consumer wrongly in the ordered group taking a new entry the moment it is added
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {"n": "rogue"}).xreadgroup("g", "rogue", {stream: ">"}, count=1)
            rogue, _ = await pipe.execute()
        # Then the owner, woken for it and reading nothing, learns the stream's last id and waits from there
        # (waiting from the id it knew would wake it at once, again and again)
        await eventually(lambda: _true(any(last.get(stream) == rogue for last in reads)),
                         what="a read passing the rogue entry's id as the stream's last")
    assert log.seqs["A"] == [1]


async def test_a_trickle_read_starts_its_stream_before_the_next_read_is_made(
        redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []

    async def took(call: ReadCall, read: Any) -> None:
        if read.entries:
            steps.append("entries")

    async def handle(tick: Tick) -> None:
        steps.append("handled")

    spy_reads(monkeypatch, before=lambda call: steps.append("read"), after=took)
    async with running(ordered_worker(redis, keys, handle)):
        # When one tick arrives at a running owner (a read of a single entry: a trickle)
        await publish(redis, keys, seq_ticks("A", 1, 1))
        await eventually(lambda: _true("handled" in steps), what="A's tick handled")
    # Then its handler ran before the reader made its next read (which takes a while to write): a lone entry
    # does not wait behind the reader's own work
    after = steps[steps.index("entries") + 1:]
    assert after[0] == "handled", steps


async def test_an_owner_reads_on_after_the_servers_scripts_were_flushed(redis, keys: Keys) -> None:
    log = Log()
    async with running(ordered_worker(redis, keys, log.handler())):
        await publish(redis, keys, seq_ticks("A", 1, 1))
        await eventually(lambda: handled(log, ["A"], 1), what="A's first tick")
        # When the server forgets its scripts (a restart, SCRIPT FLUSH), the fenced read's token check among them
        if is_cluster(redis):
            for node in redis.get_primaries():
                await redis.execute_command("SCRIPT", "FLUSH", target_nodes=node)
        else:
            await redis.script_flush()
        await publish(redis, keys, seq_ticks("A", 2, 2))
        # Then the owner loads what it needs and goes on reading
        await eventually(lambda: handled(log, ["A"], 3), what="A's next two ticks")
    assert log.seqs["A"] == [1, 2, 3]


@pytest.mark.parametrize(("quiet_s", "alone"), [(0.0, True), (60.0, False)], ids=["after-quiet", "steady"])
async def test_a_wake_up_after_a_quiet_spell_reads_the_stream_it_named_alone_first(
        redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, quiet_s: float, alone: bool) -> None:
    monkeypatch.setattr(ordered, "QUIET_S", quiet_s)  # every wait counts as a quiet spell, or none does
    reads: list[tuple[set[str], bool, set[str]]] = []

    async def took(call: ReadCall, read: Any) -> None:
        reads.append((call.streams, call.few, set(read.entries)))

    spy_reads(monkeypatch, after=took)
    seen: list[tuple[str, int]] = []

    async def handle(tick: Tick, ctx: Context) -> None:
        seen.append((ctx.priority, tick.seq))

    # (two streams of one symbol: on a cluster too, one slot, so one blocking XREAD waits on both)
    normal, high = stream_of(keys, "A"), stream_of(keys, "A", Priority.HIGH)
    await publish(redis, keys, seq_ticks("A", 1, 1))
    await publish(redis, keys, seq_ticks("A", 1, 1), Priority.HIGH)
    armed: list[bool] = []
    real_wait = ordered.Ordered._wait_new

    async def waiting(self: ordered.Ordered, line: Any, idle: Any) -> None:
        if armed == [True]:  # once: the tick lands as the owner starts waiting, so this wait is what finds it
            armed.append(False)
            await publish(redis, keys, seq_ticks("A", 2, 1))
        await real_wait(self, line, idle)

    monkeypatch.setattr(ordered.Ordered, "_wait_new", waiting)
    async with running(ordered_worker(redis, keys, handle)):
        await eventually(lambda: _len(seen, 2), what="each stream's first tick")
        # When a tick arrives on one while their owner waits for new entries
        armed.append(True)
        await eventually(lambda: _len(seen, 3), what="the normal stream's second tick")
    # Then, after a quiet spell, the read that took it asked for its stream alone, as a small read (one round
    # trip); under steady traffic, for every stream at once
    streams, few, _ = next(r for r in reversed(reads) if normal in r[2])
    assert (streams, few) == (({normal}, True) if alone else ({normal, high}, False)), reads
    assert sorted(seen) == [("high", 1), ("normal", 1), ("normal", 2)]


async def test_entries_a_lost_read_reply_left_pending_are_handled_next_in_order(
        redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    lost: list[int] = []

    async def losing_once(call: ReadCall, read: Any) -> None:
        if read.entries and not lost:  # Redis ran the read, and its reply never reached the worker
            lost.append(sum(len(es) for es in read.entries.values()))
            await publish(redis, keys, seq_ticks("A", 6, 5))  # and newer entries arrive meanwhile
            raise redis_errors.ConnectionError("the connection dropped before the reply")

    spy_reads(monkeypatch, after=losing_once)
    seen: list[tuple[int, int]] = []

    async def handle(tick: Tick, ctx: Context) -> None:
        seen.append((tick.seq, ctx.delivery_count))

    await publish(redis, keys, seq_ticks("A", 1, 5))
    worker = ordered_worker(redis, keys, handle)
    async with running(worker):
        # Then what the lost reply had (pending to the owner, never queued) is handled next, before the newer
        # ones, each once and as a first delivery (no handler had seen it)
        await eventually(lambda: _len(seen, 10), what="A's ten ticks")
        await eventually(lambda: _pending_is(redis, stream_of(keys, "A"), 0), what="A all committed")
    assert lost and seen == [(i, 1) for i in range(1, 11)]
    assert worker.stats.reclaimed == 0 and worker.stats.dead_lettered == 0


async def _true(value: bool) -> bool:
    return value


async def test_an_output_of_another_symbol_is_committed_with_its_entry_only_where_one_script_can_take_both(
        redis, keys: Keys) -> None:
    async def other_symbol(tick: Tick) -> Signal:
        return Signal(symbol="B", strategy="s", action="buy", strength=1.0)

    await publish(redis, keys, seq_ticks("A", 1, 1))
    worker = ordered_worker(redis, keys, other_symbol)
    async with running(worker):
        await eventually(lambda: _at_least(lambda: worker.stats.handled + worker.stats.dead_lettered, 1),
                         what="A's tick settled")
    outputs = await redis.xrange(keys.stream("signal", Signal.default_priority, "B"))
    dead = await redis.xrange(keys.dlq(stream_of(keys, "A")))
    if is_cluster(redis):  # B's stream is in another slot: the output cannot be fenced with A's ack
        assert outputs == [] and [d[b"error_type"] for _, d in dead] == [b"CrossSlotOutput"]
    else:
        assert len(outputs) == 1 and dead == []


async def _len(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def _at_least(value: Any, n: int) -> bool:
    return bool(value() >= n)


async def _client(redis: Any, *args: Any) -> None:
    """A CLIENT command to the server, or to every primary of a cluster."""
    if not is_cluster(redis):
        await redis.execute_command("CLIENT", *args)
        return
    await redis.initialize()
    for node in redis.get_primaries():
        await redis.execute_command("CLIENT", *args, target_nodes=node)


async def _pending_is(redis: Any, stream: str, n: int) -> bool:
    return int((await redis.xpending(stream, "g"))["pending"]) == n


async def test_the_cli_shows_who_owns_which_stream(redis, keys: Keys, redis_url: str) -> None:
    log = Log()
    symbols = ["A", "B", "C"]
    await publish(redis, keys, [t for s in symbols for t in seq_ticks(s, 1, 1)])
    async with running(ordered_worker(redis, keys, log.handler(), consumer="w1")):
        await eventually(lambda: handled(log, symbols, 1), what="a tick per symbol")
        owned = await asyncio.to_thread(lambda: parsed(fabric(redis_url, keys, "consumers", "--owned", "--json")))
        rows = await asyncio.to_thread(lambda: parsed(fabric(redis_url, keys, "consumers", "--json")))
    assert sorted((o["stream"], o["owner"], o["group"]) for o in owned) == [
        (stream_of(keys, s), "w1", "g") for s in symbols]
    assert [(r["consumer"], r["owns"]) for r in rows] == [("w1", 3)]

