"""The producer: events into their streams, in pipelined batches, each at most once per dedup window.

Cost per event: one msgspec encode, two dict lookups and a few list appends in Python, and the command is
packed by hiredis (``client.FastConnection``). On the wire, one EVALSHA carries a whole batch (``max_batch``
events), so a batch costs one round trip. The first event a process publishes to a new stream adds one SADD to
the topic's registry (repeated every 30 s, so that a registry lost with a Redis restart comes back).

``publish`` and ``publish_many`` return once Redis has confirmed the entries (their ids; None for an event
already published within the dedup window) or raise the ``FabricError`` that explains why it did not.
A full buffer (``max_buffer`` events waiting) makes them wait: backpressure, never a drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from types import TracebackType

import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.client import translate
from fabric.codec import FORMAT_VERSION, Encoded, encode
from fabric.config import PublisherConfig
from fabric.errors import FabricError, PublishError
from fabric.events import Event
from fabric.keys import Keys, Priority

__all__ = ["Publisher"]

log = logging.getLogger("fabric.publisher")

REGISTRY_REFRESH_S = 30.0

_Item = tuple[str, str, Encoded]  # stream key, dedup key, encoded event


class _Request:
    __slots__ = ("items", "future")

    def __init__(self, items: list[_Item], future: asyncio.Future[list[str | None]]) -> None:
        self.items = items
        self.future = future


class Publisher:
    """Batching, idempotent publisher; use as ``async with Publisher(client) as pub``."""

    def __init__(self, client: Redis, config: PublisherConfig | None = None, keys: Keys | None = None) -> None:
        self.client = client
        self.config = config or PublisherConfig()
        self.keys = keys or Keys()
        self._routes: dict[tuple[str, Priority, str | None], tuple[str, str]] = {}
        self._registered: set[str] = set()
        self._registered_at = time.monotonic()
        self._queue: deque[_Request] = deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _route(self, event: Event, topic: str | None, priority: Priority | str | None) -> tuple[str, str]:
        p = event.default_priority if priority is None else Priority.parse(priority)
        k = (topic or event.default_topic, p, event.symbol)
        route = self._routes.get(k)
        if route is None:
            try:
                stream = self.keys.stream(*k)
            except ValueError as exc:
                raise PublishError(f"cannot route {type(event).__name__} {event.event_id}: {exc}") from None
            route = (stream, self.keys.dedup(stream, ""))
            self._routes[k] = route
        return route

    def _prepare(self, events: Iterable[Event], topic: str | None, priority: Priority | str | None) -> list[_Item]:
        items = []
        cfg = self.config
        for event in events:
            stream, dedup_prefix = self._route(event, topic, priority)
            items.append((stream, dedup_prefix + event.event_id, encode(event, cfg.encoding, cfg.max_payload_bytes)))
        return items

    async def publish(
        self, event: Event, topic: str | None = None, priority: Priority | str | None = None
    ) -> str | None:
        """Publish one event; return its entry id, or None if it was already published in the window."""
        return (await self.publish_many((event,), topic, priority))[0]

    async def publish_many(
        self, events: Iterable[Event], topic: str | None = None, priority: Priority | str | None = None
    ) -> list[str | None]:
        """Publish events in order; return their entry ids (None for duplicates) once all are confirmed."""
        items = self._prepare(events, topic, priority)
        loop = asyncio.get_running_loop()
        futures = []
        step = self.config.max_batch
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            while self._buffered + len(chunk) > self.config.max_buffer and self._buffered:
                self._space.clear()
                await self._space.wait()
            fut: asyncio.Future[list[str | None]] = loop.create_future()
            self._queue.append(_Request(chunk, fut))
            self._buffered += len(chunk)
            futures.append(fut)
            self._kick()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        results: list[str | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # Earlier chunks may have landed; republishing all of them is safe within the dedup window.
                raise outcome
            results.extend(outcome)
        return results

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="fabric-publisher")

    async def flush(self) -> None:
        """Wait until every buffered event is confirmed or failed."""
        await self._idle.wait()

    async def close(self) -> None:
        """Flush, then stop the background sender."""
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if self.config.linger_ms and self._queued_events() < self.config.max_batch:
                await asyncio.sleep(self.config.linger_ms / 1000)
            batch = [self._queue.popleft()]
            size = len(batch[0].items)
            while self._queue and size + len(self._queue[0].items) <= self.config.max_batch:
                req = self._queue.popleft()
                batch.append(req)
                size += len(req.items)
            await self._send(batch)
            self._buffered -= size
            self._space.set()

    def _queued_events(self) -> int:
        return sum(len(r.items) for r in self._queue)

    async def _send(self, batch: list[_Request]) -> None:
        items = [item for req in batch for item in req.items]
        try:
            ids = await self._write(items)
        except Exception as exc:  # every failure reaches every caller whose events were in the batch
            err = exc if isinstance(exc, FabricError) else translate(exc)
            log.debug("publish of %d events failed: %s", len(items), err)  # the callers get the error
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(err)
            return
        start = 0
        for req in batch:
            n = len(req.items)
            if not req.future.done():
                req.future.set_result([i.decode() if i is not None else None for i in ids[start : start + n]])
            start += n

    async def _write(self, items: list[_Item]) -> list[bytes | None]:
        await self._register({stream for stream, _, _ in items})
        keys: list[str] = []
        args: list[str | bytes | int] = [self.config.dedup_window_ms, FORMAT_VERSION]
        for stream, dedup, enc in items:
            keys += (stream, dedup)
            args += (enc.type, enc.enc, enc.data)
        attempt = 0
        while True:
            try:
                result: list[bytes | None] = await scripts.PUBLISH(self.client, keys, args)
                return result
            except (rex.ConnectionError, rex.TimeoutError) as exc:
                if attempt >= self.config.retries or isinstance(exc, rex.AuthenticationError):
                    raise translate(exc) from exc
                attempt += 1
                log.info("publish retry %d after %s", attempt, exc)
                await asyncio.sleep(0.05 * 2**attempt)

    async def _register(self, streams: set[str]) -> None:
        now = time.monotonic()
        if now - self._registered_at > REGISTRY_REFRESH_S:  # re-announce: the registry may have been lost
            self._registered.clear()
            self._registered_at = now
        new = streams - self._registered
        if not new:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in new:
                pipe.sadd(self.keys.topic_registry(self.keys.parse_stream(stream).topic), stream)
            await pipe.execute()
        self._registered |= new
