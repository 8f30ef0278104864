"""A lane's reads sent ahead (``fabric.worker._Reads``): how many wait for a reply, whatever fails."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
import redis.exceptions as rex

from fabric.worker import _Reads


class FakeLine:
    """A connection that answers the commands sent on it in order; a send can be made to fail."""

    def __init__(self) -> None:
        self.sent: deque[tuple[Any, ...]] = deque()
        self.fail_send: BaseException | None = None

    async def call(self, *args: Any) -> Any:
        await self.send(*args)
        return await self.receive()

    async def send(self, *args: Any) -> None:
        if self.fail_send is not None:
            raise self.fail_send  # (Line.send closes the connection on any failure)
        self.sent.append(args)

    async def receive(self, blocking_s: float = 0.0) -> Any:
        return ("reply to", self.sent.popleft())


async def test_a_trickling_lane_keeps_one_read_sent_ahead_and_the_stop_collects_it():
    line = FakeLine()
    reads = _Reads(line, block_ms=100)  # type: ignore[arg-type]
    assert await reads.next(("read", 1)) == ("reply to", ("read", 1)) and reads.waiting == 0  # one at a time
    reads.trickle = True
    assert await reads.next(("read", 2)) == ("reply to", ("read", 2))
    assert reads.waiting == 1 and list(line.sent) == [("read", 2)]  # the same read, sent ahead
    assert await reads.next(None) == ("reply to", ("read", 2)) and reads.waiting == 0


@pytest.mark.parametrize("error", [rex.ResponseError("NOPERM on reconnecting"), ConnectionError("reset")])
async def test_a_failed_send_leaves_no_read_waiting(error):
    line = FakeLine()
    reads = _Reads(line, block_ms=100)  # type: ignore[arg-type]
    reads.trickle = True
    line.fail_send = error
    with pytest.raises(type(error)):
        await reads.next(("read", 1))
    assert reads.waiting == 0
