"""A lane's reads: sent ahead (``fabric.worker._Reads``), how many wait for a reply, whatever fails; and packed
once (``fabric.worker._ReadCommands``, ``fabric.client.Packed``)."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
import redis.exceptions as rex

from fabric.client import Line, Packed, connect
from fabric.worker import MAX_READ_COMMANDS, _ReadCommands, _Reads


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


async def test_a_trickling_lane_keeps_one_read_sent_ahead_and_the_stop_collects_it():
    line = FakeLine()
    reads = _Reads(line, block_ms=100)  # type: ignore[arg-type]
    assert await reads.next(Packed("read", 1)) == ("reply to", ("read", 1)) and reads.waiting == 0  # one at a time
    reads.trickle = True
    assert await reads.next(Packed("read", 2)) == ("reply to", ("read", 2))
    assert reads.waiting == 1 and list(line.sent) == [("read", 2)]  # the same read, sent ahead
    assert await reads.next(None) == ("reply to", ("read", 2)) and reads.waiting == 0


@pytest.mark.parametrize("error", [rex.ResponseError("NOPERM on reconnecting"), ConnectionError("reset")])
async def test_a_failed_send_leaves_no_read_waiting(error):
    line = FakeLine()
    reads = _Reads(line, block_ms=100)  # type: ignore[arg-type]
    reads.trickle = True
    line.fail_send = error
    with pytest.raises(type(error)):
        await reads.next(Packed("read", 1))
    assert reads.waiting == 0


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
