"""The ordered mode: each owned stream's entries handled one after another, their commits in order, and an entry
with outputs committed before the next starts (or, with ``commit_ahead``, while the stream goes on; an entry
without outputs, an ack, never holds the next: ``Ordered._commit``).

A worker whose group is ordered (``WorkerConfig.ordered``) runs these loops instead of the free-for-all reader,
dispatchers and reclaimer (``ownership.py`` has the leases and fencing tokens they rest on):

- ``_keep_alive``  every ``lease_ms / 3``: heartbeat in the group's member registry and renew the leases held (a
  lost one stops its stream at once), one call per cluster slot, on its own schedule: however long a balancing
  round takes, it never holds a renewal up (a lease runs out only when the worker itself stalls);
- ``rebalance``    every ``lease_ms / 3`` too: follow ``balance.balance``: acquire the free streams the plan gives
  this member, hand over those it gives to others (finish the entry in hand, then release), each batched in one
  call per cluster slot;
- ``_run_stream``   one task per owned stream: first what former owners left pending (``take_over``, oldest
  first), then the new entries the reader hands it, each handled, and committed before the next is started if it
  has outputs (up to ``ACKS_AHEAD`` acks, or ``commit_ahead`` commits of any kind, are handled while the stream's
  commit is in flight, their commits staged). A failure retries the same entry after its backoff, so the stream
  waits behind it until it succeeds or is dead-lettered, while the other streams go on;
- ``_read_loop``    one fenced read for every owned stream with room for more, then XREAD BLOCK on the idle ones
  (on a Redis Cluster, idle streams of several slots are polled instead: ``_poll_new`` has the latency cost); a
  wait that ended a quiet spell has the streams it named read first, alone, in one round trip (``QUIET_S``);
  after a read that failed, first a take-over of what it may have left pending unseen (``_recover``);
- ``_commit_loop``  the streams' commits, gathered into one ``fenced_commit.lua`` call per cluster slot, in runs
  of one stream (on a cluster, the slots' calls pipelined per node). An entry's outputs must be in its stream's
  slot there (its symbol): one outside it is dead-lettered as ``CrossSlotOutput``, since no script could fence it
  with the ack.

Every write for an owned stream (outputs with the ack, a failure record, a retry's claim, a dead letter) carries
the stream's fencing token and is refused on the server once the token is stale, so an owner that was paused or
cut off past its lease writes nothing after the new owner started. XAUTOCLAIM never runs on an ordered group: a
dead owner's entries move with its streams, through ``take_over``, in order.

Handler calls share ``concurrency`` slots, given to the highest priority waiting (first come within one).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster

from fabric import deadletter, scripts
from fabric.balance import balance
from fabric.breaker import Deferred, Withheld
from fabric.client import Line, raise_if_cancelled
from fabric.codec import FORMAT_VERSION, Encoded
from fabric.errors import FabricError, Reject, Retry
from fabric.handler import UNWATCHED, Context, current_task
from fabric.keys import Priority, StreamRef
from fabric.nodes import ClusterLine, eval_many, line_for, slot_of
from fabric.ownership import FENCED, Leases, Members, Read, by_slot, renew_interval_ms
from fabric.retry import backoff_ms
from fabric.worker import FEW, Delivery, finish

if TYPE_CHECKING:
    from fabric.events import Event
    from fabric.worker import Worker

__all__ = ["Ordered", "Owned", "Slots"]

log = logging.getLogger("fabric.ordered")

MAX_READ_AHEAD = 64
"""Most entries read ahead for one owned stream (they stay pending to the owner; a new owner takes them over)."""
MIN_READ_AHEAD = 4
ACKS_AHEAD = 64
"""Most entries of a stream handled without outputs whose acks are still in flight: the next entry does not wait
for an ack (it cannot see one); a crash hands them to the next owner, handled again."""
COMMIT_LINES = 3
"""Commit batches in flight at once, each on its own connection."""
COMMIT_CHUNK = 256
"""A commit batch this large goes out at once, without waiting for the streams still handling."""
QUIET_S = 0.005
"""A wait for new entries that lasted this long ended a quiet spell: the streams it found something on are read
first, alone (one small round trip; then the read of every stream). Under steady traffic waits are shorter, and
the reader reads every stream at once, so that an entry on another stream never waits behind an extra read."""
MAX_WAIT_MS = 1_000
"""Longest XREAD BLOCK of idle streams (cut short when a newly owned stream is ready to be read)."""
IDLE_POLL_MS = (1, 10)
"""On a cluster, the first and the longest pause between two looks at idle streams of several slots (``_poll_new``)."""
_LABELS = tuple(p.label for p in Priority)

_Line = Line | ClusterLine
_Outputs = list[tuple[str, Encoded]]
_Commit = tuple["Owned", Delivery, _Outputs, asyncio.Future[int]]


class Slots:
    """``concurrency`` handler slots, each freed one given to the highest priority waiting (FIFO within one)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one (no coroutine: the usual case, on the hot path)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        return False

    async def acquire(self, priority: Priority) -> None:
        """Wait for a slot."""
        if self.try_acquire():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (-int(priority), next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # given a slot as it was cancelled: pass it on
            raise

    def release(self) -> None:
        """Free a slot: to the best waiter, else back to the pool."""
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class Owned:
    """One stream this worker owns: its token, the entries read for it, and whether it is being given up."""

    def __init__(self, ref: StreamRef, token: int, lease: str, failures: str, valid_until: float) -> None:
        self.ref = ref
        self.token = token
        self.lease = lease
        """The lease's key (what fenced scripts check the token against)."""
        self.valid_until = valid_until
        """When the lease runs out on this worker's clock (the loop's monotonic time): the send time of the last
        acquire or renew that succeeded, plus the TTL, so never later than on Redis's clock. A worker paused past
        it (SIGSTOP, a long GC) starts nothing more on the stream; its writes would be refused anyway."""
        self.keys = (ref.key, lease, failures)
        """A commit's first keys for a run of its entries (``fenced_commit.lua``)."""
        self.queue: deque[Delivery] = deque()
        self.ready = False
        """The former owners' pending entries are queued: the reader may add new ones behind them."""
        self.leaving = False
        """Handed over (or the worker stops): finish the entry in hand, then release the lease."""
        self.lost = False
        """Fenced out (the lease expired or moved), or given up: write nothing more, renew nothing."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.staged: list[_Commit] = []
        """Handled entries whose commit waits for the stream's commit in flight (one at a time, so in order)."""
        self.committing = False
        self.watch = UNWATCHED
        """Where its task marks each handler call busy, for the handler timeout (``_run_stream`` sets it)."""
        self.last: asyncio.Future[int] | None = None
        """The latest commit's outcome (settled: every earlier one is too)."""
        self.last_read: bytes | None = None
        """The id of the last entry read for it, or of its last entry when a read found nothing new (where XREAD
        BLOCK waits from); None when not known (a new owner, or after a wake-up): the next read asks."""
        self.queued_to = "-"
        """Where the entries queued so far end ("(ID" after the last, "-" before any): a read that failed may have
        left entries pending to this owner past it, which ``_take_over`` from there queues next."""
        self.unsure = False
        """A read failed: its entries may be pending here unseen (a reply lost after Redis ran it)."""


class Ordered:
    """The ordered mode's loops for one ``Worker``: it lends them its client, config, handler chain and stats."""

    def __init__(self, worker: Worker) -> None:
        self.w = worker
        cfg = worker.config
        self.leases = Leases(worker.client, worker.keys, worker.group, ttl_ms=cfg.lease_ms)
        self.members = Members(worker.client, worker.keys, worker.group, ttl_ms=cfg.lease_ms)
        self.owned: dict[str, Owned] = {}
        self.slots = Slots(cfg.concurrency)
        self._commits: list[_Commit] = []
        self._commit_ready = asyncio.Event()
        self._commits_closed = False
        self._lines: list[_Line] = []
        """Commit connections not sending right now."""
        self._line_free = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._failed: list[BaseException] = []
        self._room = asyncio.Event()
        """An owned stream is ready for new entries or has room again: the reader looks again."""
        self._draining = False
        self._balancing = asyncio.Lock()
        self._new_ready = asyncio.Event()
        """A stream finished its take-over: the reader stops waiting on the others and reads it too."""
        self._woken: set[str] = set()
        """The streams a wait that ended a quiet spell (``QUIET_S``) saw new entries on: the next read is of those
        alone, in one round trip, before the read of them all."""
        self._loop = asyncio.get_running_loop()
        self._now = self._loop.time
        self._renew_line = ClusterLine(cast(RedisCluster, worker.client)) if self.leases.clustered else None
        """The renewer's connections on a cluster: each renewal round, every slot's call at once."""
        self._balance_line = ClusterLine(cast(RedisCluster, worker.client)) if self.leases.clustered else None
        """The balancer's connections on a cluster: a round's acquires (or hand-overs), every slot's call at once."""
        self._left = False
        """The worker left the member registry (the end of a drain): no more heartbeats or renewals."""
        self._ttl_s = cfg.lease_ms / 1000
        self._ahead = cfg.commit_ahead
        self._acks_ahead = max(ACKS_AHEAD, cfg.commit_ahead)
        self._ended = False
        """The committer has stopped: commits queued from now on fail at once (their entries stay pending)."""

    # ---- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Join, own streams and handle them until the worker stops; then drain (see ``Worker.run``)."""
        try:
            await self._run()
        finally:
            for line in (self._renew_line, self._balance_line):
                if line is not None:
                    await line.close()

    async def _run(self) -> None:
        w, cfg = self.w, self.w.config
        await self.members.heartbeat(w.consumer)
        await w.discover()
        w._joined.set()
        loops = [
            self._read_loop(),
            w._every(cfg.discover_interval_ms, self.discover, w._stop, w._discover_now),
            w._announced(),
        ]
        if cfg.retention:
            loops.append(w._every(cfg.trim_interval_ms, w.trim, w._stop))
        if cfg.retire_idle_ms:
            loops.append(w._every(cfg.retire_interval_ms, w.retire, w._stop))
        background = [asyncio.create_task(c) for c in loops]
        keeper = asyncio.create_task(w._every(renew_interval_ms(cfg.lease_ms), self._keep_alive, w._halt))
        balancer = asyncio.create_task(w._every(renew_interval_ms(cfg.lease_ms), self.rebalance, w._halt))
        committer = asyncio.create_task(self._commit_loop())
        stopper = asyncio.create_task(w._stop.wait())
        watched = [*background, keeper, balancer, committer]
        try:
            done, _ = await asyncio.wait([stopper, *watched], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
            try:
                await self._drain(background, committer, keeper)
            finally:
                w._halt.set()
                stopper.cancel()
                await finish([keeper, balancer, stopper], 2.0)
        except asyncio.CancelledError:  # stopped at once: what is unfinished stays pending; leases expire
            w._stop.set()
            w._halt.set()
            await finish([*watched, stopper, *self._runners()], 0)
            raise
        if crashed:
            raise crashed[0].exception()  # type: ignore[misc]

    def _runners(self) -> list[asyncio.Task[None]]:
        return [o.task for o in self.owned.values() if o.task is not None]

    async def _drain(self, background: list[asyncio.Task[None]], committer: asyncio.Task[None],
                     keeper: asyncio.Task[None]) -> None:
        # Leases keep being renewed meanwhile (_keep_alive runs until _halt), so nobody takes a stream whose
        # entry in hand is still being finished; then every stream is released for the next owner at once.
        w, cfg = self.w, self.w.config
        w._stop.set()
        self._draining = True
        await finish(background, cfg.block_ms / 1000 + 1)
        for o in self.owned.values():
            o.leaving = True
            o.wake.set()
        if await finish(self._runners(), cfg.grace_s):
            log.warning("handlers still running after %.1fs grace: their entries stay pending", cfg.grace_s)
        self._commits_closed = True
        self._commit_ready.set()
        if await finish([committer], cfg.grace_s):
            log.warning("commits did not complete within %.1fs grace: their entries stay pending", cfg.grace_s)
        # No renewal or heartbeat from here on: one in flight lands before the releases and the leave, none after
        # (a renewal landing after a release would report the stream lost; a heartbeat after the leave would put
        # this worker back among the live members, and streams would be planned for it, for a member TTL).
        self._left = True
        w._halt.set()
        await finish([keeper], cfg.block_ms / 1000 + 1)
        try:
            async with asyncio.timeout(cfg.grace_s):
                for stream, o in list(self.owned.items()):
                    if not o.lost:
                        await self.leases.release(stream, w.consumer, o.token)
                await self.members.leave(w.consumer)
        except (FabricError, rex.RedisError, OSError, TimeoutError) as exc:
            raise_if_cancelled(exc)
            log.warning("could not release the streams (they move when their leases expire): %s", exc)
        log.info("drained: released %d streams", len(self.owned))
        self.owned.clear()

    # ---- owning streams --------------------------------------------------------------------------

    async def discover(self) -> None:
        """Join new streams of the topics, and balance at once when there are any, so their first entries do not
        wait for the next round."""
        if await self.w.discover() and not self._draining:
            await self.rebalance()

    async def rebalance(self) -> None:
        """One round (one at a time): acquire or hand over what the balance plan says."""
        async with self._balancing:
            await self._rebalance()

    async def _rebalance(self) -> None:
        if self._draining:
            return
        w = self.w
        me = w.consumer
        live = await self.members.live()  # (without this worker if its heartbeats failed: then it hands over all)
        streams = w.streams
        current = {s: lease.owner for s, lease in (await self.leases.owners(streams)).items()}
        plan = balance(streams, live, current)
        wanted = [s for s, member in plan.assignment.items() if member == me and s not in self.owned]
        given = {s: o.token for s, member in plan.assignment.items()
                 if member != me and (o := self.owned.get(s)) is not None and not o.leaving and not o.lost}
        if wanted:
            sent = self._now()
            for stream, token in (await self.leases.acquire_many(wanted, me, self._balance_line)).items():
                if stream not in self.owned:
                    self._own(stream, token, sent + self._ttl_s)
        if given:
            marked = await self.leases.hand_over_many(given, me, self._balance_line)
            for stream, token in given.items():
                o = self.owned.get(stream)
                if o is None or o.token != token or o.lost:
                    continue
                if stream in marked:
                    o.leaving = True
                    o.wake.set()
                    log.info("handing %s over to %s", stream, plan.assignment[stream])
                else:
                    self._lose(stream, "its lease was gone when it was to be handed over")

    async def _keep_alive(self) -> None:
        """Heartbeat, then renew every lease held (even when the heartbeat failed): a lost one stops its stream, a
        kept one runs until the TTL after this call. Runs on its own schedule, never behind a balancing round."""
        if self._left:
            return
        me = self.w.consumer
        try:
            await self.members.heartbeat(me)
        except (FabricError, rex.RedisError, OSError) as exc:  # the leases are renewed all the same
            raise_if_cancelled(exc)
            log.warning("heartbeat failed (renewing the leases all the same): %s", exc)
        tokens = {s: o.token for s, o in self.owned.items() if not o.lost}
        if not tokens:
            return
        sent = self._now()
        lost = await self.leases.renew(tokens, me, self._renew_line)
        for stream, token in tokens.items():
            o = self.owned.get(stream)
            if o is None or o.token != token:  # released meanwhile (and maybe acquired again, under a new token)
                continue
            if stream in lost:
                self._lose(stream, "its lease expired before it was renewed")
            else:
                o.valid_until = max(o.valid_until, sent + self._ttl_s)

    def _own(self, stream: str, token: int, valid_until: float) -> None:
        ref = self.w._streams.get(stream) or self.w.keys.parse_stream(stream)
        o = Owned(ref, token, self.leases.key(stream), self.w.keys.failures(stream), valid_until)
        self.owned[stream] = o
        o.task = asyncio.create_task(self._run_stream(o))
        log.debug("owning %s under token %d", stream, token)

    def _expired(self, o: Owned) -> bool:
        """Whether the stream's lease ran out on this worker's clock (then it is lost: nothing more starts)."""
        if not o.lost and self._now() >= o.valid_until:
            self._lose(o.ref.key, "its lease ran out before it was renewed (was this worker paused?)")
        return o.lost

    def _lose(self, stream: str, why: str) -> None:
        o = self.owned.get(stream)
        if o is not None and not o.lost:
            o.lost = True
            o.wake.set()
            log.warning("lost %s: %s (its writes from now on are refused)", stream, why)

    # ---- one stream ------------------------------------------------------------------------------

    async def _run_stream(self, o: Owned) -> None:
        stream = o.ref.key
        watch = self.w._deadlines.watch(current_task())  # (``timed``, if in the chain, finds it and marks calls)
        o.watch = watch if self.w._times_calls else UNWATCHED
        try:
            if await self._take_over(o):
                while not o.lost and not o.leaving:
                    if not o.queue:
                        o.wake.clear()
                        await o.wake.wait()
                        continue
                    d = o.queue.popleft()
                    if len(o.queue) < MIN_READ_AHEAD:
                        self._room.set()
                    if not await self._handle(o, d):
                        break
            await self._settle(o)
            if not o.lost and not self._draining:
                o.lost = True  # (given up: nothing more is renewed or written for it; a renewal that finds it gone
                # meanwhile does not call it lost)
                await self.leases.release(stream, self.w.consumer, o.token)
        except (FabricError, rex.RedisError, OSError) as exc:
            raise_if_cancelled(exc)
            log.warning("stopped handling %s (its lease expires, then it moves): %s", stream, exc)
            self._lose(stream, str(exc))
        finally:
            self.w._deadlines.forget(watch)
            if o.lost and self.owned.get(stream) is o:
                del self.owned[stream]

    async def _take_over(self, o: Owned, recovering: bool = False) -> bool:
        """Queue what is pending on the stream past what is queued already, oldest first: at first what former
        owners left, after a failed read (``recovering``) what it may have left pending here. False if the lease
        is gone."""
        w, stream = self.w, o.ref.key
        after: str | None = o.queued_to
        while after is not None:
            page = await self.leases.take_over(stream, w.consumer, o.token, after=after, own=recovering)
            if page is None:
                self._lose(stream, "its lease moved before the take-over")
                return False
            if page.entries:
                o.queue.extend(Delivery(o.ref, entry_id, fields, count) for entry_id, fields, count in page.entries)
                o.queued_to = "(" + page.entries[-1][0].decode()
                o.wake.set()
                if recovering:
                    o.last_read = None  # (the lost read's: the next read asks where the stream ends)
            if not recovering:
                w.stats.reclaimed += len(page.entries)
            w.stats.delivered += len(page.entries)
            if page.deleted:
                await w._trimmed_pending(stream, page.deleted)
            after = page.after
        o.ready = True
        self._room.set()
        self._new_ready.set()
        return True

    async def _handle(self, o: Owned, d: Delivery) -> bool:
        """Handle one entry to its end (committed or dead-lettered), retrying it meanwhile; False when the stream
        must stop: its lease is lost, or the worker stops during a backoff or under an open breaker."""
        w = self.w
        while True:
            if o.lost or self._now() >= o.valid_until and self._expired(o):
                return False
            event = w._admit(d)
            if isinstance(event, tuple):
                if event == ("skip",):
                    return await self._commit(o, d, [])
                return await self._dead_letter(o, d, event[0], event[1], None)
            outcome = await self._call(o, d, event)
            if outcome is None:  # withheld by a breaker as the worker stops: it stays pending
                return False
            if isinstance(outcome, list):
                if outcome:
                    return await self._commit(o, d, outcome, event)
                if (fut := self._stage(o, d, outcome)) is not None:  # (an ack: inline, the usual case)
                    await fut
                return not o.lost
            if (done := await self._after_failure(o, d, *outcome, event)) is not None:
                return done

    async def _after_failure(self, o: Owned, d: Delivery, error_type: str, message: str, after_s: float | None,
                             event: Event) -> bool | None:
        """After a failed call: dead-letter the entry (a ``Reject``, or its last delivery: then what ``_handle``
        returns), or retry it after its backoff (None: call the handler again; False: the stream must stop)."""
        w = self.w
        if error_type != "Reject":
            w.stats.failed += 1
        if error_type == "Reject" or d.deliveries >= w.config.max_deliveries:
            return await self._dead_letter(o, d, error_type, message, event)
        return None if await self._retry(o, d, error_type, message, after_s, event) else False

    def _other_slot(self, o: Owned, outputs: _Outputs) -> str | None:
        """On a cluster, why the outputs cannot be committed with the entry's ack (one stream outside the input
        stream's slot: the entry is dead-lettered as ``CrossSlotOutput``), else None."""
        if not self.leases.clustered:
            return None
        slot = slot_of(o.ref.key)
        for out_stream, _ in outputs:
            if slot_of(out_stream) != slot:
                return (f"output {out_stream} is not in the slot of {o.ref.key}: on a Redis Cluster an ordered group "
                        "commits an entry's outputs with its ack in one script, so they must share its symbol (hash "
                        "tag); publish events of other symbols from an unordered group, or run on a single Redis")
        return None

    async def _call(self, o: Owned, d: Delivery, event: Event) -> _Outputs | tuple[str, str, float | None] | None:
        """Run the handler in a slot: its outputs, or the failure (type, message, retry after s), or None when the
        worker stops before the entry could be handled (a breaker withheld it)."""
        w, ref = self.w, d.stream
        ctx = Context(
            stream=ref.key, topic=ref.topic, priority=_LABELS[ref.priority], symbol=ref.symbol,
            entry_id=d.entry_id.decode(), delivery_count=d.deliveries, group=w.group, consumer=w.consumer,
        )
        slots, watch = self.slots, o.watch
        while True:
            if not slots.try_acquire():
                await slots.acquire(ref.priority)
            watch.calls += 1
            watch.busy = True
            try:
                try:
                    results = await w._handler(event, ctx)
                finally:
                    watch.busy = False
                    timed_out = watch.expired and watch.settle()
                return w._outputs(event, results) if results else []
            except Deferred:  # the breaker let it wait: call again, same delivery
                continue
            except Withheld:
                return None
            except Reject as exc:
                w.stats.rejected += 1
                return ("Reject", exc.reason, None)
            except Retry as exc:
                return ("Retry", exc.reason, exc.after_ms / 1000)
            except Exception as exc:  # a handler's failure is data: recorded, retried, dead-lettered
                return (type(exc).__name__, str(exc) or repr(exc), None)
            except asyncio.CancelledError as exc:
                return (*w._cancelled(exc, timed_out), None)
            finally:
                slots.release()

    async def _retry(self, o: Owned, d: Delivery, error_type: str, message: str, after_s: float | None,
                     event: Event) -> bool:
        """Record the failure, wait out the backoff, and claim the entry again (a new delivery); False when the
        stream must stop."""
        w, cfg, stream = self.w, self.w.config, o.ref.key
        if not await self._settle(o):  # the commits of the entries before it first (the stream may be lost)
            return False
        log.warning("%s failed on %s %s (delivery %d): %s: %s; the stream waits for it", w.handler_name, stream,
                    d.entry_id.decode(), d.deliveries, error_type, message, extra=w._log_ids(d, event))
        lease = self.leases.key(stream)
        recorded = await w._retrying(lambda: scripts.FAIL(
            w.client, [stream, w.keys.failures(stream), lease],
            [w.group, w.consumer, d.entry_id, w.handler_name, error_type, message[:2000], o.token],
        ))
        if recorded == FENCED:
            self._lose(stream, "fenced out while recording a failure")
            return False
        if after_s is None:
            after_s = backoff_ms(d.deliveries, cfg.backoff_base_ms, cfg.backoff_max_ms) / 1000
        w.stats.retried += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped_or_lost(o), after_s)
        if o.lost or w._stop.is_set():
            return False
        claimed = await w._retrying(lambda: scripts.CLAIM(
            w.client, [stream, lease], [w.group, w.consumer, o.token, d.entry_id]
        ))
        if claimed is None:  # fenced out, or the group is gone
            return not await self._fenced(o)
        got = {entry_id: int(count) for entry_id, _, count in claimed or ()}
        if d.entry_id not in got:
            return True  # no longer pending here (the group was recreated): nothing left to do with it
        d.deliveries = got[d.entry_id]
        w.stats.delivered += 1
        return True

    async def _stopped_or_lost(self, o: Owned) -> None:
        while not (o.lost or self.w._stop.is_set()):
            o.wake.clear()
            stop = asyncio.ensure_future(self.w._stop.wait())
            try:
                await asyncio.wait([stop, asyncio.ensure_future(o.wake.wait())], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()

    async def _fenced(self, o: Owned) -> bool:
        """Check whether the stream's token moved on (a write came back refused); if so, the stream is lost."""
        lease = (await self.leases.owners([o.ref.key])).get(o.ref.key)
        if lease is None or lease.token != o.token:
            self._lose(o.ref.key, "fenced out: another owner's token is current")
            return True
        return False

    async def _dead_letter(self, o: Owned, d: Delivery, error_type: str, message: str, event: Event | None) -> bool:
        w, stream = self.w, o.ref.key
        if not await self._settle(o):  # the commits of the entries before it first (the stream may be lost)
            return False
        moved = await w._retrying(lambda: deadletter.move(
            w.client, w.keys, stream, d.entry_id, group=w.group, consumer=w.consumer, handler=w.handler_name,
            error_type=error_type, error=message, deliveries=d.deliveries, registered=w._dlqs,
            fence=(self.leases.key(stream), o.token),
        ))
        if moved is None:
            return not await self._fenced(o)
        w.stats.dead_lettered += 1
        log.error("dead-lettered %s %s after %d deliveries: %s %s", stream, d.entry_id.decode(), d.deliveries,
                  error_type or "max deliveries", message, extra=w._log_ids(d, event))
        return True

    # ---- committing ------------------------------------------------------------------------------

    async def _commit(self, o: Owned, d: Delivery, outputs: _Outputs, event: Event | None = None) -> bool:
        """Commit one entry (its outputs and its ack, fenced); False if the stream is lost. On a cluster, an entry
        whose outputs cannot be committed with it (``_other_slot``) is dead-lettered instead.

        The commit is staged behind the stream's commit in flight, if any, and the staged ones go as one once it is
        back, so a stream's commits reach Redis one after another, in order. An entry with outputs waits until its
        commit is back (the next entry's handler sees them in Redis), unless ``commit_ahead`` lets up to that many
        go on meanwhile. An entry without outputs does not wait (up to ``ACKS_AHEAD`` of them, or ``commit_ahead``
        if more): its commit is an ack, which the next handler has no way to see. A commit refused as fenced loses
        the stream; the staged ones behind it are refused too."""
        if outputs and (stray := self._other_slot(o, outputs)) is not None:
            return await self._dead_letter(o, d, "CrossSlotOutput", stray, event)
        if (fut := self._stage(o, d, outputs)) is not None:
            await fut  # (a failed send raises)
        return not o.lost

    def _stage(self, o: Owned, d: Delivery, outputs: _Outputs) -> asyncio.Future[int] | None:
        """Stage the entry's commit (sent now if the stream has none in flight); the future to wait for when the
        entry must wait for its commit (``_commit``), else None. A stream's staged commits share one future, set
        once their call is back."""
        staged = o.staged
        if staged:
            fut = staged[-1][3]
        else:
            fut = o.last = self._loop.create_future()
        staged.append((o, d, outputs, fut))  # (``_send`` counts it)
        if not o.committing:
            self._submit(o)
        if fut.done() or len(o.staged) >= (self._ahead if outputs else self._acks_ahead):
            return fut  # (failed: the committer stopped, the stream with it; or waiting for its own commit, which
            # measured faster than waiting for the one in flight)
        return None

    def _queued(self) -> None:
        """Commits were queued: send a full chunk at once, else let the committer gather more."""
        if len(self._commits) >= COMMIT_CHUNK and self._lines:
            self._flush()
        else:
            self._commit_ready.set()

    def _submit(self, o: Owned) -> None:
        """Queue a stream's staged commits for the committer; the next go when these are back."""
        batch, o.staged = o.staged, []
        if self._ended:  # the committer has stopped (a failed send, or the end of a drain): they stay pending
            _unsent(batch)
            return
        o.committing = True
        batch[-1][3].add_done_callback(lambda _: self._submitted(o))
        self._commits += batch
        self._queued()

    def _submitted(self, o: Owned) -> None:
        o.committing = False
        if o.staged:
            self._submit(o)

    async def _settle(self, o: Owned) -> bool:
        """Wait until every commit of the stream is back; False if the stream is lost (a failed send raises)."""
        last = o.last
        if last is None:
            return not o.lost
        await asyncio.wait([last])
        if last.cancelled():
            return False
        if (error := last.exception()) is not None:
            raise error
        return not o.lost

    def _counted(self, o: Owned, d: Delivery, outputs: _Outputs, status: int) -> None:
        """Count a commit's outcome; a commit fenced out loses the stream."""
        w = self.w
        if status == 1:
            w.stats.handled += 1
            for stream, _ in outputs:
                w.published[stream] = w.published.get(stream, 0) + 1
            return
        w.stats.refused += 1
        if status == FENCED:
            log.warning("commit of %s %s refused: fenced out (the stream has another owner now; it handles the "
                        "entry again)", o.ref.key, d.entry_id.decode())
            self._lose(o.ref.key, "fenced out of a commit")
            return
        log.warning("commit of %s %s refused: it was no longer pending (committed already, by a commit sent again "
                    "or by another consumer of the group)", o.ref.key, d.entry_id.decode())

    async def _commit_loop(self) -> None:
        """Send the commits gathered so far on a free connection, without waiting for the reply before gathering
        the next (``_commit`` also sends a full chunk at once): Redis applies one batch while the streams whose
        commits came back handle their next entries. A stream has one commit in flight at most, so batches in
        flight never touch one entry twice."""
        for _ in range(COMMIT_LINES):
            self._lines.append(line_for(self.w.client))
        try:
            while not self._failed:
                if not self._commits:
                    if self._commits_closed:
                        if not self._sending:
                            break
                        # batches still in flight: their return may send streams' staged commits
                        await asyncio.wait(set(self._sending))
                        continue
                    self._commit_ready.clear()
                    await self._commit_ready.wait()
                    continue
                if not self._lines:
                    self._line_free.clear()
                    await self._line_free.wait()
                    continue
                self._flush()
            if self._sending:
                await asyncio.wait(self._sending)
            if self._failed:
                raise self._failed[0]
        finally:
            await self._stop_committing()

    async def _stop_committing(self) -> None:
        """The committer's end: what is left unsent fails at once (its entries stay pending), lines closed."""
        self._ended = True
        for task in self._sending:
            task.cancel()
        left, self._commits = self._commits, []
        _unsent(left)
        lines, self._lines = self._lines, []
        for line in lines:
            await line.close()

    def _flush(self) -> None:
        """Send what is gathered on a free connection (the caller checked there is one)."""
        line = self._lines.pop()
        batch, self._commits = self._commits, []
        task = asyncio.create_task(self._send_on(line, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_on(self, line: _Line, batch: list[_Commit]) -> None:
        try:
            await self._send(line, batch)
        except BaseException as exc:
            self._ended = True  # (before the futures' callbacks run: no stream's staged commits may go after these)
            for *_, fut in batch:
                if not fut.done():
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                        fut.exception()  # (a staged commit nobody awaits: the committer raises it, not the loop's log)
                    else:
                        fut.cancel()
            if not isinstance(exc, asyncio.CancelledError):
                self._failed.append(exc)
                self._commit_ready.set()
            await line.close()
            if not isinstance(exc, Exception):
                raise
            return  # (the committer raises it, from ``_failed``: a task's exception nobody retrieves would be logged)
        self._lines.append(line)
        self._line_free.set()

    async def _send(self, line: _Line, batch: list[_Commit]) -> None:
        """Commit a batch: one ``fenced_commit.lua`` call per slot; on a cluster, all of them at once, pipelined
        per node. A call sent again after a lost connection finds its entries committed already (status 0)."""
        w = self.w
        new = {s for _, _, outs, _ in batch for s, _ in outs} - w._registered
        if new:
            await w._retrying(lambda: w._register(new))
        parts = self._by_slot(batch) if self.leases.clustered else [batch]
        if isinstance(line, ClusterLine):
            calls = [self._commit_call(part) for part in parts]
            replies = await w._retrying(partial(eval_many, line, scripts.FENCED_COMMIT, calls)) or [None] * len(parts)
        else:
            replies = []
            for part in parts:
                keys, args = self._commit_call(part)
                replies.append(await w._retrying(partial(scripts.FENCED_COMMIT.on, line, keys, args)))
        stats = w.stats
        told: Owned | None = None  # the stream whose run was last said fenced out
        for part, results in zip(parts, replies, strict=True):
            for (o, d, outputs, fut), status in zip(part, results or [0] * len(part), strict=True):
                if status == 1 and not outputs:
                    stats.handled += 1
                elif status == FENCED and o is told:
                    stats.refused += 1  # (the rest of a fenced run: said once)
                else:
                    self._counted(o, d, outputs, int(status))
                    told = o if status == FENCED else None
                if not fut.done():  # (a stream's entries in one call share it: their waiters run once all counted)
                    fut.set_result(status)

    @staticmethod
    def _by_slot(batch: list[_Commit]) -> list[list[_Commit]]:
        """A cluster's batch split by slot, each stream's commits in their order."""
        by_stream: dict[str, list[int]] = {}
        for i, (o, *_rest) in enumerate(batch):
            by_stream.setdefault(o.ref.key, []).append(i)
        return [[batch[i] for s in streams for i in by_stream[s]] for streams in by_slot(by_stream, True)]

    def _commit_call(self, part: list[_Commit]) -> tuple[list[str], list[Any]]:
        """``fenced_commit.lua``'s keys and arguments: the entries in runs of one stream (a stream's staged commits
        are consecutive), each run's token given once."""
        keys: list[str] = []
        args: list[Any] = [self.w.group, FORMAT_VERSION]
        run: Owned | None = None
        at = count = 0  # where the run's entry count goes, and the count so far
        for o, d, outputs, _ in part:
            if o is not run:
                if run is not None:
                    args[at] = count
                run, count = o, 0
                keys += o.keys
                args += (o.token, 0)
                at = len(args) - 1
            count += 1
            failed = 1 if d.deliveries > 1 else 0
            if not outputs:
                args += (d.entry_id, failed)
            else:
                args += (d.entry_id, 2 * len(outputs) + failed)
                for out_stream, enc in outputs:
                    keys.append(out_stream)
                    args += (enc.type, enc.enc, enc.data)
        args[at] = count
        return keys, args

    # ---- reading ---------------------------------------------------------------------------------

    def _read_ahead(self) -> int:
        return max(MIN_READ_AHEAD, min(MAX_READ_AHEAD, self.w.config.prefetch // max(1, len(self.owned))))

    async def _read_loop(self) -> None:
        w = self.w
        line = line_for(w.client)
        delay = 0.1
        try:
            while not w._stop.is_set():
                if not w._reading_allowed():
                    await w._breaker_changed()
                    continue
                ahead = self._read_ahead()
                active = [(s, o) for s, o in self.owned.items() if o.ready and not o.leaving and not o.lost]
                want = {s: o.token for s, o in active if len(o.queue) < ahead}
                full = len(want) < len(active)  # some stream has all it may read ahead: wake when it has room
                if not want:
                    self._room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), w.config.block_ms / 1000)
                    continue
                woken = {s: want[s] for s in self._woken if s in want}  # (after a quiet spell: those alone)
                self._woken.clear()
                want = woken or want
                try:
                    await self._recover(want)
                    last = {s: o.last_read for s, o in active if o.last_read is not None and s in want}
                    read = await self._read(want, ahead, line, last, few=bool(woken))
                    for stream, last_id in read.idle.items():  # (before the wait: a wake-up forgets them again)
                        if (o := self.owned.get(stream)) is not None and o.token == want[stream]:
                            o.last_read = last_id
                    if not read.entries and read.idle and not full and not woken and not w._stop.is_set():
                        await self._wait_new(line, read.idle)
                    elif not read.entries and full:
                        self._room.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._room.wait(), MAX_WAIT_MS / 1000)
                    w._reads_failing, delay = False, 0.1
                except (rex.RedisError, OSError) as exc:
                    raise_if_cancelled(exc)
                    w._reads_failing = True
                    log.warning("read failed, retrying in %.1fs: %s", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                await self._queue(read, want)
        finally:
            await line.close()

    async def _queue(self, read: Read, tokens: dict[str, int]) -> None:
        """Drop the streams a read found fenced out and queue its entries; after a trickle, let the streams' tasks
        start on them before the reader makes its next read (which takes it a while to write)."""
        for stream in read.lost:
            self._lose(stream, "fenced out of a read")
        if 0 < self._take(read.entries, tokens) < FEW:
            await asyncio.sleep(0)

    async def _read(self, tokens: dict[str, int], count: int, line: _Line, last: dict[str, bytes],
                    few: bool = False) -> Read:
        """The fenced read of the streams (stream → token). When it fails, Redis may have run it and its reply
        been lost, leaving entries pending here that were never queued (and that the next ones read would
        overtake): its streams are marked for ``_recover`` (not after a WatchError: then no EXEC ran)."""
        try:
            return await self.leases.read(tokens, self.w.consumer, count, line, last, few=few)
        except rex.WatchError:
            raise
        except (rex.RedisError, OSError):
            for stream, token in tokens.items():
                if (o := self.owned.get(stream)) is not None and o.token == token:
                    o.unsure = True
            raise

    async def _recover(self, tokens: dict[str, int]) -> None:
        """Before reading on, queue what a failed read may have left pending on its streams (``_take_over`` from
        where their queues end)."""
        for stream, token in tokens.items():
            o = self.owned.get(stream)
            if o is not None and o.unsure and o.token == token:
                o.unsure = not await self._take_over(o, recovering=True)

    def _take(self, entries: dict[str, list[Any]], tokens: dict[str, int]) -> int:
        """Queue what a read under ``tokens`` returned on its streams (a stream lost meanwhile, or owned again
        under a new token, leaves them pending for that owner's take-over); return how many were queued."""
        taken = 0
        for stream, got in entries.items():
            o = self.owned.get(stream)
            if o is None or o.lost or o.token != tokens[stream]:
                continue
            o.queue.extend(Delivery(o.ref, entry_id, fields, 1) for entry_id, fields in got)
            o.last_read = got[-1][0]
            o.queued_to = "(" + o.last_read.decode()
            o.wake.set()
            taken += len(got)
        if taken:
            self.w.stats.delivered += taken
            self.w.read_sizes.observe(taken)
        return taken

    async def _wait_new(self, line: _Line, idle: dict[str, bytes]) -> None:
        """Block until one of the idle streams gets an entry (XREAD, no group: it changes nothing), a stream
        needs reading again, or a short while passed, so streams acquired meanwhile are read soon. On a cluster,
        idle streams in more than one slot are polled instead (``_poll_new``)."""
        wait_ms = min(self.w.config.block_ms, MAX_WAIT_MS)
        self._room.clear()
        self._new_ready.clear()
        if isinstance(line, ClusterLine) and len(slots := by_slot(idle, True)) > 1:
            await self._poll_new(line, idle, slots, wait_ms)
            return
        started = self._now()
        read = asyncio.ensure_future(line.call("XREAD", "COUNT", 1, "BLOCK", wait_ms, "STREAMS", *idle, *idle.values()))
        ready = asyncio.ensure_future(self._new_ready.wait())
        try:
            await asyncio.wait([read, ready], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            if not read.done():
                read.cancel()  # the line drops the connection: its late reply never answers the next command
                await asyncio.wait([read])
        if not read.cancelled():
            woken = read.result() or ()
            quiet = self._now() - started >= QUIET_S
            for name in woken.keys() if isinstance(woken, dict) else (pair[0] for pair in woken):
                # Asked again at the next read: were the stream's new entries read by someone else (an unordered
                # consumer wrongly in the group), waiting from the id known here would wake at once, again and again.
                if (o := self.owned.get(name.decode())) is not None:
                    o.last_read = None
                    if quiet:
                        self._woken.add(o.ref.key)

    async def _poll_new(self, line: ClusterLine, idle: dict[str, bytes], slots: list[list[str]], wait_ms: int) -> None:
        """Wait for an entry on idle streams spread over several cluster slots, which no single XREAD BLOCK can
        watch (CROSSSLOT), and one blocking connection per slot would not scale: after a pause, a non-blocking
        XREAD per slot, pipelined per node (one round trip, the nodes at once), the pauses doubling from
        ``IDLE_POLL_MS[0]`` to ``IDLE_POLL_MS[1]``, until an entry came, a stream is ready to be read, the worker
        stops or ``wait_ms`` passed. The cost: a new entry on a quiet stream waits up to ``IDLE_POLL_MS[1]`` (plus
        a round trip) instead of waking a blocked read at once; a busy stream is read back to back, never paused."""
        commands = [("XREAD", "COUNT", 1, "STREAMS", *streams, *(idle[s] for s in streams)) for streams in slots]
        deadline = self._now() + wait_ms / 1000
        pause_s = IDLE_POLL_MS[0] / 1000
        while (left := deadline - self._now()) > 0 and not self.w._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_ready.wait(), min(pause_s, left))
                return
            for reply in await line.call_many(commands):
                if isinstance(reply, Exception):
                    raise reply
                if reply:
                    return
            pause_s = min(pause_s * 2, IDLE_POLL_MS[1] / 1000)


def _unsent(commits: list[_Commit]) -> None:
    """Fail commits the committer will never send (raised to whoever waits for one; nobody may)."""
    for *_, fut in commits:
        if not fut.done():
            fut.set_exception(FabricError("the committer stopped before this entry's commit: it stays pending"))
            fut.exception()
