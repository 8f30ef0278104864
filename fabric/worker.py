"""A consumer-group worker: read, handle, commit; and beside that, the loops that keep it honest.

Separate loops share one client (watermill's subscriber, not one big function):

- ``_read_loop``     one per priority, each on its own connection: XREADGROUP (blocking) across that
  priority's streams while its lane has room, so a flood of low entries never delays reading critical ones
  (on a Redis Cluster, one read per slot and a short blocking wait per node: ``_read_loop_cluster``);
- ``_dispatch_loop`` ``concurrency`` copies: take the next entry by the lane rule, decode, run the handler;
  they take turns (``turns.py``), so that handlers that never wait still let the loop poll I/O every
  ``SLICE_S``: reads (a critical entry) and commits keep flowing under load;
- ``_commit_loop``   on its own connection: one ``ack.lua`` call acks every plainly handled entry of a batch
  (one XACK per stream); entries with outputs or a failure record go through ``commit.lua`` (outputs + ack
  atomically per entry, refused if another consumer took the entry over); on a cluster, one call per slot, and
  outputs outside their input's slot written first, once each (``_commit_slots``);
- ``heartbeat``      resets the idle time of entries this worker has held for a while, so a slow but live
  handler is never reclaimed;
- ``_reclaim_loop``  XAUTOCLAIM of entries idle past ``reclaim_idle_ms`` (their consumer died);
- ``_retry_loop``    re-claims parked failed entries when their backoff is over (a new delivery);
- ``_discover_loop`` joins streams of new symbols as producers create them: every ``discover_interval_ms``, and
  at once when a producer announces one (``_announced``, on ``Keys.new_streams_channel``);
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
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import msgspec
import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import deadletter, scripts
from fabric.breaker import Breaker, BreakerStore, Deferred, Withheld, guard
from fabric.client import Line, Packed, error_code, raise_if_cancelled, translated
from fabric.codec import FORMAT_VERSION, Encoded, decode_entry, encode, fields_of
from fabric.config import WorkerConfig
from fabric.errors import DecodeError, FabricError, Reject, Retry
from fabric.events import Event
from fabric.handler import (
    UNWATCHED,
    Context,
    Deadlines,
    HandlerFn,
    Middleware,
    Watch,
    current_task,
    needs_timed,
    timed,
    wrap,
)
from fabric.keys import Keys, Priority, StreamRef
from fabric.lanes import Lanes
from fabric.nodes import ClusterLine, by_slot, is_cluster, line_for, slot_of
from fabric.registry import announce, register
from fabric.retention import trim_stream
from fabric.retirement import retire_idle_consumers
from fabric.retry import RetryTimer, backoff_ms
from fabric.tally import BATCH_BUCKETS, Tally
from fabric.turns import Turns

__all__ = ["Delivery", "Worker", "WorkerStats", "default_consumer_name", "finish"]

log = logging.getLogger("fabric.worker")

RELEASE_IDLE_MS = 86_400_000
FEW = 64
"""A read of fewer entries is a trickle: its reader yields so that a dispatcher starts on them at once, and, while a
lower lane keeps the worker busy, keeps a read sent ahead (``_Reads``); under load, reads are larger and the reader
goes straight on, one read at a time."""
MIN_READ = 16
"""Fewest entries a read asks each stream for."""
MAX_READ_COMMANDS = 64
"""Most packed reads a lane keeps (one per count asked; under load the count follows the lane's room)."""
_LABELS = tuple(p.label for p in Priority)
COMMIT_LINGER_S = 0.0005
"""A commit smaller than a full batch waits this long for more (acks are not on the latency path)."""
ACK_LINGER_S = 0.005
"""A commit of acks alone (no outputs) smaller than a full batch waits up to this long in all for more: at a low
rate one ack call per few events instead of one per event, so Redis and the worker spend their CPU on the events
themselves (on two cores the saved wake-ups showed in the latency at 5,000/s). An entry with outputs, a full batch,
a reader held back by the cap on held entries, or the stop ends the wait (an entry with outputs still waits
``COMMIT_LINGER_S``, as before). An ack held back is only later, never lost: a crash meanwhile redelivers the entry."""
SLICE_S = 0.0002
"""How long the dispatcher holding the turn runs handlers that never wait before the loop polls I/O."""
TOUCH_CHUNK = 1_000
RECLAIM_COUNT = 100
ERROR_BACKOFF_S = (0.1, 5.0)
CANCEL_WAIT_S = 2.0
CLUSTER_BLOCK_MS = 50
"""On a cluster, the longest a reader waits on one slot per node before reading every slot again."""
UNBLOCK_TRIES = 3
UNBLOCK_AGAIN_S = 0.002
"""How often, and how far apart, ``_unblock`` asks again for a read that had not blocked yet."""
OUTPUT_MARK_TTL_MS = 86_400_000
"""On a cluster, how long the mark of an output written in another slot than its input outlives a crash before
the input's ack (once the input is acked, the mark is deleted)."""
GONE = frozenset({"NOGROUP", "UNBLOCKED"})
"""Replies that mean the group or stream no longer exists."""
TRANSIENT = frozenset({"BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"})
"""Replies that mean: the same write will work later."""
_Read = Callable[[list[str], int, bool], Awaitable[int]]
"""A lane's read: (its streams, how many entries to ask each for, primed) → how many entries were taken. A count
of 0 sends nothing and only takes the reply of a read sent ahead (``_Reads``)."""


def default_consumer_name() -> str:
    """``host-pid-xxxx``: unique per process, readable in XINFO."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Delivery(msgspec.Struct, gc=False, eq=False):
    """One entry delivered to this worker. A Struct is made in a third of the time a class with ``__slots__`` takes
    (one per entry read); it refers to nothing that refers back, so the garbage collector need not track it, and
    two are equal only if they are the same."""

    stream: StreamRef
    entry_id: bytes
    fields: list[bytes]
    deliveries: int


class WorkerStats(msgspec.Struct, kw_only=True):
    """What this worker did since it started (the metrics read these: counting costs the hot path nothing more)."""

    delivered: int = 0
    """Entries taken for handling: new reads, reclaimed ones and retries."""
    handled: int = 0
    """Acknowledged after success."""
    failed: int = 0
    """Deliveries whose handler failed."""
    retried: int = 0
    """Failures parked for another delivery."""
    dead_lettered: int = 0
    rejected: int = 0
    """Handler calls that raised ``Reject`` (dead-lettered)."""
    invalid: int = 0
    """Entries that did not decode to a known event (dead-lettered)."""
    reclaimed: int = 0
    refused: int = 0
    """Commits refused because another consumer had taken the entry over."""
    trimmed_pending: int = 0
    """Pending entries found trimmed from their stream before anyone handled them."""


_Commit = tuple[Delivery, list[tuple[str, Encoded]]]


class _ReadCommands:
    """A lane's blocking XREADGROUP, packed once per (count, block) and kept while the lane's streams stay the same
    list (``Worker._lane_streams`` makes a new one when they change): at a low rate every event costs a read, and
    packing 50 streams' names and ids again for each took about 10 µs of the worker's CPU on its path."""

    def __init__(self, make: Callable[[list[str], int, int], tuple[Any, ...]]) -> None:
        self._make = make
        self._streams: list[str] | None = None
        self._packed: dict[tuple[int, int], Packed] = {}

    def get(self, streams: list[str], count: int, block_ms: int) -> Packed:
        if streams is not self._streams or len(self._packed) >= MAX_READ_COMMANDS:
            self._streams, self._packed = streams, {}
        command = self._packed.get((count, block_ms))
        if command is None:
            command = self._packed[(count, block_ms)] = Packed(*self._make(streams, count, block_ms))
        return command


class _Reads:
    """A lane's blocking reads on one connection, with the next one sent ahead while the lane trickles and a lower
    lane keeps the worker busy.

    After a read that took fewer than ``FEW`` entries while a lower lane holds entries, the next read is sent before
    the reply to the current one is read, so one read always waits in Redis, which runs a client's next command as
    soon as its blocked one is answered: an entry that arrives while the worker takes the last one's is handed over
    at once, not when the worker's event loop gets round to sending the next read. (A busy worker's loop pass takes
    a millisecond or more; with critical entries at 1,000/s and the low lane flooded, most arrived in that gap:
    see ``python -m bench.latency --flood``.) Otherwise reads go out one at a time: an idle worker sends its next
    read at once anyway. A read sent ahead asks for what the lane had room for before the current one's entries
    were queued, so a lane can overfill by one read."""

    def __init__(self, line: Line, block_ms: int, unblock: Callable[[_Reads], Awaitable[None]]) -> None:
        self.line = line
        self.waiting = 0
        """Reads sent without waiting for their reply (the first, and one ahead of it), not answered yet: at most
        two; the plain round trip's read is not counted here."""
        self.trickle = False
        """The last read took fewer than ``FEW`` entries while a lower lane held entries: send the next one ahead."""
        self._block_s = block_ms / 1000
        self._calling = False
        """The plain round trip's read is out (not counted in ``waiting``)."""
        self._stale = 0
        """Of the reads out (``waiting``, or the plain round trip's), how many were sent before ``cut_short``: each
        is ended in turn as it becomes the one blocked."""
        self._unblock = unblock

    @property
    def stale(self) -> bool:
        """A read sent before ``cut_short`` still waits for its reply."""
        return bool(self._stale and (self.waiting or self._calling))

    async def cut_short(self) -> None:
        """End the blocked wait of the reads already sent (CLIENT UNBLOCK, as at their timeout: nothing delivered),
        so that the next read is made at once: the lane gained streams, or the worker stops. A second read sent
        ahead blocks once the first is answered: ``cut_again`` ends it then."""
        self._stale = self.waiting or int(self._calling)
        await self.cut_again()

    async def cut_again(self) -> None:
        """``cut_short``'s end of the read now blocked, if it was sent before the cut."""
        if self.stale:
            await self._unblock(self)

    async def next(self, command: Packed | None) -> Any:
        """Send ``command`` unless a read waits already (and once more ahead of it while the lane trickles), then
        return the reply to the oldest read waiting. None sends nothing (the lane has no room, or the worker
        stops): only a read already waiting is answered."""
        line = self.line
        if command is not None and not self.waiting and not self.trickle:
            self._calling = True
            try:
                return await line.call_packed(command)  # one at a time: the plain round trip
            finally:
                self._calling, self._stale = False, 0
        try:
            if command is not None:
                if not self.waiting:  # (counted before it goes: a cut while it is sent ends it too)
                    self.waiting = 1
                    await line.send_packed(command)
                if self.trickle and self.waiting == 1:
                    self.waiting = 2
                    await line.send_packed(command)
        except BaseException:
            self.waiting = self._stale = 0  # a failed send closed the connection, and the replies still to read
            raise
        try:
            reply = await line.receive(self._block_s)
        except rex.ResponseError:
            self._answered()  # that reply was read; a read sent after it still waits for its own
            raise
        except BaseException:
            self.waiting = self._stale = 0  # the connection was closed, and the replies still to read with it
            raise
        self._answered()
        return reply

    def _answered(self) -> None:
        self.waiting -= 1
        self._stale = max(0, self._stale - 1)


async def finish(tasks: Sequence[asyncio.Task[Any]], timeout_s: float) -> set[asyncio.Task[Any]]:
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


async def first_done(tasks: Sequence[asyncio.Future[Any]], stop: asyncio.Event) -> None:
    """Wait until one of ``tasks`` is done or ``stop`` is set."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()


async def first_set(events: Sequence[asyncio.Event], timeout_s: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout_s`` has passed."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    if not waits:
        await asyncio.sleep(timeout_s)
        return
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


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
        fallback: HandlerFn | None = None,
    ) -> None:
        self.client = client
        self.config = config
        self.keys = keys or Keys()
        self.group = config.group
        self._group_bytes = config.group.encode()
        self.consumer = config.consumer or default_consumer_name()
        self.handler_name = handler_name
        self._breakers = [Breaker(BreakerStore(client, self.keys, c)) for c in config.breakers]
        self._fallback = fallback
        self._stop = asyncio.Event()
        self._withheld: list[Delivery] = []
        """Entries a breaker held back from the handler when the worker stopped: handed back as unstarted."""
        self._deadlines = Deadlines(config.handler_timeout_s)
        chain = [guard(self._breakers, self._stop, fallback)] if self._breakers else []  # outermost: waits untimed
        chain += middleware
        self._times_calls = not needs_timed(chain)
        """No middleware, or only middleware blind to timeouts (fabric's metrics and log context): ``process`` (and
        the ordered mode's ``_call``) mark each handler call on their task's watch themselves. Otherwise ``timed``,
        innermost, does, and the middleware sees a timeout as ``TimeoutError``."""
        if not self._times_calls and config.handler_timeout_s:
            chain.append(timed(self._deadlines))
        self._handler = wrap(handler, chain)
        self.stats = WorkerStats()
        self.read_sizes = Tally(BATCH_BUCKETS)
        """Entries per XREADGROUP reply."""
        self.published: dict[str, int] = {}
        """Events the handler returned and the worker wrote, per stream (committed with their input's ack)."""
        self._lanes: Lanes[Delivery] = Lanes(config.prefetch, config.priority_weights)
        self._turns = Turns()
        self._unprimed = len(Priority)  # readers yet to make their first read
        self._primed = asyncio.Event()
        self._streams: dict[str, StreamRef] = {}
        self._by_name: dict[bytes, StreamRef] = {}
        self._by_priority: dict[Priority, list[str]] = {}
        self._slots: dict[Priority, tuple[list[str], list[list[str]]]] = {}
        """On a cluster, per lane: its streams (``_by_priority``'s list) and those grouped by slot."""
        self._held: defaultdict[str, dict[bytes, float]] = defaultdict(dict)
        """Per stream, the entries this worker holds and when it last took or touched each (monotonic s)."""
        self._released = asyncio.Event()
        self._changed = asyncio.Event()  # the joined streams changed
        self._discover_now = asyncio.Event()
        """A producer announced a new stream of one of the topics (``_announced``): discover without waiting."""
        self._lane_reads: dict[Priority, _Reads] = {}
        """Each lane's reads on a single Redis (``_reader``), for ``_unblock``."""
        self._unblock_refused = False
        self._commits: list[_Commit] = []
        """Handled entries to commit with their outputs, or with their failure record cleared (redelivered)."""
        self._acks: defaultdict[str, list[bytes]] = defaultdict(list)
        """Per stream, the ids of handled entries that need only an ack (no outputs, first delivery): most of them,
        kept apart and grouped as they come, so the commit loop does not sort a batch out again."""
        self._acks_waiting = 0
        self._commit_ready = asyncio.Event()
        self._commit_now = asyncio.Event()
        """A commit with outputs, a full batch, a reader waiting at the cap, or the stop: no more lingering."""
        self._commits_closed = False
        self._retries: RetryTimer[Delivery] = RetryTimer()
        self._registered: set[str] = set()
        self._announcing = True
        """False once Redis refused this user PUBLISH on the new-streams channel (``registry.announce``)."""
        self._cursors: dict[str, bytes] = {}
        self._reclaim_turn = 0
        self._skipped: set[str] = set()
        self._dlqs: set[str] = set()
        self._max_held = config.prefetch * len(Priority) + config.concurrency
        """Past this many held entries (read ahead, in flight, parked, committing) the reader pauses."""
        self._full_batch = min(config.commit_batch, max(1, self._max_held // 2))
        """Commits that go without lingering: ``commit_batch``, or half of what the worker may hold if that is less
        (a small ``prefetch``), so acks held back never keep the reader waiting at the cap."""
        self._halt = asyncio.Event()  # set last, at the end of a drain: stops the heartbeat
        self._joined = asyncio.Event()
        self._reads_failing = False

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def streams(self) -> list[str]:
        """The streams this worker has joined."""
        return sorted(self._streams)

    def stop(self) -> None:
        """Begin a graceful drain; ``run`` returns when it is done."""
        self._stop.set()

    @property
    def readiness(self) -> str | None:
        """None when ready for work (joined its group, reading from Redis without errors, not draining), else
        why not."""
        if self._stop.is_set():
            return "draining"
        if not self._joined.is_set():
            return "joining its group"
        if self._reads_failing:
            return "reads from Redis are failing"
        return None

    @property
    def ready(self) -> bool:
        """``readiness`` is None."""
        return self.readiness is None

    async def wait_joined(self) -> None:
        """Wait until the first discovery has joined the group on the known streams."""
        await self._joined.wait()

    async def run(self) -> None:
        """Join the group, work until ``stop()``, then drain: finish in-flight work within ``grace_s``,
        commit it, and hand back what was not started. Raises ``FabricError`` if Redis refuses at start."""
        with translated():
            await self.client.ping()
            for b in self._breakers:
                await b.start()
        if self.config.ordered:
            await self._run_ordered()
            return
        await self.discover()
        self._joined.set()
        readers = [asyncio.create_task(self._read_loop(p)) for p in Priority]
        loops = [
            self._every(self.config.reclaim_interval_ms, self.reclaim, self._stop),
            self._every(self.config.discover_interval_ms, self.discover, self._stop, self._discover_now),
            self._announced(),
            self._retry_loop(),
        ]
        if self.config.retention:
            loops.append(self._every(self.config.trim_interval_ms, self.trim, self._stop))
        if self.config.retire_idle_ms:
            loops.append(self._every(self.config.retire_interval_ms, self.retire, self._stop))
        background = [asyncio.create_task(c) for c in loops]
        heartbeat = asyncio.create_task(self._every(self.config.heartbeat_ms, self.heartbeat, self._halt))
        committer = asyncio.create_task(self._commit_loop())
        dispatchers = [asyncio.create_task(self._dispatch_loop()) for _ in range(self.config.concurrency)]
        watched = [*readers, *background, heartbeat, committer, *dispatchers]
        stopper = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *watched], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
            try:
                await self._drain(readers, background, dispatchers, committer, heartbeat)
            finally:
                self._halt.set()
                for b in self._breakers:
                    await b.close()
                stopper.cancel()
                await finish([heartbeat, stopper], CANCEL_WAIT_S)
        except asyncio.CancelledError:  # stopped at once: everything unfinished stays pending in Redis
            for b in self._breakers:
                b.stop()
            self._stop.set()
            self._halt.set()
            await finish([*watched, stopper], 0)
            raise
        if crashed:
            raise crashed[0].exception()  # type: ignore[misc]

    async def _run_ordered(self) -> None:
        from fabric.ordered import Ordered  # it builds on this module's Delivery and finish

        try:
            await Ordered(self).run()
        except asyncio.CancelledError:
            for b in self._breakers:
                b.stop()
            raise
        for b in self._breakers:
            await b.close()

    async def _drain(
        self, readers: list[asyncio.Task[None]], background: list[asyncio.Task[None]],
        dispatchers: list[asyncio.Task[None]], committer: asyncio.Task[None], heartbeat: asyncio.Task[None],
    ) -> None:
        # The reader and the loops end by themselves on _stop (the reader after its current read returns, ended at
        # once by CLIENT UNBLOCK if it is blocked, and the one it sent ahead if any, so entries Redis handed over
        # are seen and released below); they are cancelled only if they hang.
        self._stop.set()
        self._retries.close()  # parked after a failure: their next delivery is a real retry, by anyone
        for reads in self._lane_reads.values():  # a read blocked in Redis ends now, not at its block_ms
            await reads.cut_short()
        await finish([*readers, *background], self.config.block_ms / 1000 + 1)  # (two reads sent ahead: each half)
        unstarted = self._lanes.close()
        if await finish(dispatchers, self.config.grace_s):
            log.warning("handlers still running after %.1fs grace: their entries stay pending", self.config.grace_s)
        self._commits_closed = True
        self._commit_ready.set()
        self._commit_now.set()
        if await finish([committer], self.config.grace_s):  # Redis unreachable: redelivered later
            log.warning("commits did not complete within %.1fs grace: their entries stay pending", self.config.grace_s)
        self._halt.set()  # a heartbeat after the hand-back would undo it
        await finish([heartbeat], CANCEL_WAIT_S)
        try:
            async with asyncio.timeout(self.config.grace_s):
                released = await self._release(unstarted + self._withheld)
        except (FabricError, rex.RedisError, OSError, TimeoutError) as exc:
            raise_if_cancelled(exc)
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

    async def _every(self, interval_ms: int, step: Callable[[], Awaitable[Any]], until: asyncio.Event,
                     now: asyncio.Event | None = None) -> None:
        """Run ``step`` every ``interval_ms`` until ``until`` is set, and (when given) as soon as ``now`` is set;
        log and back off on Redis errors."""
        delay = ERROR_BACKOFF_S[0]
        while not until.is_set():
            started = time.monotonic()
            if now is not None:
                now.clear()  # set again while the step runs: it runs once more
            try:
                await step()
                # the period runs from start to start: a slow step (many streams, a slow link) does not stretch it
                delay, pause = ERROR_BACKOFF_S[0], max(0.0, interval_ms / 1000 - (time.monotonic() - started))
            except (FabricError, rex.RedisError, OSError) as exc:
                raise_if_cancelled(exc)
                log.warning("%s failed, retrying in %.1fs: %s", getattr(step, "__name__", step), delay, exc)
                pause, delay = delay, min(delay * 2, ERROR_BACKOFF_S[1])
            await first_set([until] if now is None else [until, now], pause)

    async def _announced(self) -> None:
        """Until the stop, follow the producers' announcements of new streams (``Keys.new_streams_channel``) and
        set ``_discover_now`` for those of this worker's topics, so a new symbol's first entries do not wait for
        the next discovery. A lost subscription is made again; meanwhile (and for an announcement missed while
        subscribing, which the discovery right after each subscription covers) ``discover_interval_ms`` holds."""
        delay = ERROR_BACKOFF_S[0]
        while not self._stop.is_set():
            listening, started = asyncio.ensure_future(self._follow_announcements()), time.monotonic()
            try:
                await first_done([listening], self._stop)
            finally:
                if not listening.done():  # the stop, or this task cancelled
                    listening.cancel()
                    await asyncio.gather(listening, return_exceptions=True)
            if listening.cancelled():
                return
            if time.monotonic() - started > ERROR_BACKOFF_S[1]:
                delay = ERROR_BACKOFF_S[0]  # it had been following: a new loss starts the backoff again
            channel = self.keys.new_streams_channel()
            try:
                listening.result()
            except rex.NoPermissionError as exc:
                log.warning("cannot follow new streams on %s (%s): joining them every %d ms; grant this Redis user "
                            "+subscribe &%s (deploy/acl/users.acl)", channel, exc,
                            self.config.discover_interval_ms, channel)
                await self._stop.wait()  # (a loop that ends early would end the worker)
                return
            except (FabricError, rex.RedisError, rex.RedisClusterException, OSError) as exc:  # (a slot moving)
                log.warning("lost the channel of new streams (%s), joining them every %d ms until it is back; "
                            "retrying in %.1fs", exc, self.config.discover_interval_ms, delay)
            await first_set([self._stop], delay)  # (after an error, or a subscription that ended by itself)
            delay = min(delay * 2, ERROR_BACKOFF_S[1])

    async def _follow_announcements(self) -> None:
        """Subscribe to the new streams' channel and set ``_discover_now`` at each topic of this worker's, and
        once subscribed (for an announcement made meanwhile). Ends only with an error."""
        topics = {*self.config.topics, *(t.encode() for t in self.config.topics)}
        async with self.client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.keys.new_streams_channel())
            self._discover_now.set()
            async for message in pubsub.listen():
                if message.get("type") == "message" and message["data"] in topics:
                    self._discover_now.set()

    async def _unblock(self, reads: _Reads) -> None:
        """End a lane's blocked read (CLIENT UNBLOCK of its connection, from the pool): it returns as at its
        timeout, having delivered nothing. A read sent but not yet run by Redis is not blocked yet: asked again
        a moment later, a few times. Best effort: on any failure the read runs to its end (``block_ms``)."""
        line = reads.line
        for _ in range(UNBLOCK_TRIES):
            if not reads.stale:  # answered meanwhile (a read sent since is not to be ended)
                return
            if line.client_id is None:
                if line.id_refused is not None:
                    self._cannot_unblock(line.id_refused)
                return
            try:
                if await self.client.client_unblock(line.client_id):
                    return
            except rex.ResponseError as exc:
                self._cannot_unblock(exc)
                return
            except (rex.RedisError, OSError) as exc:
                raise_if_cancelled(exc)
                log.debug("could not unblock a read (it ends at its block_ms): %s", exc)
                return
            await asyncio.sleep(UNBLOCK_AGAIN_S)

    def _cannot_unblock(self, exc: Exception) -> None:
        if not self._unblock_refused:
            self._unblock_refused = True
            log.warning("Redis refused CLIENT ID or CLIENT UNBLOCK (%s): a lane waiting on its streams reads new ones "
                        "only when its read ends (block_ms %d ms), and a stop waits for it; grant this Redis user "
                        "+client|id +client|unblock (deploy/acl/users.acl)", exc, self.config.block_ms)

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
        refused = {s: r for s, r in zip(refs, results, strict=True)
                   if isinstance(r, Exception) and error_code(r) != "BUSYGROUP"}
        await self._joined_already(refused)
        for stream, ref in refs.items():
            self._streams[stream] = ref
            self._by_priority.clear()
            self._by_name[stream.encode()] = ref
        self._changed.set()
        for priority in {ref.priority for ref in refs.values()}:  # a lane blocked on its old streams reads again
            if (reads := self._lane_reads.get(priority)) is not None:
                await reads.cut_short()
        log.info("joined group %s on %d new streams", self.group, len(refs))
        return list(refs)

    async def _joined_already(self, refused: dict[str, Exception]) -> None:
        """Raise a refusal of XGROUP CREATE (stream → error) unless the group is there anyway. At ``maxmemory``
        Redis refuses XGROUP CREATE (a deny-oom command) with OOM even where the group exists: a worker started to
        drain a full Redis must still join the streams it can read."""
        if not refused:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in refused:
                pipe.xinfo_groups(stream)
            infos = await pipe.execute(raise_on_error=False)
        for error, info in zip(refused.values(), infos, strict=True):
            names = set() if isinstance(info, Exception) else {g["name"] for g in info}
            if self.group not in names and self._group_bytes not in names:
                raise error

    # ---- reading and handling --------------------------------------------------------------------

    async def _read_loop(self, priority: Priority) -> None:
        line, read, waiting = self._cluster_reader(priority) if is_cluster(self.client) else self._reader(priority)
        primed = False
        try:
            delay = ERROR_BACKOFF_S[0]
            while not self._stop.is_set():
                streams = self._lane_streams(priority)
                ahead = bool(waiting())  # a read sent ahead is answered before the reader waits for anything
                count = await self._read_room(priority, len(streams), ahead)
                if not ahead and (not count or not streams):
                    if not streams and not primed:
                        primed = self._prime()
                    if count and not streams:
                        self._changed.clear()
                        await first_set([self._changed, self._stop], self.config.block_ms / 1000)
                    continue
                try:
                    taken = await read(streams, count, primed)
                    delay = ERROR_BACKOFF_S[0]
                    self._reads_failing = False
                except (rex.RedisError, OSError) as exc:
                    primed = primed or self._prime()
                    delay = await self._read_failed(exc, delay)
                    continue
                if taken and taken < FEW:
                    await asyncio.sleep(0)  # a trickle: let a dispatcher start on it before reading again
                primed = primed or self._prime()
            while waiting():  # sent ahead before the stop: its entries are this worker's, to hand back
                try:
                    await read([], 0, True)
                except (rex.RedisError, OSError) as exc:
                    raise_if_cancelled(exc)
                    break  # what it delivered stays pending to this consumer: reclaimed after reclaim_idle_ms
        finally:
            if not primed:
                self._prime()
            await line.close()

    def _reader(self, priority: Priority) -> tuple[Line, _Read, Callable[[], int]]:
        """A lane's reads on one Redis: one XREADGROUP over all its streams, blocking once primed (the first read
        does not block: what already waits in every lane is read before any is handled, so a worker starting on
        backlogs serves the critical one first), the next one sent ahead while the lane trickles (``_Reads``).
        Returns the connection, the read, and how many reads wait for their reply."""
        line = Line(self.client, identified=True)
        reads = self._lane_reads[priority] = _Reads(line, self.config.block_ms, self._unblock)
        commands = _ReadCommands(self._read_command)

        async def read(streams: list[str], count: int, primed: bool) -> int:
            if not primed:
                reply = await line.call(*self._read_command(streams, count))
                return self._take(priority, reply) if reply else 0
            # sent ahead, a read blocks half as long: the two that may wait end within block_ms (a breaker that
            # opens stops the reading that soon, as with one read)
            block_ms = max(1, self.config.block_ms // 2) if reads.trickle else self.config.block_ms
            command = commands.get(streams, count, block_ms) if count and streams else None
            reply = await reads.next(command)
            taken = self._take(priority, reply) if reply else 0
            reads.trickle = taken < FEW and self._lanes.busy_below(priority)
            if reads.stale:
                await reads.cut_again()
            return taken

        return line, read, lambda: reads.waiting

    def _cluster_reader(self, priority: Priority) -> tuple[ClusterLine, _Read, Callable[[], int]]:
        """A lane's reads on a Redis Cluster, which has no read across slots and so no blocking read across them.

        Each round reads every slot of the lane without blocking: one XREADGROUP per slot's streams, the slots of
        one node pipelined, the nodes at once (``ClusterLine.call_many``). When every slot comes back empty, the
        reader waits with one blocking XREADGROUP per node, on the slot of that node that last had entries, for
        at most ``CLUSTER_BLOCK_MS`` (or ``block_ms`` if shorter), then reads every slot again. The trade-off:
        an idle lane costs one pipelined round per node every ``CLUSTER_BLOCK_MS`` instead of one blocked read,
        and the first entry of a quiet stream that is not the one its node's wait is on waits up to that long
        (a busy lane never waits: its rounds find entries and go straight on)."""
        line = ClusterLine(self.client)  # type: ignore[arg-type]
        hot: dict[str, list[str]] = {}  # node → the slot's streams that last had entries

        async def read(streams: list[str], count: int, primed: bool) -> int:
            taken = await self._read_slots(line, priority, streams, count, hot)
            if not taken and primed:
                taken = await self._wait_slots(line, priority, streams, count, hot)
            return taken

        return line, read, lambda: 0

    async def _read_failed(self, exc: BaseException, delay: float) -> float:
        """After a failed read: a group found gone is rejoined at once; otherwise wait ``delay`` and return the
        next (doubling, capped)."""
        raise_if_cancelled(exc)
        self._reads_failing = True
        if isinstance(exc, rex.ResponseError) and error_code(exc) in GONE:
            self._group_gone(exc)
            return delay
        log.warning("read failed, retrying in %.1fs: %s", delay, exc)
        await asyncio.sleep(delay)
        return min(delay * 2, ERROR_BACKOFF_S[1])

    def _slot_groups(self, priority: Priority, streams: list[str]) -> list[list[str]]:
        """A lane's streams grouped by cluster slot (kept until the lane's streams change)."""
        cached = self._slots.get(priority)
        if cached is None or cached[0] is not streams:
            cached = self._slots[priority] = (streams, by_slot(streams))
        return cached[1]

    def _read_command(self, slot_streams: list[str], count: int, block_ms: int | None = None) -> tuple[Any, ...]:
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        return ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, *block,
                "STREAMS", *slot_streams, *(">",) * len(slot_streams))

    async def _read_slots(self, line: ClusterLine, priority: Priority, streams: list[str], count: int,
                          hot: dict[str, list[str]]) -> int:
        """Read every slot of a lane once, without blocking; return how many entries were taken. An error reply
        is raised after the other slots' entries are taken."""
        groups = self._slot_groups(priority, streams)
        replies = await line.call_many([self._read_command(g, count) for g in groups])
        taken = 0
        error: BaseException | None = None
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, BaseException):
                error = error or reply
            elif reply:
                taken += self._take(priority, reply)
                hot[(await line.node_for(group[0])).name] = group
        if error is not None:
            raise error
        return taken

    async def _wait_slots(self, line: ClusterLine, priority: Priority, streams: list[str], count: int,
                          hot: dict[str, list[str]]) -> int:
        """Wait for entries with one blocking read per node, on its slot that last had entries (or its first),
        all nodes at once; entries are taken as each read returns. Return how many were taken."""
        waits: dict[str, list[str]] = {}
        for group in self._slot_groups(priority, streams):
            name = (await line.node_for(group[0])).name
            if name not in waits:
                waits[name] = group
        for name, group in hot.items():
            if name in waits and group in self._slot_groups(priority, streams):
                waits[name] = group
        block_ms = min(self.config.block_ms, CLUSTER_BLOCK_MS)

        async def wait(group: list[str]) -> int:
            reply = await line.call(*self._read_command(group, count, block_ms))
            return self._take(priority, reply) if reply else 0

        results = await asyncio.gather(*(wait(g) for g in waits.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return sum(results)  # type: ignore[arg-type]

    def _lane_streams(self, priority: Priority) -> list[str]:
        """The joined streams of one priority (kept until the joined streams change)."""
        cached = self._by_priority.get(priority)
        if cached is None:
            cached = self._by_priority[priority] = [s for s, ref in self._streams.items() if ref.priority == priority]
        return cached

    def _prime(self) -> bool:
        """One reader has made its first read; when all have, dispatching starts."""
        self._unprimed -= 1
        if self._unprimed <= 0:
            self._primed.set()
        return True

    async def _read_room(self, priority: Priority, streams: int, ahead: bool = False) -> int:
        """How many entries to ask each stream for: the lane's room shared by its streams (at least
        ``MIN_READ``, so a lone busy stream among many idle ones still moves); 0 (after a wait) when the lane
        or the worker is full. Sharing keeps one worker from taking a whole backlog its peers could share.
        ``ahead``: a read sent ahead waits for its reply, which comes first: 0 at once instead of a wait."""
        if not self._reading_allowed():
            if not ahead:
                await self._breaker_changed()
            return 0
        lanes = self._lanes
        room = lanes.room(priority)
        # Past the cap (parked retries and pending commits count too) a lane reads only when it has run dry:
        # a worker whose commits stall cannot hoard more than that, and a flood of low entries waiting to be
        # committed never keeps a critical one unread.
        if self._held_total() >= self._max_held and room < lanes.capacity:
            self._commit_now.set()  # the reading waits for commits: the next one does not linger
            if not ahead:
                self._released.clear()
                await first_set([self._released, self._stop], self.config.block_ms / 1000)
            return 0
        if room <= 0:
            if not ahead:
                await lanes.wait_room((priority,))
            return 0
        return max(MIN_READ, room // max(1, streams))

    def _reading_allowed(self) -> bool:
        """False while a breaker guarding the handler is open and there is no fallback: entries wait in Redis."""
        return self._fallback is not None or all(b.reading for b in self._breakers)

    async def _breaker_changed(self) -> None:
        """Wait (at most ``block_ms``) until a closed-to-reading breaker changes, or the worker stops."""
        await first_set([*(b.changed() for b in self._breakers if not b.reading), self._stop],
                        self.config.block_ms / 1000)

    def _take(self, priority: Priority, reply: Any) -> int:
        """Hold a read's entries and queue them in their lane; return how many."""
        now = time.monotonic()
        taken = 0
        for name, entries in reply.items() if isinstance(reply, dict) else reply:  # RESP3: a map; RESP2: pairs
            # a rejoin may have cleared the map while this read was in flight; its entries are ours all the same
            ref = self._by_name.get(name) or self.keys.parse_stream(name)
            held = self._held[ref.key]
            batch = [Delivery(ref, entry_id, fields, 1) for entry_id, fields in entries]
            for d in batch:
                held[d.entry_id] = now
            self._lanes.extend(priority, batch)
            taken += len(batch)
        self.stats.delivered += taken
        self.read_sizes.observe(taken)
        return taken

    def _held_total(self) -> int:
        return sum(len(ids) for ids in self._held.values())

    async def _dispatch_loop(self) -> None:
        lanes, turns, process, clock = self._lanes, self._turns, self.process, time.monotonic
        me = object()
        watch = self._deadlines.watch(current_task())  # (``timed``, if in the chain, finds it and marks calls)
        marks = watch if self._times_calls else UNWATCHED
        try:
            await self._primed.wait()
            while True:
                if not len(lanes):
                    if lanes.closed:
                        return
                    await lanes.wait()
                    continue
                await turns.take(me)
                start = clock()
                while turns.holds(me) and (d := lanes.get_nowait()) is not None:
                    await process(d, marks)  # a handler that waits on I/O loses the turn meanwhile
                    if clock() - start > SLICE_S:
                        await asyncio.sleep(0)  # let the loop poll I/O (reads, commits); the turn passes on
                        break
        finally:
            self._deadlines.forget(watch)

    async def process(self, d: Delivery, watch: Watch) -> None:
        """Handle one delivery to its end: commit, park for retry, or dead-letter. ``watch``: where the handler call
        is marked busy for the handler timeout (the dispatcher's watch, or ``UNWATCHED`` when ``timed`` does it)."""
        event = self._admit(d)
        if isinstance(event, tuple):  # not for this handler: ("skip",) or a dead letter's (type, reason)
            await self._turn_away(d, event)
            return
        ref = d.stream
        ctx = Context(
            stream=ref.key, topic=ref.topic, priority=_LABELS[ref.priority], symbol=ref.symbol,
            entry_id=d.entry_id.decode(), delivery_count=d.deliveries, group=self.group,
            consumer=self.consumer,
        )
        watch.calls += 1
        watch.busy = True
        try:
            try:
                results = await self._handler(event, ctx)
            finally:
                watch.busy = False
                timed_out = watch.expired and watch.settle()
            outputs = self._outputs(event, results) if results else []
        except Deferred:  # still pending to this consumer: its next call waits for the breaker, same delivery
            self._lanes.put(d.stream.priority, d)
        except Withheld:
            self._withheld.append(d)
        except Reject as exc:
            self.stats.rejected += 1
            await self._dead_letter(d, "Reject", exc.reason, event)
        except Retry as exc:
            await self._failed(d, "Retry", exc.reason, exc.after_ms / 1000, event)
        except Exception as exc:  # a handler's failure is data: recorded, retried, dead-lettered
            await self._failed(d, type(exc).__name__, str(exc) or repr(exc), None, event)
        except asyncio.CancelledError as exc:
            await self._failed(d, *self._cancelled(exc, timed_out), None, event)
        else:
            self._committed(d, outputs)

    def _cancelled(self, exc: asyncio.CancelledError, timed_out: bool) -> tuple[str, str]:
        """What a handler call that ended in ``CancelledError`` failed with: ``TimeoutError`` when its deadline
        cancelled it (marked by the caller: ``_times_calls``), else ``CancelledError`` (the handler awaited
        something another party cancelled). Raises it again when the task is being cancelled: the worker stops (if
        the deadline came too, the stop wins)."""
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise exc
        if timed_out:
            return "TimeoutError", self._deadlines.message
        return "CancelledError", str(exc) or "the handler raised CancelledError"

    def _admit(self, d: Delivery) -> Event | tuple[str, ...]:
        """The event to handle, or why not: ("skip",) for a replay meant for another group, or the error type
        and reason it is dead-lettered with."""
        if len(d.fields) != 8:  # not the plain four fields: a replay (for one group), or not fabric's at all
            target = fields_of(d.fields).get(b"for_group")
            if target is not None and target != self._group_bytes:
                return ("skip",)
        if d.deliveries > self.config.max_deliveries:
            return ("", "")
        try:
            return decode_entry(d.fields)
        except DecodeError as exc:
            self.stats.invalid += 1
            return (type(exc).__name__, exc.reason)

    async def _turn_away(self, d: Delivery, why: tuple[str, ...]) -> None:
        if why == ("skip",):
            self._committed(d, [])  # acked for this group, untouched
        else:
            await self._dead_letter(d, why[0], why[1])

    def _committed(self, d: Delivery, outputs: list[tuple[str, Encoded]]) -> None:
        if outputs or d.deliveries > 1:
            self._commits.append((d, outputs))
        else:
            self._acks[d.stream.key].append(d.entry_id)
            self._acks_waiting += 1
        self._commit_ready.set()
        if outputs or len(self._commits) + self._acks_waiting >= self._full_batch:
            self._commit_now.set()

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

    def _log_ids(self, d: Delivery, event: Event | None) -> dict[str, str]:
        """What a log line about a delivery carries beside its text (``logs.py`` prints it)."""
        ids = {"stream": d.stream.key, "entry_id": d.entry_id.decode(), "group": self.group,
               "consumer": self.consumer}
        if event is not None:
            ids |= {"event_id": event.event_id, "correlation_id": event.root_id}
        return ids

    async def _failed(self, d: Delivery, error_type: str, message: str, after_s: float | None,
                      event: Event | None = None) -> None:
        self.stats.failed += 1
        log.warning("%s failed on %s %s (delivery %d): %s: %s", self.handler_name, d.stream.key,
                    d.entry_id.decode(), d.deliveries, error_type, message, extra=self._log_ids(d, event))
        if d.deliveries >= self.config.max_deliveries:
            await self._dead_letter(d, error_type, message, event)
            return
        ref = d.stream
        owned = await self._retrying(lambda: scripts.FAIL(
            self.client,
            [ref.key, self.keys.failures(ref.key)],
            [self.group, self.consumer, d.entry_id, self.handler_name, error_type, message[:2000]],
        ))
        if not owned:
            self._held[ref.key].pop(d.entry_id, None)
            return
        cfg = self.config
        if after_s is None:
            after_s = backoff_ms(d.deliveries, cfg.backoff_base_ms, cfg.backoff_max_ms) / 1000
        self.stats.retried += 1
        self._retries.park(d, after_s)

    async def _dead_letter(self, d: Delivery, error_type: str, message: str, event: Event | None = None) -> None:
        moved = await self._retrying(lambda: deadletter.move(
            self.client, self.keys, d.stream.key, d.entry_id, group=self.group, consumer=self.consumer,
            handler=self.handler_name, error_type=error_type, error=message, deliveries=d.deliveries,
            registered=self._dlqs,
        ))
        self._held[d.stream.key].pop(d.entry_id, None)
        self._released.set()
        if moved:
            self.stats.dead_lettered += 1
            log.error("dead-lettered %s %s after %d deliveries: %s %s", d.stream.key, d.entry_id.decode(),
                      d.deliveries, error_type or "max deliveries", message, extra=self._log_ids(d, event))

    # ---- committing ------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        line = line_for(self.client)
        try:
            while True:
                if not self._commits and not self._acks_waiting:
                    if self._commits_closed:
                        return
                    self._commit_ready.clear()
                    await self._commit_ready.wait()
                    continue
                if len(self._commits) + self._acks_waiting < self._full_batch and not self._commits_closed:
                    await self._linger()
                self._commit_now.clear()
                batch, self._commits = self._commits, []
                acks, self._acks, count = self._acks, defaultdict(list), self._acks_waiting
                self._acks_waiting = 0
                for i in range(0, len(batch), self.config.commit_batch):
                    await self._commit(line, batch[i : i + self.config.commit_batch])
                if acks:
                    await self._ack(line, acks, count)
                self._released.set()
        finally:
            await line.close()

    async def _linger(self) -> None:
        """Let a small commit gather more, one script call for many entries being far less work:
        ``COMMIT_LINGER_S``, and while it holds acks alone, up to ``ACK_LINGER_S`` in all."""
        await asyncio.sleep(COMMIT_LINGER_S)
        if not self._commit_now.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ACK_LINGER_S - COMMIT_LINGER_S):
                    await self._commit_now.wait()

    async def _ack(self, line: Line | ClusterLine, by_stream: dict[str, list[bytes]], count: int) -> None:
        """Ack ``count`` entries handled with nothing else to write, their ids by stream: one script call (on a
        cluster, one per slot), one XACK per stream."""
        if isinstance(line, ClusterLine):
            acked, expected = await self._ack_slots(line, by_stream)
        else:
            keys = list(by_stream)
            args: list[Any] = [self.group]
            for ids in by_stream.values():
                args.append(len(ids))
                args += ids
            acked, expected = await self._retrying(lambda: scripts.ACK.on(line, keys, args)), count
        for stream, ids in by_stream.items():
            held = self._held[stream]
            for entry_id in ids:
                held.pop(entry_id, None)
        if acked is None:  # the group is gone: nothing to ack; the rejoin delivers these again
            return
        done = sum(acked)
        self.stats.handled += done
        if done < expected:
            self.stats.refused += expected - done
            log.warning("%d acks found their entries already acknowledged: another consumer took them over "
                        "and finished them too (handled twice, as at-least-once delivery allows)", expected - done)

    async def _ack_slots(self, line: ClusterLine, by_stream: dict[str, list[bytes]]) -> tuple[list[int] | None, int]:
        """``_ack`` on a cluster: one ack.lua call per slot. Return the acked counts per stream and how many
        entries they were for (None, 0 when the group is gone everywhere)."""
        slots = by_slot(by_stream)
        calls = [(slot, [self.group, *(x for s in slot for x in (len(by_stream[s]), *by_stream[s]))])
                 for slot in slots]
        acked: list[int] = []
        expected = 0
        for slot, reply in zip(slots, await self._per_slot(line, scripts.ACK, calls), strict=True):
            if reply is not None:  # else the group is gone there
                acked += reply
                expected += sum(len(by_stream[s]) for s in slot)
        return (acked, expected) if expected else (None, 0)

    async def _commit(self, line: Line | ClusterLine, batch: list[_Commit]) -> None:
        new = {s for _, outs in batch for s, _ in outs} - self._registered
        if new:
            await self._retrying(lambda: self._register(new))
        if isinstance(line, ClusterLine):
            await self._commit_slots(line, batch)
            return
        keys, args = self._commit_call(batch)
        results = await self._retrying(lambda: scripts.COMMIT.on(line, keys, args))
        for d, _ in batch:
            self._held[d.stream.key].pop(d.entry_id, None)
        if results is not None:  # else the group is gone: nothing to ack; the rejoin delivers these again
            self._count_commits(batch, results)

    def _commit_call(self, batch: list[_Commit]) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of one commit.lua call for a batch."""
        ix = scripts.KeyIndex()
        args: list[Any] = [self.group, self.consumer, FORMAT_VERSION]
        for d, outputs in batch:
            stream = d.stream.key
            failures = ix(self.keys.failures(stream)) if d.deliveries > 1 else 0
            args += (ix(stream), failures, d.entry_id, len(outputs))
            for out_stream, enc in outputs:
                args += (ix(out_stream), enc.type, enc.enc, enc.data)
        return ix.keys, args

    async def _commit_slots(self, line: ClusterLine, batch: list[_Commit]) -> None:
        """``_commit`` on a cluster: one commit.lua call per slot of the inputs, with the outputs in their input's
        slot (atomic with the ack, as on one Redis). Outputs in another slot are written first, by outputs.lua,
        each guarded by a mark in its own slot named after the input entry: a crash before the ack, or a late
        writer whose entry was taken over, gives a redelivery whose outputs are recognised, not written twice.
        Those marks are deleted once the input is acked."""
        near: list[_Commit] = []
        far: list[tuple[Delivery, str, str, Encoded]] = []  # input, mark, output stream, output
        for d, outputs in batch:
            slot = slot_of(d.stream.key)
            near.append((d, [(s, enc) for s, enc in outputs if slot_of(s) == slot]))
            if len(near[-1][1]) < len(outputs):
                far += ((d, self._output_mark(d, i), s, enc) for i, (s, enc) in enumerate(outputs)
                        if slot_of(s) != slot)
        if far:
            far = await self._write_far(line, far)
        groups = by_slot(near, key=lambda c: c[0].stream.key)
        replies = await self._per_slot(line, scripts.COMMIT, [self._commit_call(g) for g in groups])
        for d, _ in batch:
            self._held[d.stream.key].pop(d.entry_id, None)
        done: list[_Commit] = []
        results: list[int] = []
        whole = {id(c[0]): c for c in batch}
        for group, reply in zip(groups, replies, strict=True):
            if reply is not None:  # else the group is gone there: nothing to ack; the rejoin delivers these again
                done += (whole[id(d)] for d, _ in group)
                results += reply
        self._count_commits(done, results)
        committed = {id(c[0]) for c, ok in zip(done, results, strict=True) if ok}
        await self._forget_marks(line, [mark for d, mark, _, _ in far if id(d) in committed])

    def _output_mark(self, d: Delivery, index: int) -> str:
        """The mark of an entry's output ``index`` for this group, in the output's slot (``outputs.lua``)."""
        ref = d.stream
        tag = self.keys.tag_of(ref.key)[1:-1]
        return f"out/{self.group}/{ref.topic}/{ref.priority.label}/{tag}/{d.entry_id.decode()}/{index}"

    async def _write_far(self, line: ClusterLine, far: list[tuple[Delivery, str, str, Encoded]]
                         ) -> list[tuple[Delivery, str, str, Encoded]]:
        """Write the outputs in other slots than their inputs (``_commit_slots``) of the entries this consumer
        still owns, one outputs.lua call per slot; return those written or found written (their marks)."""
        entries = list({id(d): d for d, _, _, _ in far}.values())
        pending = await self._retrying(lambda: self._replies(line, [
            ("XPENDING", d.stream.key, self.group, d.entry_id, d.entry_id, 1, self.consumer) for d in entries]))
        owned = {id(d) for d, p in zip(entries, pending or (), strict=False) if p}
        far = [f for f in far if id(f[0]) in owned]  # the others were taken over: commit.lua refuses them too
        marked = [(f, self.keys.dedup(f[2], f[1])) for f in far]
        calls = []
        for group in by_slot(marked, key=lambda m: m[0][2]):
            ix = scripts.KeyIndex()
            args: list[Any] = [FORMAT_VERSION, OUTPUT_MARK_TTL_MS]
            for (_, _, stream, enc), mark in group:
                args += (ix(stream), ix(mark), enc.type, enc.enc, enc.data)
            calls.append((ix.keys, args))
        await self._per_slot(line, scripts.OUTPUTS, calls)
        return [(d, mark, stream, enc) for (d, _, stream, enc), mark in marked]

    async def _replies(self, line: ClusterLine, commands: list[tuple[Any, ...]]) -> list[Any]:
        """``call_many``'s replies, raising the first error reply (for ``_retrying``)."""
        replies = await line.call_many(commands)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies

    async def _forget_marks(self, line: ClusterLine, marks: list[str]) -> None:
        """Delete the output marks of committed entries (one DEL per slot); a failure leaves them to expire."""
        if not marks:
            return
        try:
            await line.call_many([("DEL", *group) for group in by_slot(marks)])
        except (rex.RedisError, OSError) as exc:
            raise_if_cancelled(exc)
            log.info("could not delete %d output marks (they expire in %d s): %s", len(marks),
                     OUTPUT_MARK_TTL_MS // 1000, exc)

    async def _per_slot(self, line: ClusterLine, script: scripts.Script,
                        calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run ``script`` once per (keys, args), each in one slot, the calls for one node pipelined, the nodes at
        once; retry the calls that failed (connection loss, OOM, transient refusals) until each has run. Return
        the replies in order, None for a call whose group or stream is gone."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))

        async def attempt() -> bool:
            got = await line.call_many([("EVALSHA", script.sha, len(calls[i][0]), *calls[i][0], *calls[i][1])
                                        for i in todo])
            error: BaseException | None = None
            for i, reply in zip(list(todo), got, strict=True):
                if isinstance(reply, rex.NoScriptError):  # a node that restarted or was added: load it there
                    reply = await script.on(line, *calls[i])
                if isinstance(reply, BaseException):
                    error = error or reply
                    continue
                replies[i] = reply
                todo.remove(i)
            if error is not None:
                raise error
            return True

        while todo:
            if await self._retrying(attempt) is None and todo:  # gone: what is left cannot apply any more
                break
        return replies

    def _count_commits(self, batch: list[_Commit], results: list[int]) -> None:
        published = self.published
        for (d, outputs), ok in zip(batch, results, strict=True):
            if ok:
                self.stats.handled += 1
                for stream, _ in outputs:
                    published[stream] = published.get(stream, 0) + 1
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
                raise_if_cancelled(exc)
                code = error_code(exc)
                if code in GONE:
                    self._group_gone(exc)
                    return None
                if code not in TRANSIENT and not isinstance(exc, rex.OutOfMemoryError):
                    raise
                log.warning("write refused, retrying in %.1fs: %s", delay, exc)
            except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                raise_if_cancelled(exc)
                log.warning("write failed, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, ERROR_BACKOFF_S[1])

    def _group_gone(self, exc: BaseException) -> None:
        """The group or a stream was deleted under this worker: rejoin everything on the next discovery. The
        group is recreated from the start of each stream, so what is retained is delivered again (never lost)."""
        log.error("group %s or one of its streams was deleted under this worker (%s): rejoining from the start "
                  "of each stream, so retained entries will be delivered again", self.group, exc)
        self._streams.clear()
        self._by_priority.clear()
        self._by_name.clear()
        self._cursors.clear()

    async def _register(self, streams: set[str]) -> None:
        """Add output streams to their topics' registries before the first commit that writes them, and announce
        those new to Redis (``fabric.registry``)."""
        new = streams - self._registered
        if new:
            added = await register(self.client, self.keys, new)
            self._registered |= new
            if added and self._announcing:
                self._announcing = await announce(self.client, self.keys, added)

    # ---- keeping held entries, reclaiming others' ------------------------------------------------

    async def heartbeat(self) -> None:
        """Reset the idle time of the entries this worker has held (read ahead, in flight, parked, committing)
        for a heartbeat interval or more, every stream in one pipelined round trip (so a worker holding entries
        of many streams touches the last as soon as the first, whatever the latency). Younger ones need nothing
        yet: even at the next heartbeat they are under two intervals old, below ``reclaim_idle_ms`` (three)."""
        now = time.monotonic()
        cutoff = now - self.config.heartbeat_ms / 1000
        chunks: list[tuple[str, list[bytes]]] = []
        for stream, held in list(self._held.items()):
            old = [entry_id for entry_id, t in held.items() if t <= cutoff]
            chunks += ((stream, old[i : i + TOUCH_CHUNK]) for i in range(0, len(old), TOUCH_CHUNK))
        calls = [([stream], [self.group, self.consumer, len(chunk), *chunk]) for stream, chunk in chunks]
        for (stream, chunk), lost in zip(chunks, await scripts.TOUCH.many(self.client, calls), strict=True):
            held = self._held[stream]
            gone = set(lost[0]) if lost else set()
            for entry_id in chunk:
                if entry_id in gone:
                    held.pop(entry_id, None)
                elif entry_id in held:
                    held[entry_id] = now

    async def reclaim(self) -> int:
        """Take over entries idle past ``reclaim_idle_ms`` on the joined streams; return how many.

        One pipelined round trip asks every stream whose lane has room (on a cluster: each slot's streams in turn,
        the slots at once), for its share of that room (at most ``RECLAIM_COUNT``): a pass never claims more than
        the lanes take. The streams that filled their share with more left to scan are asked again, for a share
        of the room still left, until the room or they run out (a dead worker's entries, however they are spread,
        come back about as fast as the lanes take them), or the worker stops or a breaker opens. Each pass starts
        one stream further on, so a lane with less room than streams serves them all in turn. A stream whose call
        fails is tried again next pass; the others' entries are kept, then the first error is raised."""
        total, error = 0, None
        streams = list(self._streams.items())
        turn = self._reclaim_turn % max(1, len(streams))
        self._reclaim_turn += 1
        asking = streams[turn:] + streams[:turn]
        try:
            while asking and not self._stop.is_set() and self._reading_allowed():
                taken, asking, trimmed, failed = await self._reclaim_round(asking)
                total += taken
                error = error or failed
                for stream, ids in trimmed:  # (every claimed entry is queued and held by now)
                    await self._trimmed_pending(stream, ids)
        finally:
            self.stats.reclaimed += total
            self.stats.delivered += total
            if total:
                log.info("reclaimed %d entries idle over %d ms", total, self.config.reclaim_idle_ms)
        if error is not None:
            raise error
        return total

    async def _reclaim_round(self, streams: list[tuple[str, StreamRef]]) -> tuple[
            int, list[tuple[str, StreamRef]], list[tuple[str, list[bytes]]], BaseException | None]:
        """One round trip of ``reclaim``: how many entries were taken (queued and held before anything else is
        awaited), the streams to ask again, the pending ids found trimmed away per stream, and the first error."""
        rooms = {p: self._lanes.room(p) for p in Priority}
        shares = {p: max(1, rooms[p] // n) for p, n in Counter(ref.priority for _, ref in streams).items()}
        asked: list[tuple[str, StreamRef, int]] = []
        calls: list[tuple[list[Any], list[Any]]] = []
        for stream, ref in streams:
            p = ref.priority
            count = min(RECLAIM_COUNT, shares[p], rooms[p])
            if count <= 0:
                continue
            rooms[p] -= count
            asked.append((stream, ref, count))
            calls.append(([stream, self.keys.failures(stream)],
                          [self.group, self.consumer, self.config.reclaim_idle_ms, count,
                           self._cursors.get(stream, b"0-0")]))
        replies = await scripts.RECLAIM.many(self.client, calls, errors=True)
        taken, more, trimmed, error = 0, [], [], None
        now = time.monotonic()
        for (stream, ref, count), reply in zip(asked, replies, strict=True):
            if isinstance(reply, Exception):
                error = error or reply
                continue
            cursor, claimed, deleted = reply
            self._cursors[stream] = cursor
            if len(claimed) == count and cursor != b"0-0":
                more.append((stream, ref))
            held = self._held[stream]
            for entry_id, fields, deliveries in claimed:
                if entry_id in held:
                    continue
                held[entry_id] = now
                self._lanes.put(ref.priority, Delivery(ref, entry_id, fields, int(deliveries)))
                taken += 1
            if deleted:
                trimmed.append((stream, deleted))
        return taken, more, trimmed, error

    async def retire(self) -> dict[str, list[str]]:
        """Remove the group's consumers idle past ``retire_idle_ms`` with nothing pending (dead processes')."""
        return await retire_idle_consumers(self.client, list(self._streams), self.group,
                                           min_idle_ms=self.config.retire_idle_ms, keep=self.consumer)

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
                args = [self.group, self.consumer, "", *(d.entry_id for d in ds)]
                claimed = await self._retrying(partial(scripts.CLAIM, self.client, [stream], args))
                got = {entry_id: int(count) for entry_id, _, count in claimed or ()}
                for d in ds:
                    if d.entry_id in got:
                        self.stats.delivered += 1
                        d.deliveries = got[d.entry_id]
                        self._held[stream][d.entry_id] = time.monotonic()
                        self._lanes.put(d.stream.priority, d)
                    else:
                        self._held[stream].pop(d.entry_id, None)

    async def trim(self) -> None:
        """Apply the configured retention to the joined streams of each topic."""
        for stream, ref in list(self._streams.items()):
            retention = self.config.retention.get(ref.topic)
            if retention is not None:
                await trim_stream(self.client, self.keys, stream, retention)
