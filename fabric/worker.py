"""A consumer-group worker: read, handle, commit; and beside that, the loops that keep it honest.

Separate loops share one client (watermill's subscriber, not one big function):

- ``_read_loop``     XREADGROUP across the streams of the lanes that have room, into the priority lanes;
- ``_dispatch_loop`` ``concurrency`` copies: take the next entry by the lane rule, decode, run the handler;
- ``_commit_loop``   outputs + ack of handled entries, batched, atomically per entry (``commit.lua``);
- ``_heartbeat_loop`` resets the idle time of every entry this worker holds, so a slow but live handler is
  never reclaimed;
- ``_reclaim_loop``  XAUTOCLAIM of entries idle past ``reclaim_idle_ms`` (their consumer died);
- ``_retry_loop``    re-claims parked failed entries when their backoff is over (a new delivery);
- ``_discover_loop`` joins streams of new symbols as producers create them;
- ``_trim_loop``     applies the topics' retention.

Outcomes: success commits; ``Reject``, a decode failure, or a failure at ``max_deliveries`` dead-letters
(atomic with the ack); any other failure records the error and parks the entry for a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import msgspec
import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import deadletter, scripts
from fabric.client import error_code, translated
from fabric.codec import FORMAT_VERSION, Encoded, decode_fields, encode
from fabric.config import WorkerConfig
from fabric.errors import DecodeError, FabricError, Reject, Retry
from fabric.events import Event
from fabric.handler import Context, HandlerFn, Middleware, timeout, wrap
from fabric.keys import Keys, Priority, StreamRef
from fabric.lanes import Lanes
from fabric.retention import trim_stream
from fabric.retry import RetryTimer, backoff_ms

__all__ = ["Delivery", "Worker", "WorkerStats", "default_consumer_name"]

log = logging.getLogger("fabric.worker")

RELEASE_IDLE_MS = 86_400_000
TOUCH_CHUNK = 1_000
RECLAIM_COUNT = 100
ERROR_BACKOFF_S = (0.1, 5.0)
CANCEL_WAIT_S = 2.0
GONE = frozenset({"NOGROUP", "UNBLOCKED"})
"""Replies that mean the group or stream no longer exists."""
TRANSIENT = frozenset({"BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"})
"""Replies that mean: the same write will work later."""


def default_consumer_name() -> str:
    """``host-pid-xxxx``: unique per process, readable in XINFO."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Delivery:
    """One entry delivered to this worker."""

    __slots__ = ("stream", "entry_id", "fields", "deliveries")

    def __init__(self, stream: StreamRef, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.fields = fields
        self.deliveries = deliveries


class WorkerStats(msgspec.Struct, kw_only=True):
    """What this worker did since it started."""

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    refused: int = 0
    """Commits refused because another consumer had taken the entry over."""
    trimmed_pending: int = 0
    """Pending entries found trimmed from their stream before anyone handled them."""


_Commit = tuple[Delivery, list[tuple[str, Encoded]]]


def _raise_if_cancelled(exc: BaseException) -> None:
    """A cancelled Redis call can surface as a connection error; never let a retry loop swallow the cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


async def _finish(tasks: Sequence[asyncio.Task[Any]], timeout_s: float) -> set[asyncio.Task[Any]]:
    """Let tasks end within ``timeout_s``, then cancel the rest; return those cancelled. Never hangs: a task that
    ignores its cancellation is abandoned after ``CANCEL_WAIT_S`` with a warning."""
    if not tasks:
        return set()
    late: set[asyncio.Task[Any]] = set(tasks)
    if timeout_s > 0:
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
    for t in late:
        t.cancel()
    if late:
        _, stuck = await asyncio.wait(late, timeout=CANCEL_WAIT_S)
        if stuck:
            log.warning("%d tasks ignored their cancellation and were abandoned", len(stuck))
    return late


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Worker:
    """Runs one handler for one consumer group until ``stop()``."""

    def __init__(
        self,
        client: Redis,
        handler: HandlerFn,
        config: WorkerConfig,
        *,
        keys: Keys | None = None,
        handler_name: str = "handler",
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.client = client
        self.config = config
        self.keys = keys or Keys()
        self.group = config.group
        self._group_bytes = config.group.encode()
        self.consumer = config.consumer or default_consumer_name()
        self.handler_name = handler_name
        chain = list(middleware)
        if config.handler_timeout_s:
            chain.append(timeout(config.handler_timeout_s))
        self._handler = wrap(handler, chain)
        self.stats = WorkerStats()
        self._lanes: Lanes[Delivery] = Lanes(config.prefetch, config.priority_weights)
        self._streams: dict[str, StreamRef] = {}
        self._held: defaultdict[str, set[bytes]] = defaultdict(set)
        self._commits: asyncio.Queue[_Commit | None] = asyncio.Queue()
        self._retries: RetryTimer[Delivery] = RetryTimer()
        self._registered: set[str] = set()
        self._cursors: dict[str, bytes] = {}
        self._skipped: set[str] = set()
        self._dlqs: set[str] = set()
        self._max_held = config.prefetch * len(Priority) + config.concurrency
        """Past this many held entries (read ahead, in flight, parked, committing) the reader pauses."""
        self._stop = asyncio.Event()
        self._halt = asyncio.Event()  # set last, at the end of a drain: stops the heartbeat
        self._joined = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
        """The streams this worker has joined."""
        return sorted(self._streams)

    def stop(self) -> None:
        """Begin a graceful drain; ``run`` returns when it is done."""
        self._stop.set()

    async def wait_joined(self) -> None:
        """Wait until the first discovery has joined the group on the known streams."""
        await self._joined.wait()

    async def run(self) -> None:
        """Join the group, work until ``stop()``, then drain: finish in-flight work within ``grace_s``,
        commit it, and hand back what was not started. Raises ``FabricError`` if Redis refuses at start."""
        with translated():
            await self.client.ping()
        await self.discover()
        self._joined.set()
        reader = asyncio.create_task(self._read_loop())
        loops = [
            self._every(self.config.reclaim_interval_ms, self.reclaim, self._stop),
            self._every(self.config.discover_interval_ms, self.discover, self._stop),
            self._retry_loop(),
        ]
        if self.config.retention:
            loops.append(self._every(self.config.trim_interval_ms, self.trim, self._stop))
        background = [asyncio.create_task(c) for c in loops]
        heartbeat = asyncio.create_task(self._every(self.config.heartbeat_ms, self.heartbeat, self._halt))
        committer = asyncio.create_task(self._commit_loop())
        dispatchers = [asyncio.create_task(self._dispatch_loop()) for _ in range(self.config.concurrency)]
        watched = [reader, *background, heartbeat, committer, *dispatchers]
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *watched], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
            try:
                await self._drain(reader, background, dispatchers, committer, heartbeat)
            finally:
                self._halt.set()
                stopper.cancel()
                await _finish([heartbeat, stopper], CANCEL_WAIT_S)
        except asyncio.CancelledError:  # stopped at once: everything unfinished stays pending in Redis
            self._stop.set()
            self._halt.set()
            await _finish([*watched, stopper], 0)
            raise
        if crashed:
            raise crashed[0].exception()  # type: ignore[misc]

    async def _drain(
        self, reader: asyncio.Task[None], background: list[asyncio.Task[None]],
        dispatchers: list[asyncio.Task[None]], committer: asyncio.Task[None], heartbeat: asyncio.Task[None],
    ) -> None:
        # The reader and the loops end by themselves on _stop (the reader after its current read returns, so
        # entries Redis handed over are seen and released below); they are cancelled only if they hang.
        self._stop.set()
        self._retries.close()  # parked after a failure: their next delivery is a real retry, by anyone
        await _finish([reader, *background], self.config.block_ms / 1000 + 1)
        unstarted = self._lanes.close()
        if await _finish(dispatchers, self.config.grace_s):
            log.warning("handlers still running after %.1fs grace: their entries stay pending", self.config.grace_s)
        await self._commits.put(None)
        if await _finish([committer], self.config.grace_s):  # Redis unreachable: redelivered later
            log.warning("commits did not complete within %.1fs grace: their entries stay pending", self.config.grace_s)
        self._halt.set()  # a heartbeat after the hand-back would undo it
        await _finish([heartbeat], CANCEL_WAIT_S)
        try:
            async with asyncio.timeout(self.config.grace_s):
                released = await self._release(unstarted)
        except (FabricError, rex.RedisError, OSError, TimeoutError) as exc:
            _raise_if_cancelled(exc)
            log.warning("could not hand entries back (they return after reclaim_idle_ms): %s", exc)
        else:
            log.info("drained: %d entries handed back to the group", released)

    async def _release(self, unstarted: list[Delivery]) -> int:
        """Give every held entry back to the group now; unstarted ones keep their delivery count."""
        counts = {(d.stream.key, d.entry_id): d.deliveries - 1 for d in unstarted}
        released = 0
        for stream, ids in self._held.items():
            args: list[Any] = [self.group, self.consumer, RELEASE_IDLE_MS]
            for entry_id in ids:
                args += (entry_id, counts.get((stream, entry_id), -1))
            if ids:
                released += int(await scripts.RELEASE(self.client, [stream], args))
        return released

    async def _every(self, interval_ms: int, step: Callable[[], Awaitable[Any]], until: asyncio.Event) -> None:
        """Run ``step`` every ``interval_ms`` until ``until`` is set; log and back off on Redis errors."""
        delay = ERROR_BACKOFF_S[0]
        while not until.is_set():
            try:
                await step()
                delay, pause = ERROR_BACKOFF_S[0], interval_ms / 1000
            except (FabricError, rex.RedisError, OSError) as exc:
                _raise_if_cancelled(exc)
                log.warning("%s failed, retrying in %.1fs: %s", getattr(step, "__name__", step), delay, exc)
                pause, delay = delay, min(delay * 2, ERROR_BACKOFF_S[1])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), pause)

    # ---- joining streams -------------------------------------------------------------------------

    async def discover(self) -> list[str]:
        """Join the group on streams of the worker's topics it has not joined yet; return them."""
        async with self.client.pipeline(transaction=False) as pipe:
            for topic in self.config.topics:
                pipe.smembers(self.keys.topic_registry(topic))
            members = await pipe.execute()
        refs = {}
        for name in sorted({m.decode(errors="replace") for ms in members for m in ms} - self._streams.keys()):
            try:
                refs[name] = self.keys.parse_stream(name)
            except ValueError as exc:
                if name not in self._skipped:
                    self._skipped.add(name)
                    log.error("skipping %s in a topic registry: %s", name, exc)
        if not refs:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in refs:
                pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for (stream, ref), result in zip(refs.items(), results, strict=True):
            if isinstance(result, Exception) and error_code(result) != "BUSYGROUP":
                raise result
            self._streams[stream] = ref
        log.info("joined group %s on %d new streams", self.group, len(refs))
        return list(refs)

    # ---- reading and handling --------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = ERROR_BACKOFF_S[0]
        while not self._stop.is_set():
            lanes = self._lanes
            if self._held_total() >= self._max_held:  # parked retries and pending commits count too
                await asyncio.sleep(self.config.block_ms / 1000 / 10)
                continue
            streams = {s: b">" for s, ref in self._streams.items() if lanes.room(ref.priority) > 0}
            if not streams:
                if self._streams:
                    await lanes.wait_room(ref.priority for ref in self._streams.values())
                else:
                    await asyncio.sleep(self.config.block_ms / 1000)
                continue
            count = max(8, min(lanes.room(ref.priority) for ref in map(self._streams.__getitem__, streams))
                        // len(streams))
            try:
                reply: Any = await self.client.xreadgroup(
                    self.group, self.consumer, streams, count=count, block=self.config.block_ms  # type: ignore[arg-type]
                )
                delay = ERROR_BACKOFF_S[0]
            except rex.ResponseError as exc:
                _raise_if_cancelled(exc)
                if error_code(exc) in GONE:
                    self._group_gone(exc)
                else:
                    log.warning("read refused, retrying in %.1fs: %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, ERROR_BACKOFF_S[1])
                continue
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                _raise_if_cancelled(exc)
                log.warning("read failed, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, ERROR_BACKOFF_S[1])
                continue
            for stream, entries in reply or ():
                name = stream.decode()
                # a rejoin may have cleared the map while this read was in flight; its entries are ours all the same
                ref = self._streams.get(name) or self.keys.parse_stream(name)
                held = self._held[ref.key]
                for entry_id, fields in entries:
                    held.add(entry_id)
                    lanes.put(ref.priority, Delivery(ref, entry_id, fields, 1))

    def _held_total(self) -> int:
        return sum(len(ids) for ids in self._held.values())

    async def _dispatch_loop(self) -> None:
        while (d := await self._lanes.get()) is not None:
            await self.process(d)

    async def process(self, d: Delivery) -> None:
        """Handle one delivery to its end: commit, park for retry, or dead-letter."""
        target = d.fields.get(b"for_group")
        if target is not None and target != self._group_bytes:  # a replay meant for another group
            self._commits.put_nowait((d, []))
            return
        if d.deliveries > self.config.max_deliveries:
            await self._dead_letter(d, "", "")
            return
        try:
            event = decode_fields(d.fields)
        except DecodeError as exc:
            await self._dead_letter(d, type(exc).__name__, exc.reason)
            return
        ref = d.stream
        ctx = Context(
            stream=ref.key, topic=ref.topic, priority=ref.priority.label, symbol=ref.symbol,
            entry_id=d.entry_id.decode(), delivery_count=d.deliveries, group=self.group,
            consumer=self.consumer,
        )
        try:
            outputs = self._outputs(event, await self._handler(event, ctx))
        except Reject as exc:
            await self._dead_letter(d, "Reject", exc.reason)
        except Retry as exc:
            await self._failed(d, "Retry", exc.reason, exc.after_ms / 1000)
        except Exception as exc:  # a handler's failure is data: recorded, retried, dead-lettered
            await self._failed(d, type(exc).__name__, str(exc) or repr(exc), None)
        else:
            self._commits.put_nowait((d, outputs))

    def _outputs(self, event: Event, results: list[Event]) -> list[tuple[str, Encoded]]:
        out = []
        cfg = self.config
        for r in results:
            r = msgspec.structs.replace(
                r, correlation_id=event.root_id, causation_id=event.event_id, producer=self.handler_name
            )
            priority = r.default_priority if cfg.output_priority is None else cfg.output_priority
            stream = self.keys.stream(cfg.output_topic or r.default_topic, priority, r.symbol)
            out.append((stream, encode(r, cfg.encoding)))
        return out

    # ---- outcomes --------------------------------------------------------------------------------

    async def _failed(self, d: Delivery, error_type: str, message: str, after_s: float | None) -> None:
        self.stats.failed += 1
        log.warning("%s failed on %s %s (delivery %d): %s: %s", self.handler_name, d.stream.key,
                    d.entry_id.decode(), d.deliveries, error_type, message)
        if d.deliveries >= self.config.max_deliveries:
            await self._dead_letter(d, error_type, message)
            return
        ref = d.stream
        owned = await self._retrying(lambda: scripts.FAIL(
            self.client,
            [ref.key, self.keys.failures(ref.key)],
            [self.group, self.consumer, d.entry_id, self.handler_name, error_type, message[:2000]],
        ))
        if not owned:
            self._held[ref.key].discard(d.entry_id)
            return
        cfg = self.config
        if after_s is None:
            after_s = backoff_ms(d.deliveries, cfg.backoff_base_ms, cfg.backoff_max_ms) / 1000
        self._retries.park(d, after_s)

    async def _dead_letter(self, d: Delivery, error_type: str, message: str) -> None:
        moved = await self._retrying(lambda: deadletter.move(
            self.client, self.keys, d.stream.key, d.entry_id, group=self.group, consumer=self.consumer,
            handler=self.handler_name, error_type=error_type, error=message, deliveries=d.deliveries,
            registered=self._dlqs,
        ))
        self._held[d.stream.key].discard(d.entry_id)
        if moved:
            self.stats.dead_lettered += 1
            log.error("dead-lettered %s %s after %d deliveries: %s %s", d.stream.key, d.entry_id.decode(),
                      d.deliveries, error_type or "max deliveries", message)

    # ---- committing ------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        queue = self._commits
        while True:
            item = await queue.get()
            if item is None:
                return
            batch = [item]
            final = False
            while len(batch) < self.config.commit_batch and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    final = True
                    break
                batch.append(nxt)
            await self._commit(batch)
            if final:
                return

    async def _commit(self, batch: list[_Commit]) -> None:
        keys: list[str] = []
        index: dict[str, int] = {}

        def ix(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]

        args: list[Any] = [self.group, self.consumer, FORMAT_VERSION]
        for d, outputs in batch:
            stream = d.stream.key
            failures = ix(self.keys.failures(stream)) if d.deliveries > 1 else 0
            args += (ix(stream), failures, d.entry_id, len(outputs))
            for out_stream, enc in outputs:
                args += (ix(out_stream), enc.type, enc.enc, enc.data)
        await self._register({s for _, outs in batch for s, _ in outs})
        results = await self._retrying(lambda: scripts.COMMIT(self.client, keys, args))
        if results is None:  # the group is gone: nothing to ack; the rejoin delivers these again
            for d, _ in batch:
                self._held[d.stream.key].discard(d.entry_id)
            return
        for (d, _), ok in zip(batch, results, strict=True):
            self._held[d.stream.key].discard(d.entry_id)
            if ok:
                self.stats.handled += 1
            else:
                self.stats.refused += 1
                log.warning("commit of %s %s refused: another consumer took it over (late, not applied)",
                            d.stream.key, d.entry_id.decode())

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run a write, retrying through connection loss, OOM and transient refusals (the entries stay pending and
        fresh meanwhile). Returns None when the group or stream is gone: the write cannot apply any more."""
        delay = ERROR_BACKOFF_S[0]
        while True:
            try:
                return await call()
            except rex.ResponseError as exc:
                _raise_if_cancelled(exc)
                code = error_code(exc)
                if code in GONE:
                    self._group_gone(exc)
                    return None
                if code not in TRANSIENT and not isinstance(exc, rex.OutOfMemoryError):
                    raise
                log.warning("write refused, retrying in %.1fs: %s", delay, exc)
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                _raise_if_cancelled(exc)
                log.warning("write failed, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, ERROR_BACKOFF_S[1])

    def _group_gone(self, exc: BaseException) -> None:
        """The group or a stream was deleted under this worker: rejoin everything on the next discovery. The
        group is recreated from the start of each stream, so what is retained is delivered again (never lost)."""
        log.error("group %s or one of its streams was deleted under this worker (%s): rejoining from the start "
                  "of each stream, so retained entries will be delivered again", self.group, exc)
        self._streams.clear()
        self._cursors.clear()

    async def _register(self, streams: set[str]) -> None:
        new = streams - self._registered
        if new:
            async with self.client.pipeline(transaction=False) as pipe:
                for s in new:
                    pipe.sadd(self.keys.topic_registry(self.keys.parse_stream(s).topic), s)
                await pipe.execute()
            self._registered |= new

    # ---- keeping held entries, reclaiming others' ------------------------------------------------

    async def heartbeat(self) -> None:
        """Reset the idle time of every entry this worker holds (buffered, in flight, parked, committing)."""
        for stream, ids in list(self._held.items()):
            pending = list(ids)
            for i in range(0, len(pending), TOUCH_CHUNK):
                chunk = pending[i : i + TOUCH_CHUNK]
                lost = await scripts.TOUCH(self.client, [stream], [self.group, self.consumer, len(chunk), *chunk])
                for entry_id in lost[0] if lost else ():
                    ids.discard(entry_id)

    async def reclaim(self) -> int:
        """Take over entries idle past ``reclaim_idle_ms`` on the joined streams; return how many."""
        total = 0
        for stream, ref in list(self._streams.items()):
            room = self._lanes.room(ref.priority)
            if room <= 0:
                continue
            cursor, claimed, deleted = await scripts.RECLAIM(
                self.client,
                [stream, self.keys.failures(stream)],
                [self.group, self.consumer, self.config.reclaim_idle_ms, min(room, RECLAIM_COUNT),
                 self._cursors.get(stream, b"0-0")],
            )
            self._cursors[stream] = cursor
            held = self._held[stream]
            for entry_id, fields, count in claimed:
                if entry_id in held:
                    continue
                held.add(entry_id)
                self._lanes.put(ref.priority, Delivery(ref, entry_id, _pairs(fields), int(count)))
                total += 1
            if deleted:
                await self._trimmed_pending(stream, deleted)
        self.stats.reclaimed += total
        if total:
            log.info("reclaimed %d entries idle over %d ms", total, self.config.reclaim_idle_ms)
        return total

    async def _trimmed_pending(self, stream: str, ids: list[bytes]) -> None:
        self.stats.trimmed_pending += len(ids)
        await self.client.hincrby(self.keys.counters(), f"trimmed_pending:{stream}", len(ids))
        log.warning("%d pending entries of %s were trimmed before they were handled (group %s): %s",
                    len(ids), stream, self.group, b", ".join(ids[:10]).decode())

    async def _retry_loop(self) -> None:
        while due := await self._retries.due():
            by_stream: defaultdict[str, list[Delivery]] = defaultdict(list)
            for d in due:
                by_stream[d.stream.key].append(d)
            for stream, ds in by_stream.items():
                args = [self.group, self.consumer, *(d.entry_id for d in ds)]
                claimed = await self._retrying(partial(scripts.CLAIM, self.client, [stream], args))
                got = {entry_id: int(count) for entry_id, _, count in claimed or ()}
                for d in ds:
                    if d.entry_id in got:
                        d.deliveries = got[d.entry_id]
                        self._lanes.put(d.stream.priority, d)
                    else:
                        self._held[stream].discard(d.entry_id)

    async def trim(self) -> None:
        """Apply the configured retention to the joined streams of each topic."""
        for stream, ref in list(self._streams.items()):
            retention = self.config.retention.get(ref.topic)
            if retention is not None:
                await trim_stream(self.client, self.keys, stream, retention)
