"""The producer: events into their streams, in pipelined batches, each written exactly once.

Cost per event in Python: a route lookup, one msgspec encode and a tuple. A background sender packs a batch
(up to ``max_batch`` events) into one EVALSHA of ``publish.lua`` with hiredis's C packer and writes it on the
publisher's own connection without waiting for the reply to the previous one: up to ``MAX_IN_FLIGHT`` batches
are on the wire, so the producer encodes the next batch while Redis appends the last. A receiver reads the
replies in order and completes the callers' calls.

Exactly once per producer session. Each ``Publisher`` is a session with its own id; it numbers its events per
stream, and ``publish.lua`` keeps every session's last number per stream (``Keys.producers``), so:

- after a connection error, every unconfirmed batch is resent in order on a new connection (up to
  ``retries`` times): what had landed is not written twice;
- a batch that would leave a hole in a stream (an earlier one failed, or Redis lost the session's state) is
  refused whole (GAP) before it writes anything; the publisher waits for the replies still on the wire,
  renews its session and resends the refused batches in order. Per-stream order is kept throughout.

Loss that Redis causes is detected, never silent. Redis can lose writes it had confirmed: a crash with
``appendfsync everysec`` (up to a second), a power loss that cuts the AOF's tail, a restart without persistence,
a FLUSHALL. The events and the session's number in the producer hash are written by one script, so they are lost
together: after every reconnect, and before a GAP renews the session, the publisher reads back its session's number
for every stream it has confirmed events on. A number below the last one confirmed means Redis lost that many
confirmed events of the stream: the publisher logs an error naming the stream and the count, adds the count to
``lost`` and to the ``lost_confirmed:STREAM`` field of ``Keys.counters()``; the events must be republished from
their source. (A session number can also vanish without loss: its hash expires after ``SESSION_TTL_MS`` of
silence, or a session older than that is pruned. Past those ages a missing number is logged as unverifiable.)

``publish`` and ``publish_many`` return once Redis has confirmed the entries (their ids; None for an event
that had already landed, or a duplicate ``event_id`` within the opt-in ``dedup_window_ms``) or raise the
``FabricError`` that explains why not. A full buffer (``max_buffer`` events) makes them wait: backpressure,
never a drop. The first event a session publishes to a new stream adds one SADD to the topic's registry
(repeated every 30 s, so that a registry lost with a Redis restart comes back); a stream new to the registry adds
one PUBLISH of its topic on ``Keys.new_streams_channel``, so that workers join it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import hiredis
import msgspec
import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from fabric import scripts
from fabric.client import (
    _cause,
    connect_within,
    error_code,
    own_connection,
    raise_if_cancelled,
    read_reply,
    read_timeout_s,
    translate,
)
from fabric.codec import FORMAT_VERSION, oversized
from fabric.config import PublisherConfig
from fabric.errors import FabricError, PublishError
from fabric.events import Event
from fabric.keys import Keys, Priority
from fabric.nodes import ClusterLine, is_cluster, slot_of
from fabric.registry import announce, register

__all__ = ["Publisher"]

log = logging.getLogger("fabric.publisher")

MAX_IN_FLIGHT = 4
"""Batches written and not yet answered, on the publisher's connection."""
REGISTRY_REFRESH_S = 30.0
SESSION_TTL_MS = 86_400_000
"""How long Redis keeps a session's sequence numbers after its last write to a stream."""
MAX_REASON_CHARS = 300
"""The longest routing error quoted in a ``PublishError``."""
AUDIT_CHUNK = 500
"""Streams whose session numbers one pipelined round trip of the loss audit reads back."""
VERIFIABLE_S = SESSION_TTL_MS / 1000 * 0.9
"""A session number younger than this cannot have expired or been pruned: its absence is loss."""

_Item = tuple[str, str, bytes, str]  # stream key, type tag, payload, event_id
_Failure = (rex.ConnectionError, rex.TimeoutError, OSError)


class _Request:
    __slots__ = ("items", "future")

    def __init__(self, items: list[_Item], future: asyncio.Future[list[str | None]]) -> None:
        self.items = items
        self.future = future


class _Batch:
    """Requests sent together; ``packed`` keeps its numbering so that a resend is recognised."""

    __slots__ = ("requests", "size", "packed", "attempts", "streams", "lasts", "session", "order", "parts", "ids")

    def __init__(self, requests: list[_Request]) -> None:
        self.requests = requests
        self.size = sum(len(r.items) for r in requests)
        self.packed: bytes | None = None
        self.attempts = 0
        self.streams: list[tuple[str, int]] = []
        """Events per stream, in the order ``_pack`` numbered them."""
        self.lasts: list[int] = []
        """The number of the batch's last event on each of ``streams``, in ``session``."""
        self.session = ""
        self.order: list[int] = []
        """The event behind each of the script's replies (``Publisher._command``)."""
        self.parts: list[_Part] | None = None
        """On a cluster: the batch split by slot, one publish.lua call each (``Publisher._split``)."""
        self.ids: list[bytes | None] | None = None
        """On a cluster: the entry ids confirmed so far, in the batch's order."""

    def fail(self, error: FabricError) -> None:
        for req in self.requests:
            if not req.future.done():
                req.future.set_exception(error)

    def in_order(self, replies: list[bytes | None]) -> list[bytes | None]:
        """The script's replies (grouped by stream) in the batch's order of events."""
        ids: list[bytes | None] = [None] * len(replies)
        for i, reply in zip(self.order, replies, strict=True):
            ids[i] = reply
        return ids

    def complete(self, ids: list[bytes | None]) -> None:
        start = 0
        for req in self.requests:
            n = len(req.items)
            if not req.future.done():
                req.future.set_result([i.decode() if i is not None else None for i in ids[start : start + n]])
            start += n


class _Part:
    """On a cluster, the share of a batch in one slot: its publish.lua call and where its events sit in the
    batch."""

    __slots__ = ("args", "positions", "streams", "lasts", "session", "done")

    def __init__(self, args: tuple[Any, ...], positions: list[int], streams: list[tuple[str, int]],
                 lasts: list[int], session: str) -> None:
        self.args, self.positions, self.streams, self.lasts, self.session = args, positions, streams, lasts, session
        self.done = False


def _retryable(exc: BaseException) -> bool:
    """A failure a resend may cure: a lost connection, or a cluster that could not be reached for now (not a
    refused password, which only a new configuration cures)."""
    if _cause(exc, rex.AuthenticationError) is not None:
        return False
    return isinstance(exc, (*_Failure, rex.RedisClusterException))


def _packed(*args: Any) -> bytes:
    return hiredis.pack_command(args)  # type: ignore[no-any-return]


def _new_session() -> str:
    """12 hex digits of Unix ms (publish.lua prunes sessions by it), then 8 random ones."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(4).hex()}"


class Publisher:
    """Batching, pipelined, exactly-once-per-session publisher; use as ``async with Publisher(client) as pub``."""

    def __init__(self, client: Redis, config: PublisherConfig | None = None, keys: Keys | None = None) -> None:
        self.client = client
        self.config = config or PublisherConfig()
        self.keys = keys or Keys()
        self._encode = (msgspec.json.Encoder() if self.config.encoding == "json" else msgspec.msgpack.Encoder()).encode
        self._routes: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._registered: set[str] = set()
        self._registered_at = time.monotonic()
        self._announcing = True
        """False once Redis refused this user PUBLISH on the new-streams channel (``registry.announce``)."""
        self._session = _new_session()
        self._session_born = time.monotonic()
        self._seq: dict[str, int] = {}
        self._confirmed: dict[str, tuple[int, float]] = {}
        """Per stream: the session's highest number Redis confirmed, and when (monotonic s)."""
        self._pending: deque[_Request] = deque()
        self._pending_events = 0
        self._resend: deque[_Batch] = deque()
        self._inflight: deque[_Batch] = deque()
        self._refused: list[_Batch] = []
        self._renew = False
        self._buffered = 0
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._waiting_room = 0
        """Calls waiting for room in the buffer (``close`` lets them in before it stops the sender)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._conn: AbstractConnection | None = None
        self._reply_timeout_s = read_timeout_s(client)
        """No reply (or connect) within this long: the connection is dead, and what it carried is resent."""
        self.published: dict[str, int] = {}
        """Events written per stream since this publisher started (confirmed by Redis; duplicates not counted)."""
        self._wait_s = self.config.wait_timeout_ms / 1000 if self.config.wait_replicas else 0.0
        self.under_replicated = 0
        """Events confirmed by their primary that fewer than ``wait_replicas`` replicas had within the timeout."""
        self.lost: dict[str, int] = {}
        """Events per stream that Redis confirmed and later lost (see the module docstring), as detected so far."""

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- the caller's side -------------------------------------------------------------------------

    def _route(self, event: Event, topic: str | None, priority: Priority | str | None) -> tuple[str, str]:
        p = event.default_priority if priority is None else Priority.parse(priority)
        try:
            stream = self.keys.stream(topic or event.default_topic, p, event.symbol)
        except ValueError as exc:
            reason = str(exc)
            if len(reason) > MAX_REASON_CHARS:  # a hostile symbol of any length is echoed in the reason
                reason = f"{reason[:MAX_REASON_CHARS]}... ({len(reason)} characters)"
            raise PublishError(f"cannot route {type(event).__name__} {event.event_id[:64]}: {reason}") from None
        return stream, str(type(event).__struct_config__.tag)

    def _prepare(self, events: Iterable[Event], topic: str | None, priority: Priority | str | None) -> list[_Item]:
        items = []
        routes, encode, limit = self._routes, self._encode, self.config.max_payload_bytes
        for event in events:
            key = (event.__class__, event.symbol, topic, priority)
            route = routes.get(key)
            if route is None:
                route = routes[key] = self._route(event, topic, priority)
            data = encode(event)
            if len(data) > limit:
                raise oversized(event, len(data), limit)
            items.append((route[0], route[1], data, event.event_id))
        return items

    async def publish(
        self, event: Event, topic: str | None = None, priority: Priority | str | None = None
    ) -> str | None:
        """Publish one event; return its entry id (None if it had already been written)."""
        return (await self.publish_many((event,), topic, priority))[0]

    async def publish_many(
        self, events: Iterable[Event], topic: str | None = None, priority: Priority | str | None = None
    ) -> list[str | None]:
        """Publish events in order; return their entry ids (None for duplicates) once all are confirmed."""
        events = events if isinstance(events, (list, tuple)) else list(events)
        # Encode only once the first batch has room: calls made together beyond the buffer would otherwise all
        # encode before the sender task ran once, the wire idle meanwhile (the suite's publish, 200 calls of 1,000
        # events gathered at once: its first batch went out after 148 ms of a 711 ms run; now after 23 ms). So an
        # event that cannot be published (too large, unroutable) raises once there is room, still before anything
        # of the call is written.
        await self._room(min(len(events), self.config.max_batch))
        items = self._prepare(events, topic, priority)
        loop = asyncio.get_running_loop()
        futures = []
        step = self.config.max_batch
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            await self._room(len(chunk))
            fut: asyncio.Future[list[str | None]] = loop.create_future()
            self._pending.append(_Request(chunk, fut))
            self._pending_events += len(chunk)
            self._buffered += len(chunk)
            futures.append(fut)
            self._kick()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        results: list[str | None] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # earlier chunks may have landed: say so by raising, as for any failed publish
            results.extend(outcome)
        return results

    async def _room(self, events: int) -> None:
        """Wait until ``events`` more fit in the buffer (or it is empty): backpressure, never a drop."""
        while self._buffered + events > self.config.max_buffer and self._buffered:
            self._space.clear()
            self._waiting_room += 1
            try:
                await self._space.wait()
            finally:
                self._waiting_room -= 1

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            run = self._run_cluster() if is_cluster(self.client) else self._run()
            self._task = asyncio.get_running_loop().create_task(run, name="fabric-publisher")

    async def flush(self) -> None:
        """Wait until every buffered event is confirmed or failed."""
        while not self._idle.is_set():  # (a call woken with this one may have queued more since)
            await self._idle.wait()

    async def close(self) -> None:
        """Flush (calls still waiting for room in the buffer included), then stop the background sender and close
        the connection."""
        await self.flush()
        while self._waiting_room:  # woken by the flush's last batch: each queues its events when it next runs
            await asyncio.sleep(0)
            await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None

    # ---- the background side -----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.05
        while True:
            while not (self._pending or self._resend):  # connect only when there is something to send
                self._wake.clear()
                await self._wake.wait()
            try:
                conn = await self._connection()
                delay = 0.05
                await self._pump(conn)
            except Exception as exc:
                if self._conn is not None:
                    await self._conn.disconnect(nowait=True)  # a read cut short leaves replies unaccounted for
                if isinstance(exc, _Failure) and not isinstance(exc, rex.AuthenticationError):
                    raise_if_cancelled(exc)
                    self._connection_lost(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                else:  # a refusal at connect (password, ACL) or a bug: every caller hears of it, nothing hangs
                    if not isinstance(exc, rex.RedisError):
                        log.exception("publisher failed", exc_info=exc)
                    self._fail_all(translate(exc))

    async def _pump(self, conn: AbstractConnection) -> None:
        """Run the sender and the receiver until one fails; raise its error. (Not a TaskGroup: on 3.11 a
        TaskGroup that ends by a child's error leaves its parent marked as cancelling.)"""
        loops = [asyncio.create_task(self._send_loop(conn)), asyncio.create_task(self._receive_loop(conn))]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _connection(self) -> AbstractConnection:
        if self._conn is None:
            self._conn = own_connection(self.client)
        conn = self._conn
        if not conn.is_connected:
            await connect_within(conn, self._reply_timeout_s)
            await conn.send_command("SCRIPT", "LOAD", scripts.PUBLISH.source)
            await read_reply(conn, self._reply_timeout_s)
            await self._audit(conn)  # a reconnect may follow a Redis restart that lost confirmed events
        return conn

    async def _audit(self, conn: AbstractConnection) -> None:
        """Read back this session's number on every stream it has confirmed events on; report what Redis lost."""
        streams = list(self._confirmed)
        for i in range(0, len(streams), AUDIT_CHUNK):
            chunk = streams[i : i + AUDIT_CHUNK]
            packed = b"".join(_packed("HGET", self.keys.producers(s), self._session) for s in chunk)
            await conn.send_packed_command(packed, check_health=False)
            written = [await read_reply(conn, self._reply_timeout_s) for _ in chunk]
            lost = self._lost_in(chunk, [int(w or 0) for w in written])
            if lost:
                await conn.send_packed_command(b"".join(
                    _packed("HINCRBY", self.keys.counters(), f"lost_confirmed:{s}", n)
                    for s, n in lost.items()), check_health=False)
                for _ in lost:
                    await read_reply(conn, self._reply_timeout_s)

    def _lost_in(self, streams: list[str], written: list[int]) -> dict[str, int]:
        """Compare what Redis holds of this session with what it confirmed; log and count each loss once."""
        lost: dict[str, int] = {}
        now = time.monotonic()
        for stream, w in zip(streams, written, strict=True):
            confirmed, at = self._confirmed[stream]
            if w >= confirmed:
                continue
            self._confirmed[stream] = (w, at)  # reported once
            if w == 0 and max(now - at, now - self._session_born) > VERIFIABLE_S:
                log.warning("cannot verify %d events confirmed on %s: this session's number there is gone, as it "
                            "may be after %d ms without a write", confirmed, stream, SESSION_TTL_MS)
                continue
            lost[stream] = confirmed - w
            self.lost[stream] = self.lost.get(stream, 0) + confirmed - w
            log.error("Redis lost %d events it had confirmed on %s (it holds this publisher's events up to number %d "
                      "of %d): it restarted without its last writes (a crash under appendfsync everysec or no, a "
                      "power loss, a FLUSHALL); republish them from their source, and use appendfsync always where "
                      "that loss is not acceptable", confirmed - w, stream, w, confirmed)
        return lost

    def _connection_lost(self, exc: BaseException) -> None:
        """Everything unconfirmed goes back, oldest first, keeping its numbering (so what landed is recognised);
        a batch past its retries fails: whether it landed is unknown, and the caller is told so."""
        if not (self._refused or self._inflight or self._resend) and self._pending:
            self._resend.append(self._form_batch())  # nothing was sent yet: the connect itself failed
        unconfirmed = (*self._refused, *self._inflight, *self._resend)
        self._refused, self._renew = [], False  # a refused batch is resent as it was; a gap shows again if real
        self._inflight.clear()
        self._resend = deque()
        for batch in unconfirmed:
            batch.attempts += 1
            if batch.attempts <= self.config.retries:
                self._resend.append(batch)
        for batch in unconfirmed:
            if batch.attempts > self.config.retries:
                batch.fail(translate(exc))
                self._done(batch)
        again = self._resend
        if again:
            log.info("publish connection lost (%s): resending %d batches", exc, len(again))

    def _fail_all(self, error: FabricError) -> None:
        unconfirmed = (*self._refused, *self._inflight, *self._resend)
        self._inflight.clear()
        self._resend.clear()
        self._refused = []
        for batch in unconfirmed:
            batch.fail(error)
            self._done(batch)
        while self._pending:
            batch = self._form_batch()
            batch.fail(error)
            self._done(batch)

    async def _send_loop(self, conn: AbstractConnection) -> None:
        while True:
            while len(self._inflight) >= MAX_IN_FLIGHT or self._refused or not (self._resend or self._pending):
                self._wake.clear()
                await self._wake.wait()
            linger = self.config.linger_ms
            if linger and not self._resend and self._pending_events < self.config.max_batch:
                await asyncio.sleep(linger / 1000)
            batch = self._resend.popleft() if self._resend else self._form_batch()
            self._inflight.append(batch)  # from here on, a failure resends it
            self._sent.set()  # the receiver's read (with its timeout) now bounds this batch, even a stuck write
            if batch.packed is None:
                batch.packed = self._pack(batch)
            await self._register(batch)
            await conn.send_packed_command(batch.packed, check_health=False)

    async def _receive_loop(self, conn: AbstractConnection) -> None:
        while True:
            while not self._inflight:
                self._sent.clear()
                await self._sent.wait()
            try:
                ids = await read_reply(conn, self._reply_timeout_s)
            except rex.NoScriptError as exc:  # the script cache was flushed: reconnect (which loads it), resend
                raise rex.ConnectionError(f"publish script unknown to Redis ({exc}): reloading it") from exc
            except rex.ResponseError as exc:
                self._refusal(self._inflight.popleft(), exc)
            else:
                if self.config.wait_replicas:
                    self._replicated(await read_reply(conn, self._reply_timeout_s + self._wait_s), len(ids))
                batch = self._inflight.popleft()
                ids = batch.in_order(ids)
                batch.complete(ids)
                self._count(batch, ids)
                self._done(batch)
            if not self._inflight:
                if self._renew:
                    await self._audit(conn)  # before the new session forgets what the old one had confirmed
                self._stall_released()
            self._wake.set()

    def _count(self, batch: _Batch, ids: list[bytes | None]) -> None:
        if batch.session == self._session:  # (a batch packed before a renewal is numbered in the old session)
            now = time.monotonic()
            confirmed = self._confirmed
            for (stream, _), last in zip(batch.streams, batch.lasts, strict=True):
                confirmed[stream] = (last, now)
        published = self.published
        if None not in ids:  # the usual case: everything was new, count by stream
            for stream, n in batch.streams:
                published[stream] = published.get(stream, 0) + n
            return
        written = iter(ids)
        for req in batch.requests:
            for item in req.items:
                if next(written) is not None:
                    published[item[0]] = published.get(item[0], 0) + 1

    def _replicated(self, replicas: Any, events: int) -> None:
        """Check a WAIT's reply (how many replicas acknowledged the batch; an error reply counts as none)."""
        if isinstance(replicas, BaseException):
            log.warning("WAIT after %d written events failed (%s): counted as not replicated", events, replicas)
            replicas = 0
        if isinstance(replicas, int) and replicas < self.config.wait_replicas:
            self.under_replicated += events
            log.warning("%d events were written but only %d of %d replicas had them within %d ms: a failover now "
                        "could lose them", events, replicas, self.config.wait_replicas, self.config.wait_timeout_ms)

    def _refusal(self, batch: _Batch, exc: rex.ResponseError) -> None:
        code = error_code(exc)
        batch.attempts += 1
        # (NOSCRIPT is handled as a lost connection instead: a reconnect loads the script, then all is resent.)
        if code == "GAP" and batch.attempts <= self.config.retries + 1:
            # Nothing of it was written. Hold new sends until the batches on the wire are answered, then send
            # the refused ones again first, in order (renumbered under a new session after a GAP).
            self._renew = self._renew or code == "GAP"
            self._refused.append(batch)
            return
        error = PublishError(f"Redis refused a publish batch: {exc}") if code == "GAP" else translate(exc)
        batch.fail(error)
        self._done(batch)

    def _stall_released(self) -> None:
        """Every reply is in: the refused batches go first, renumbered under a new session after a GAP (they
        wrote nothing; batches whose fate a lost connection left unknown keep their numbers)."""
        refused, self._refused = self._refused, []
        if self._renew:
            self._renew = False
            self._session = _new_session()
            self._session_born = time.monotonic()
            self._seq.clear()
            self._confirmed.clear()
            for batch in refused:
                batch.packed = None
            log.info("publisher renewed its session after a sequence gap; resending %d batches", len(refused))
        self._resend.extendleft(reversed(refused))

    def _form_batch(self) -> _Batch:
        requests = [self._pending.popleft()]
        size = len(requests[0].items)
        while self._pending and size + len(self._pending[0].items) <= self.config.max_batch:
            requests.append(self._pending.popleft())
            size += len(requests[-1].items)
        self._pending_events -= size
        return _Batch(requests)

    def _done(self, batch: _Batch) -> None:
        self._buffered -= batch.size
        self._space.set()
        if not (self._pending or self._resend or self._inflight or self._refused):
            self._idle.set()

    def _pack(self, batch: _Batch) -> bytes:
        """One EVALSHA of publish.lua for the batch, numbering its events per stream in this session."""
        items = [item for req in batch.requests for item in req.items]
        args, batch.streams, batch.lasts, batch.order = self._command(items)
        batch.session = self._session
        packed: bytes = hiredis.pack_command(args)
        if self.config.wait_replicas:
            packed += _packed("WAIT", self.config.wait_replicas, self.config.wait_timeout_ms)
        return packed

    def _command(self, items: list[_Item]) -> tuple[tuple[Any, ...], list[tuple[str, int]], list[int], list[int]]:
        """The EVALSHA of publish.lua for ``items``, numbered per stream in this session; with the events per
        stream, the number of each stream's last event, and the order of the script's replies (publish.lua takes
        and answers the events grouped by stream: reply k is that of ``items[order[k]]``)."""
        by_stream: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            positions = by_stream.get(item[0])
            if positions is None:
                by_stream[item[0]] = [i]
            else:
                positions.append(i)
        keys: list[str] = []
        runs: list[int] = []
        """Per stream: the number of its first event here, and how many (publish.lua's ARGV after the head)."""
        body: list[Any] = []
        dedup: list[str] = []
        order: list[int] = []
        streams: list[tuple[str, int]] = []
        lasts: list[int] = []
        window = self.config.dedup_window_ms
        seq = self._seq
        for stream, positions in by_stream.items():
            keys += (stream, self.keys.producers(stream))
            n = len(positions)
            first = seq.get(stream, 0) + 1
            seq[stream] = first + n - 1
            runs += (first, n)
            streams.append((stream, n))
            lasts.append(first + n - 1)
            order += positions
            for i in positions:
                item = items[i]
                body += (item[1], item[2])
                if window:
                    dedup.append(self.keys.dedup(stream, item[3]))
        head = (self._session, FORMAT_VERSION, window, SESSION_TTL_MS, self.config.encoding, len(by_stream), *runs)
        args = ("EVALSHA", scripts.PUBLISH.sha, len(keys) + len(dedup), *keys, *dedup, *head, *body)
        return args, streams, lasts, order

    # ---- on a Redis Cluster ------------------------------------------------------------------------

    async def _run_cluster(self) -> None:
        """The sender on a cluster: each batch is split by slot into one publish.lua call per slot, the calls for
        one node pipelined, the nodes at once (``nodes.ClusterLine``, which follows MOVED and ASK); a batch is
        confirmed when all its parts are. Exactly once as on one Redis: a part whose reply was lost is resent as
        it was numbered; a part refused with GAP (nothing written) is renumbered under a new session, after the
        audit of what the old one had confirmed."""
        line = ClusterLine(self.client)  # type: ignore[arg-type]
        delay = 0.05
        try:
            while True:
                while not (self._pending or self._resend):
                    self._wake.clear()
                    await self._wake.wait()
                batch = self._resend.popleft() if self._resend else self._form_batch()
                if batch.parts is None:
                    batch.parts = self._split(batch)
                try:
                    if batch.attempts:
                        await self._audit_cluster(line)  # a failover may have lost confirmed events
                    await self._register(batch)
                    await self._send_parts(line, batch)
                    delay = 0.05
                except Exception as exc:
                    raise_if_cancelled(exc)
                    if not _retryable(exc):
                        if not isinstance(exc, (rex.RedisError, FabricError)):
                            log.exception("publisher failed", exc_info=exc)
                        batch.fail(translate(exc))
                        self._done(batch)
                        continue
                    batch.attempts += 1
                    if batch.attempts > self.config.retries:
                        batch.fail(translate(exc))
                        self._done(batch)
                        continue
                    log.info("publish to the cluster failed (%s): resending in %.2fs", exc, delay)
                    self._resend.appendleft(batch)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            await line.close()

    def _split(self, batch: _Batch) -> list[_Part]:
        """The batch's events by slot, each slot's numbered into one publish.lua call."""
        positions: defaultdict[int, list[int]] = defaultdict(list)
        items = [item for req in batch.requests for item in req.items]
        for i, item in enumerate(items):
            positions[slot_of(item[0])].append(i)
        parts = []
        for where in positions.values():
            args, streams, lasts, order = self._command([items[i] for i in where])
            parts.append(_Part(args, [where[k] for k in order], streams, lasts, self._session))
        batch.ids = [None] * len(items)
        return parts

    async def _send_parts(self, line: ClusterLine, batch: _Batch) -> None:
        """Send the batch's unconfirmed parts; complete it when every part is confirmed."""
        assert batch.parts is not None and batch.ids is not None
        todo = [p for p in batch.parts if not p.done]
        items = self._items_of(batch)
        replies = await self._call_parts(line, todo)
        gaps: list[_Part] = []
        unloaded: list[_Part] = []  # on a node without the script: nothing of them ran
        for part, reply in zip(todo, replies, strict=True):
            if isinstance(reply, rex.NoScriptError):
                unloaded.append(part)
                continue
            if isinstance(reply, rex.ResponseError):
                if error_code(reply) == "GAP" and batch.attempts < self.config.retries + 1:
                    gaps.append(part)
                    continue
                error = PublishError(f"Redis refused a publish batch: {reply}") if error_code(
                    reply) == "GAP" else translate(reply)
                batch.fail(error)
                self._done(batch)
                return
            part.done = True
            for i, entry_id in zip(part.positions, reply, strict=True):
                batch.ids[i] = entry_id
            self._count_part(part, reply, items)
        if unloaded:  # load it where it was missing; the parts confirmed meanwhile stay done
            for key in {(await line.node_for(p.args[3])).name: p.args[3] for p in unloaded}.values():
                await line.call_at(key, "SCRIPT", "LOAD", scripts.PUBLISH.source)
        if gaps:
            await self._renumber(line, batch, gaps, items)
        if gaps or unloaded:
            batch.attempts += 1  # (bounded: the parts still refused after retries + 1 attempts fail the batch)
            self._resend.appendleft(batch)  # the rest goes again first, in order
            return
        batch.complete(batch.ids)
        self._done(batch)

    async def _renumber(self, line: ClusterLine, batch: _Batch, gaps: list[_Part], items: list[_Item]) -> None:
        """Parts refused with GAP wrote nothing: audit what the session had confirmed, renew the session and
        number them in the new one."""
        await self._audit_cluster(line)
        self._session = _new_session()
        self._session_born = time.monotonic()
        self._seq.clear()
        self._confirmed.clear()
        for part in gaps:
            part.args, part.streams, part.lasts, order = self._command([items[i] for i in part.positions])
            part.positions = [part.positions[k] for k in order]  # (already grouped: the same order)
            part.session = self._session
        log.info("publisher renewed its session after a sequence gap; resending %d parts", len(gaps))

    async def _call_parts(self, line: ClusterLine, todo: list[_Part]) -> list[Any]:
        """The parts' publish.lua calls, and when ``wait_replicas`` asks, one WAIT per node behind its last part
        (a WAIT covers every earlier write on its connection: one per part would wait its timeout once per part
        on a node whose replica is gone). A part redirected (a reshard, a failover) is written again after those
        WAITs, maybe elsewhere: it gets a WAIT of its own behind it."""
        if not self.config.wait_replicas:
            return await line.call_many([p.args for p in todo])
        by_node: dict[str, list[int]] = {}
        for i, part in enumerate(todo):
            by_node.setdefault((await line.node_for(part.args[3])).name, []).append(i)
        wait = ("WAIT", self.config.wait_replicas, self.config.wait_timeout_ms)
        behind = [todo[ix[-1]].args[3] for ix in by_node.values()]  # each WAIT routed by its node's last part
        resent: list[int] = []
        replies = await line.call_many([p.args for p in todo] + [wait] * len(by_node),
                                       keys=[p.args[3] for p in todo] + behind, resent=resent)
        again = set(resent)
        for ix, replicas in zip(by_node.values(), replies[len(todo):], strict=True):
            events = sum(len(todo[i].positions) for i in ix
                         if i not in again and not isinstance(replies[i], BaseException))
            if events:
                self._replicated(replicas, events)
        for i in sorted(again):
            if not isinstance(replies[i], BaseException):
                try:
                    replicas = await line.call_at(todo[i].args[3], *wait)
                except rex.ResponseError as exc:  # written all the same: counted as not replicated, not failed
                    replicas = exc
                self._replicated(replicas, len(todo[i].positions))
        return replies[: len(todo)]

    @staticmethod
    def _items_of(batch: _Batch) -> list[_Item]:
        return [item for req in batch.requests for item in req.items]

    def _count_part(self, part: _Part, ids: list[bytes | None], items: list[_Item]) -> None:
        if part.session == self._session:
            now = time.monotonic()
            for (stream, _), last in zip(part.streams, part.lasts, strict=True):
                self._confirmed[stream] = (last, now)
        published = self.published
        for i, entry_id in zip(part.positions, ids, strict=True):
            if entry_id is not None:
                stream = items[i][0]
                published[stream] = published.get(stream, 0) + 1

    async def _audit_cluster(self, line: ClusterLine) -> None:
        """``_audit`` on a cluster: each stream's session number read back from the node that serves it now."""
        streams = list(self._confirmed)
        for i in range(0, len(streams), AUDIT_CHUNK):
            chunk = streams[i : i + AUDIT_CHUNK]
            written = await line.call_many([("HGET", self.keys.producers(s), self._session) for s in chunk])
            for w in written:
                if isinstance(w, BaseException):
                    raise w
            lost = self._lost_in(chunk, [int(w or 0) for w in written])
            for s, n in lost.items():
                await line.call("HINCRBY", self.keys.counters(), f"lost_confirmed:{s}", n)

    async def _register(self, batch: _Batch) -> None:
        now = time.monotonic()
        if now - self._registered_at > REGISTRY_REFRESH_S:  # re-announce: the registry may have been lost
            self._registered.clear()
            self._registered_at = now
        new = {item[0] for req in batch.requests for item in req.items} - self._registered
        if not new:
            return
        try:
            added = await register(self.client, self.keys, new)
        except rex.ResponseError as exc:  # e.g. OOM: the batch's own reply will say so; register next time
            log.warning("could not register %d new streams (retrying with the next batch): %s", len(new), exc)
            return
        self._registered |= new
        if added and self._announcing:
            self._announcing = await announce(self.client, self.keys, added)
