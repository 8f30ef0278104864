"""A lane's reads: sent ahead (``fabric.worker._Reads``), how many wait for a reply, whatever fails; and packed
once (``fabric.worker._ReadCommands``, ``fabric.client.Packed``)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest
import redis.exceptions as rex

from fabric.client import Line, Packed, connect
from fabric.events import Tick
from fabric.keys import Priority
from fabric.worker import MAX_READ_COMMANDS, _ReadCommands, _Reads
from tests.contract.test_worker import make_worker, publish, ticks
from tests.waiting import eventually


class FakeLine:
    """A connection that answers the commands sent on it in order; a send can be made to fail."""

    def __init__(self) -> None:
        self.sent: deque[tuple[Any, ...]] = deque()
        self.fail_send: BaseException | None = None

    async def call_packed(self, command: Packed) -> Any:
        await self.send_packed(command)
        return await self.receive()

    async def send_packed(self, command: Packed) -> None:
        if self.fail_send is not None:
            raise self.fail_send  # (Line.send_packed closes the connection on any failure)
        self.sent.append(command.args)

    async def receive(self, blocking_s: float = 0.0) -> Any:
        return ("reply to", self.sent.popleft())


async def _unblocked(reads: _Reads) -> None:
    raise AssertionError("no read was to be cut short")


async def test_a_trickling_lane_keeps_one_read_sent_ahead_and_the_stop_collects_it():
    line = FakeLine()
    reads = _Reads(line, block_ms=100, unblock=_unblocked)  # type: ignore[arg-type]
    assert await reads.next(Packed("read", 1)) == ("reply to", ("read", 1)) and reads.waiting == 0  # one at a time
    reads.trickle = True
    assert await reads.next(Packed("read", 2)) == ("reply to", ("read", 2))
    assert reads.waiting == 1 and list(line.sent) == [("read", 2)]  # the same read, sent ahead
    assert await reads.next(None) == ("reply to", ("read", 2)) and reads.waiting == 0


@pytest.mark.parametrize("error", [rex.ResponseError("NOPERM on reconnecting"), ConnectionError("reset")])
async def test_a_failed_send_leaves_no_read_waiting(error):
    line = FakeLine()
    reads = _Reads(line, block_ms=100, unblock=_unblocked)  # type: ignore[arg-type]
    reads.trickle = True
    line.fail_send = error
    with pytest.raises(type(error)):
        await reads.next(Packed("read", 1))
    assert reads.waiting == 0


class GatedLine(FakeLine):
    """A FakeLine whose next reply comes only when ``gate`` is set (a read blocked in Redis until then)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def receive(self, blocking_s: float = 0.0) -> Any:
        await self.gate.wait()
        self.gate.clear()
        return await super().receive(blocking_s)


async def test_a_cut_short_ends_each_read_sent_before_it_as_it_becomes_the_one_blocked():
    # given a trickling lane with two reads sent: the first blocked in Redis, the second queued behind it
    line = GatedLine()
    cuts: list[int] = []

    async def unblock(r: _Reads) -> None:
        cuts.append(len(line.sent))  # how many reads were still unanswered when it was asked to end one

    reads = _Reads(line, block_ms=100, unblock=unblock)  # type: ignore[arg-type]
    reads.trickle = True
    first = asyncio.create_task(reads.next(Packed("read", 1)))
    await eventually(lambda: _sent(line, 2), what="two reads sent")
    # when the lane is cut short, the blocked read is ended
    await reads.cut_short()
    assert cuts == [2] and reads.stale
    # then, its reply taken, the one sent ahead is the one blocked now, and is ended too
    line.gate.set()
    await first
    assert reads.stale
    await reads.cut_again()
    assert cuts == [2, 1]
    # and once that one is answered, nothing sent before the cut is left to end
    line.gate.set()
    await reads.next(None)
    assert not reads.stale and reads.waiting == 0
    await reads.cut_again()
    assert cuts == [2, 1]


async def _sent(line: FakeLine, n: int) -> bool:
    return len(line.sent) >= n


def _read(streams: list[str], count: int, block_ms: int) -> tuple[Any, ...]:
    return ("XREADGROUP", "GROUP", "g", "c", "COUNT", count, "BLOCK", block_ms, "STREAMS", *streams,
            *(">",) * len(streams))


def test_a_lanes_read_is_packed_once_until_its_streams_change() -> None:
    commands = _ReadCommands(_read)
    streams = ["s1", "s2"]
    first = commands.get(streams, 16, 100)
    assert first.data == Packed(*_read(streams, 16, 100)).data
    assert commands.get(streams, 16, 100) is first  # the same list, count and block: packed once
    assert commands.get(streams, 32, 100).args == _read(streams, 32, 100)
    assert commands.get(streams, 16, 100) is first  # another count is packed beside it
    joined = ["s1", "s2", "s3"]  # a stream joined: the worker makes a new list
    assert commands.get(joined, 16, 100).args == _read(joined, 16, 100)


def test_a_lane_keeps_a_bounded_number_of_packed_reads() -> None:
    commands = _ReadCommands(_read)
    streams = ["s1"]
    first = commands.get(streams, 1, 100)
    for count in range(2, 2 + MAX_READ_COMMANDS):
        commands.get(streams, count, 100)
    assert commands.get(streams, 1, 100) is not first  # forgotten past the bound, packed again
    assert len(commands._packed) <= MAX_READ_COMMANDS


async def test_a_packed_call_answers_as_a_call_and_waits_out_its_block(redis_url: str) -> None:
    # given a line whose replies time out after 0.2 s
    client = connect(f"{redis_url}?socket_timeout=0.2")
    line = Line(client)
    try:
        assert await line.call_packed(Packed("ECHO", "x")) == await line.call("ECHO", "x") == b"x"
        # a blocking read may take its BLOCK time on top of the timeout: nil after 0.5 s, not a timeout
        assert await line.call_packed(Packed("XREAD", "BLOCK", 500, "STREAMS", "nothing-here", "$")) is None
    finally:
        await line.close()
        await client.aclose()


@pytest.mark.real_only
@pytest.mark.single_redis
async def test_a_worker_whose_lanes_wait_in_redis_stops_without_waiting_out_their_reads(redis, keys) -> None:
    """Its lanes' reads block for 10 s; it stops in less than half that (CLIENT UNBLOCK ends them at once)."""
    seen: list[str] = []

    async def record(tick: Tick) -> None:
        seen.append(tick.symbol)

    await publish(redis, keys, ticks(1, "A"))
    worker = make_worker(redis, keys, record, block_ms=10_000)
    run = asyncio.create_task(worker.run())
    await eventually(lambda: _seen(seen), what="A's tick")
    await eventually(lambda: _blocked(redis, worker), what="its lane's read blocked in Redis")
    worker.stop()
    await asyncio.wait_for(run, timeout=5)


async def _seen(seen: list[str]) -> bool:
    return bool(seen)


async def _blocked(redis: Any, worker: Any) -> bool:
    """The worker's normal lane has a read blocked in Redis (its connection, by CLIENT ID, flagged ``b``)."""
    reads = worker._lane_reads.get(Priority.NORMAL)
    if reads is None or reads.line.client_id is None:
        return False
    return any(int(c["id"]) == reads.line.client_id and "b" in c["flags"] for c in await redis.client_list())
