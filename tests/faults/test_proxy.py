"""The fault proxy itself: it forwards faithfully, and each fault does what it says.

An echo server stands behind the proxy (it also keeps what it received, to tell a cut request from a cut reply).
Latency and bandwidth are checked as lower bounds only: the proxy must wait at least that long, never at most.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests.faults.proxy import Proxy
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(30)

READ_DEADLINE_S = 10.0


class Echo:
    """An echo server on loopback that keeps every byte it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e._serve, "127.0.0.1", 0)
    e.port = e.server.sockets[0].getsockname()[1]
    yield e
    e.server.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[Proxy]:
    with Proxy("127.0.0.1", echo.port) as p:
        yield p


async def _open(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _round_trip(proxy: Proxy, payload: bytes) -> bytes:
    reader, writer = await _open(proxy)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), READ_DEADLINE_S)
    finally:
        writer.close()


async def test_bytes_pass_both_ways_unchanged(proxy: Proxy) -> None:
    payload = os.urandom(1_000_000)
    assert await _round_trip(proxy, payload) == payload
    assert proxy.accepted == 1


async def test_a_delay_holds_each_direction_at_least_that_long(proxy: Proxy) -> None:
    proxy.delay_s = 0.1
    start = time.monotonic()
    await _round_trip(proxy, b"ping")
    assert time.monotonic() - start >= 0.2, "a round trip crosses the proxy twice"


async def test_jitter_never_reorders_a_connection(proxy: Proxy) -> None:
    proxy.jitter_s = 0.02
    reader, writer = await _open(proxy)
    sent = b""
    for i in range(200):
        piece = f"{i:04d},".encode()
        writer.write(piece)
        await writer.drain()
        sent += piece
        await asyncio.sleep(0)
    got = await asyncio.wait_for(reader.readexactly(len(sent)), READ_DEADLINE_S)
    writer.close()
    assert got == sent


async def test_a_bandwidth_limit_spreads_a_payload_over_time(proxy: Proxy) -> None:
    proxy.bandwidth_bps = 100_000
    payload = os.urandom(30_000)
    start = time.monotonic()
    assert await _round_trip(proxy, payload) == payload
    # the echo overlaps the two directions: at least one whole crossing, less its last 10 ms slice
    assert time.monotonic() - start >= (len(payload) - 1_000) / 100_000


async def test_reset_cuts_every_open_connection_with_an_rst(proxy: Proxy) -> None:
    conns = [await _open(proxy) for _ in range(3)]
    await eventually(_async(lambda: proxy.open == 3), what="three connections through the proxy")
    assert proxy.reset() == 3
    for reader, writer in conns:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), READ_DEADLINE_S)
        writer.close()


async def test_a_blackhole_holds_traffic_until_healed(proxy: Proxy) -> None:
    reader, writer = await _open(proxy)
    proxy.blackhole()
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(4), 0.3)
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), READ_DEADLINE_S) == b"held"
    writer.close()


async def test_a_blackhole_still_accepts_new_connections(proxy: Proxy) -> None:
    proxy.blackhole()
    reader, writer = await _open(proxy)
    writer.write(b"x")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.3)
    writer.close()
    assert proxy.accepted == 1


async def test_a_reply_cut_lands_the_request_and_half_the_reply(proxy: Proxy, echo: Echo) -> None:
    done = proxy.cut(b"XADD")
    reader, writer = await _open(proxy)
    writer.write(b"XADD some entry\r\n")
    await writer.drain()
    got = b""
    with pytest.raises(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(100), READ_DEADLINE_S):
            got += chunk
    writer.close()
    assert done.is_set()
    assert bytes(echo.received) == b"XADD some entry\r\n", "the server got the whole request"
    assert got and len(got) < len(b"XADD some entry\r\n"), "the client got part of the reply"


async def test_a_request_cut_never_reaches_the_server(proxy: Proxy, echo: Echo) -> None:
    assert await _round_trip(proxy, b"PING\r\n") == b"PING\r\n"
    done = proxy.cut(b"XADD", when="request")
    reader, writer = await _open(proxy)
    writer.write(b"XADD lost\r\n")
    await writer.drain()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), READ_DEADLINE_S)
    writer.close()
    assert done.is_set()
    assert bytes(echo.received) == b"PING\r\n"


async def test_a_cut_is_one_shot(proxy: Proxy) -> None:
    proxy.cut(b"XADD")
    with pytest.raises(ConnectionResetError):
        await _round_trip(proxy, b"XADD 1\r\n")
    assert await _round_trip(proxy, b"XADD 2\r\n") == b"XADD 2\r\n"


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def run() -> bool:
        return check()

    return run
