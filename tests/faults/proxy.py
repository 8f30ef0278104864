"""A fault-injecting TCP proxy for the fault tests: it sits between a client and Redis on loopback.

The proxy runs its own asyncio loop on a thread of its own, so a test (async or not) and the processes it
starts talk through it while the test switches faults on and off::

    with Proxy("127.0.0.1", redis_port) as proxy:
        url = proxy.url()                 # give this to the client under test
        proxy.delay_s = 0.2               # latency added to every chunk, each way
        proxy.jitter_s = 0.05             # plus a random 0..jitter_s (order is kept)
        proxy.bandwidth_bps = 10_000      # bytes per second, each way, per connection
        proxy.blackhole()                 # keep every connection, forward nothing (until heal())
        proxy.reset()                     # RST every open connection
        proxy.cut(b"XREADGROUP")          # RST the connection in the middle of the reply to that command
        proxy.cut(re.compile(rb"..."))    # ... or to the first command whose bytes the pattern finds
        proxy.cut(b"EVALSHA", when="request")   # ... or before the command reaches Redis

``accepted`` counts the connections clients opened (a retry storm shows there); ``open`` the ones alive now.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable
from types import TracebackType
from typing import Literal, TypeVar

__all__ = ["Proxy"]

T = TypeVar("T")

CHUNK = 65_536
CONTROL_TIMEOUT_S = 10.0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (linger 0), not a FIN: the peer sees 'connection reset', as on a real cut."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Cut:
    """A one-shot order: the next connection that carries ``match`` upstream is reset, before forwarding it
    (``request``) or in the middle of the reply that follows (``reply``)."""

    def __init__(self, match: bytes | re.Pattern[bytes], when: Literal["request", "reply"]) -> None:
        self.match = match
        self.when = when
        self.done = threading.Event()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.cut_reply: _Cut | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _rst(self.client)
        _rst(self.upstream)


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``host:port``, with faults switched from any thread."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.bandwidth_bps = 0
        """0: unlimited."""
        self.accepted = 0
        self.port = 0
        self._links: set[_Link] = set()
        self._cuts: list[_Cut] = []
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()  # cleared while blackholed; only touched on the proxy's loop
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> Proxy:
        """Listen on a free port and start forwarding."""
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening, end the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def url(self, scheme: str = "redis", *, user: str = "", password: str = "", db: int = 0, query: str = "") -> str:
        """A Redis URL that goes through the proxy."""
        auth = f"{user}:{password}@" if user or password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")

    # ---- faults -------------------------------------------------------------------------------------------

    def blackhole(self) -> None:
        """Keep every connection (and accept new ones) but forward nothing either way, until ``heal``; what
        was sent meanwhile is held and then delivered, as TCP retransmits it once a partition ends."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        """End a blackhole."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def reset(self) -> int:
        """Reset every open connection; return how many."""
        return self._call(self._reset_all())

    def cut(self, match: bytes | re.Pattern[bytes], *, when: Literal["request", "reply"] = "reply") -> threading.Event:
        """Arm a one-shot cut of the next connection carrying ``match`` (bytes, or a pattern searched for) to the
        server; the event returned is set once it happened."""
        order = _Cut(match, when)
        self._loop.call_soon_threadsafe(self._cuts.append, order)
        return order.done

    @property
    def open(self) -> int:
        """Connections alive now."""
        return len(self._links)

    # ---- the loop's side ----------------------------------------------------------------------------------

    def _call(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(CONTROL_TIMEOUT_S)

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        tasks = [t for link in list(self._links) for t in link.tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _rst(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, upstream=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.reset()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    upstream: bool) -> None:
        """Read chunks as they come and deliver each after the delay (in order) at the bandwidth allowed."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(link, queue, writer, upstream=upstream))
        last_due = 0.0
        try:
            while data := await reader.read(CHUNK):
                extra = self.delay_s + (random.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
                last_due = max(last_due, time.monotonic() + extra)  # jitter never reorders a stream
                queue.put_nowait((last_due, data))
            queue.put_nowait((last_due, b""))  # end of stream: close the other side after what is queued
            await deliver
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await deliver
            link.reset()

    async def _deliver(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self._flowing.wait()
            if not data:
                return
            if upstream:
                order = self._claim(data)
                if order is not None and order.when == "request":
                    order.done.set()
                    link.reset()
                    return
                if order is not None:
                    link.cut_reply = order
            elif link.cut_reply is not None:
                order, link.cut_reply = link.cut_reply, None
                writer.write(data[: max(1, len(data) // 2)])  # half a reply, then the cut
                await writer.drain()
                order.done.set()
                link.reset()
                return
            await self._write(writer, data)

    def _claim(self, data: bytes) -> _Cut | None:
        for order in self._cuts:
            if order.match.search(data) if isinstance(order.match, re.Pattern) else order.match in data:
                self._cuts.remove(order)
                return order
        return None

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        bps = self.bandwidth_bps
        if not bps:
            writer.write(data)
            await writer.drain()
            return
        step = max(1, bps // 100)  # ~10 ms slices, so a large chunk trickles instead of arriving in a burst
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(len(piece) / bps)
