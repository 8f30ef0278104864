"""Circuit breakers whose state lives in Redis, so every process of a fleet backs off together and comes back
together.

Three layers, as in dramatiq's rate limiters: ``breaker.lua`` holds the state and makes every decision
atomically on Redis's clock (CLOSED → OPEN → HALF_OPEN → CLOSED); ``BreakerStore`` runs its operations;
``Breaker`` is one process's view of one breaker, and ``guard`` the middleware that puts it around a handler.

A process never asks Redis "is it open?" per event. Its view changes when a transition is announced on the
pub/sub channel (within a millisecond or so), and is refreshed every ``POLL_MS`` in case an announcement was
missed (a dropped connection): **a view is never more than ``POLL_MS`` (1 s) behind Redis.** Outcomes are
reported in batches, at most ``REPORT_MS`` (50 ms) after the call: so every process stops calling at most
``REPORT_MS + POLL_MS`` after the failure that tripped the breaker, typically a few milliseconds. In HALF_OPEN
each trial call needs a permit from Redis (a round trip per trial, and at most ``half_open_trials`` permits
fleet-wide).

For operators (``fabric breaker``): ``describe`` and ``list_breakers`` read a breaker's state hash, window and
recent transitions without writing anything; ``force_breaker`` forces one open, closed or reset through the script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import msgspec
import redis.exceptions as rex
from redis.asyncio import Redis

from fabric import scripts
from fabric.client import raise_if_cancelled
from fabric.codec import decode_fields
from fabric.config import BreakerConfig
from fabric.errors import DecodeError, FabricError, NotFound
from fabric.events import BreakerStateChanged, Event
from fabric.handler import Context, HandlerFn, Middleware
from fabric.keys import Keys
from fabric.nodes import is_cluster

__all__ = [
    "FORCE_TARGETS", "POLL_MS", "REPORT_MS", "Breaker", "BreakerInfo", "BreakerState", "BreakerStore", "Deferred",
    "Transition", "Withheld", "breaker_names", "describe", "force_breaker", "guard", "list_breakers", "require",
]

log = logging.getLogger("fabric.breaker")

POLL_MS = 1_000
"""How often a process re-reads a breaker's state whatever the channel said: the bound on a stale view."""
REPORT_MS = 50
"""How long outcomes wait before they are reported in one batch."""
CLOSED, OPEN, HALF_OPEN = "CLOSED", "OPEN", "HALF_OPEN"
FORCE_TARGETS = ("open", "closed", "reset")
"""What ``force_breaker`` accepts: open until closed by hand, closed, or closed with its counts cleared."""
TRANSITIONS_SHOWN = 5
"""How many of a breaker's latest transitions ``describe`` returns."""
TRANSITIONS_SCANNED = 10_000
"""How far back ``describe`` looks for them in the system stream, which every breaker of the namespace shares."""
_PAGE = 500


class Withheld(Exception):  # noqa: N818 (not an error: a call that did not happen)
    """The worker is stopping while a breaker held this call back: the handler never ran, the entry goes back to
    the group as unstarted."""


class Deferred(Withheld):
    """A HALF_OPEN trial call failed: the entry waits for the next trial without being charged a delivery."""


class BreakerState(NamedTuple):
    """A breaker as Redis has it after an operation."""

    state: str
    generation: int
    wait_ms: int
    """OPEN: time left before trials are admitted (-1: forced open until closed by hand); else 0."""
    admitted: bool
    forced: bool

    @classmethod
    def parse(cls, reply: Any) -> BreakerState:
        """From the script's reply."""
        state, gen, wait_ms, admitted, forced = reply
        return cls(state.decode() if isinstance(state, bytes) else state, int(gen), int(wait_ms), bool(admitted),
                   bool(forced))


class BreakerStore:
    """The operations of ``breaker.lua`` for one breaker name and policy."""

    def __init__(self, client: Redis, keys: Keys, config: BreakerConfig) -> None:
        self.client = client
        self.keys = keys
        self.config = config
        c = config
        self._keys = [keys.breaker(c.name), keys.breaker_window(c.name), keys.breaker_events()]
        self._head = [keys.breaker_channel()]
        self._policy = [c.failure_threshold, c.failure_rate, c.window_ms, c.min_calls, c.recovery_ms,
                        c.half_open_trials, c.close_after, c.trial_timeout_ms]
        self._registered = False

    async def _call(self, op: str, *args: Any) -> BreakerState:
        if not self._registered:  # once per process: the CLI lists breakers from here, workers find the events
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(self.keys.breaker_registry(), self.config.name)
                pipe.sadd(self.keys.topic_registry(self.keys.parse_stream(self._keys[2]).topic), self._keys[2])
                await pipe.execute()
            self._registered = True
        reply = await scripts.BREAKER(self.client, self._keys, [op, self.config.name, *self._head, *self._policy,
                                                                 *args])
        return BreakerState.parse(reply)

    async def get(self) -> BreakerState:
        """The state now (an OPEN breaker past its recovery time is still OPEN until someone asks to call)."""
        return await self._call("get")

    async def record(self, calls: int, failures: int, trailing: int, trial_ok: int, trial_failed: int) -> BreakerState:
        """Report a batch of outcomes: may trip (CLOSED) or settle (HALF_OPEN) the breaker."""
        return await self._call("record", calls, failures, trailing, trial_ok, trial_failed)

    async def admit(self) -> BreakerState:
        """Ask to make a call: OPEN past its recovery time turns HALF_OPEN; HALF_OPEN grants a limited trial."""
        return await self._call("admit")

    async def force(self, target: str, reason: str) -> BreakerState:
        """``open`` (stays open until closed by hand), ``closed``, or ``reset`` (closed, counts cleared)."""
        return await self._call("force", target, reason)


async def breaker_names(client: Redis, keys: Keys) -> list[str]:
    """Every breaker name in use in the namespace."""
    names: Any = await client.smembers(keys.breaker_registry())
    return sorted(n.decode() for n in names)


async def require(client: Redis, keys: Keys, name: str) -> None:
    """Raise ``NotFound`` unless the breaker has been used in the namespace."""
    if not await client.sismember(keys.breaker_registry(), name):
        raise NotFound(f"no breaker {name!r} in namespace {keys.ns!r}: `fabric breaker list` shows those in use")


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """One state change of a breaker, from its ``BreakerStateChanged`` event."""

    time_ms: int
    """When, on Redis's clock (the event's ``ts_ns``: the same instant as the state's ``since``)."""
    old_state: str
    new_state: str
    reason: str


class BreakerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A breaker as Redis has it, read without changing anything."""

    name: str
    state: str
    forced: bool
    """Forced open: no trials until someone closes it."""
    since_ms: int | None
    """When it entered its state (Unix ms, Redis's clock); None if no process has written it yet."""
    age_ms: int | None
    consecutive_failures: int
    trials: int
    """HALF_OPEN: trial calls admitted so far."""
    successes: int
    """HALF_OPEN: trial calls that succeeded so far."""
    generation: int
    """How many transitions it has made."""
    window_ms: int
    """The failure-rate window the counts below cover (the config's, else the default)."""
    window_calls: int
    window_failures: int
    transitions: list[Transition]
    """The latest first."""


async def describe(client: Redis, keys: Keys, name: str, policy: BreakerConfig | None = None,
                   transitions: int = TRANSITIONS_SHOWN) -> BreakerInfo:
    """One breaker's state, counts and latest transitions; ``NotFound`` unless it is in use. ``policy`` (a config
    file's ``[breakers.NAME]``) gives the window the counts cover."""
    await require(client, keys, name)
    (info,) = await _infos(client, keys, [name], {name: policy} if policy else {}, transitions)
    return info


async def list_breakers(client: Redis, keys: Keys, policies: Mapping[str, BreakerConfig] | None = None,
                        transitions: int = 1) -> list[BreakerInfo]:
    """Every breaker in use in the namespace, by name, with its latest transition."""
    return await _infos(client, keys, await breaker_names(client, keys), policies or {}, transitions)


async def force_breaker(client: Redis, keys: Keys, name: str, target: str, reason: str) -> BreakerState:
    """Force a breaker ``open`` (until closed by hand), ``closed``, or ``reset`` (closed, counts cleared), recording
    ``reason`` in the transition's event; every process's view follows within ``POLL_MS``."""
    if target not in FORCE_TARGETS:
        raise ValueError(f"cannot force a breaker {target!r}: use one of {', '.join(FORCE_TARGETS)}")
    await require(client, keys, name)
    # "force" reads no policy argument: the defaults only fill the script's argument list
    return await BreakerStore(client, keys, BreakerConfig(name=name)).force(target, reason)


async def _infos(client: Redis, keys: Keys, names: list[str], policies: Mapping[str, BreakerConfig],
                 transitions: int) -> list[BreakerInfo]:
    # HGETALL, not breaker.lua's "get": the script writes (and an admit-free read must not turn anything HALF_OPEN)
    async with client.pipeline(transaction=False) as pipe:
        if not is_cluster(client):  # (a cluster's pipeline refuses TIME, a command without a key: asked below)
            pipe.time()
        for name in names:
            pipe.hgetall(keys.breaker(name))
            pipe.hgetall(keys.breaker_window(name))
        replies = await pipe.execute()
    seconds, micros = await client.time() if is_cluster(client) else replies.pop(0)
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    history = await _transitions(client, keys, set(names), transitions)
    default_window_ms = BreakerConfig(name="default").window_ms
    return [_info(name, now_ms, replies[2 * i], replies[2 * i + 1],
                  policies[name].window_ms if name in policies else default_window_ms, history[name])
            for i, name in enumerate(names)]


def _info(name: str, now_ms: int, state: dict[bytes, bytes], window: dict[bytes, bytes], window_ms: int,
          transitions: list[Transition]) -> BreakerInfo:
    def number(field: bytes) -> int:
        return int(state.get(field, 0))

    since = int(state[b"since"]) if b"since" in state else None
    calls, failures = _window_counts(window, now_ms, window_ms)
    return BreakerInfo(
        name=name, state=state.get(b"state", CLOSED.encode()).decode(), forced=bool(number(b"forced")),
        since_ms=since, age_ms=None if since is None else max(0, now_ms - since),
        consecutive_failures=number(b"consecutive"), trials=number(b"trials"), successes=number(b"successes"),
        generation=number(b"gen"), window_ms=window_ms, window_calls=calls, window_failures=failures,
        transitions=transitions)


def _window_counts(window: dict[bytes, bytes], now_ms: int, window_ms: int) -> tuple[int, int]:
    """Calls and failures in the window's live buckets, counted as breaker.lua counts them."""
    oldest = (now_ms - window_ms) // 1000
    calls = failures = 0
    for field, value in window.items():
        second, _, kind = field.partition(b":")
        if int(second) <= oldest:
            continue  # expired: breaker.lua deletes it at its next count
        if kind == b"f":
            failures += int(value)
        else:
            calls += int(value)
    return calls, failures


async def _transitions(client: Redis, keys: Keys, names: set[str], n: int) -> dict[str, list[Transition]]:
    """The latest ``n`` transitions of each breaker named, newest first, from the shared system stream."""
    found: dict[str, list[Transition]] = {name: [] for name in names}
    end, scanned = "+", 0
    while n and scanned < TRANSITIONS_SCANNED and any(len(t) < n for t in found.values()):
        page: Any = await client.xrevrange(keys.breaker_events(), max=end, min="-", count=_PAGE)
        for _, fields in page:
            about = _transition(fields)
            if about and about[0] in found and len(found[about[0]]) < n:
                found[about[0]].append(about[1])
        scanned += len(page)
        if len(page) < _PAGE:
            break
        end = "(" + page[-1][0].decode()
    return found


def _transition(fields: dict[bytes, bytes]) -> tuple[str, Transition] | None:
    """The breaker an entry of the system stream is about and its transition; None if it is no transition."""
    try:
        event = decode_fields(fields)
    except DecodeError:
        event = None  # not written by breaker.lua: someone else's entry on the topic
    if not isinstance(event, BreakerStateChanged):
        return None
    return event.breaker, Transition(time_ms=event.ts_ns // 1_000_000, old_state=event.old_state,
                                     new_state=event.new_state, reason=event.reason)


class _Outcomes:
    """Outcomes waiting to be reported."""

    def __init__(self) -> None:
        self.calls = self.failures = self.trailing = self.trial_ok = self.trial_failed = 0

    def add(self, failed: bool, trial: bool) -> None:
        self.calls += 1
        if failed:
            self.failures += 1
            self.trailing += 1
        else:
            self.trailing = 0
        if trial:
            self.trial_failed += failed
            self.trial_ok += not failed

    def args(self) -> tuple[int, int, int, int, int]:
        return self.calls, self.failures, self.trailing, self.trial_ok, self.trial_failed


class Breaker:
    """One process's view of a shared breaker: who may call now, and the outcomes to report."""

    def __init__(self, store: BreakerStore) -> None:
        self.store = store
        self.name = store.config.name
        self.state = CLOSED
        self.forced = False
        self._generation = -1
        self._changed = asyncio.Event()
        self._pending = _Outcomes()
        self._reported = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._wait_ms = 0

    def counts(self, exc: BaseException) -> bool:
        """Whether an exception from the guarded handler counts as a failure of the downstream."""
        names = {c.__name__ for c in type(exc).__mro__}
        config = self.store.config
        if names & set(config.ignore):
            return False
        return not config.failures or bool(names & set(config.failures))

    async def start(self) -> None:
        """Read the state, then follow it: the channel, the poll, the reports."""
        self._apply(await self.store.get())
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll()),
                       asyncio.create_task(self._report())]

    def changed(self) -> asyncio.Event:
        """An event set at the view's next change."""
        return self._changed

    def stop(self) -> None:
        """Stop following at once (nothing more is reported)."""
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        """Report what is left and stop following."""
        self.stop()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, FabricError, rex.RedisError, OSError):
                await task
        if self._pending.calls:
            with contextlib.suppress(FabricError, rex.RedisError, OSError):
                await self._flush()

    @property
    def holding(self) -> bool:
        """OPEN and before its recovery time (or forced open): no call may go ahead, not even a trial."""
        return self.state == OPEN and (self.forced or self._wait_ms != 0)

    @property
    def reading(self) -> bool:
        """False while holding: entries wait in Redis, undelivered. Past the recovery time reading resumes, since
        only a call asks Redis for a trial (``admit``): a worker holding no entry must read one to recover."""
        return not self.holding

    def _apply(self, s: BreakerState) -> None:
        if s.generation < self._generation:
            return  # an older reply, overtaken by a newer one
        if s.state != self.state or s.forced != self.forced:
            log.warning("breaker %s: %s%s", self.name, s.state, " (forced)" if s.forced else "")
        self.state, self.forced, self._generation, self._wait_ms = s.state, s.forced, s.generation, s.wait_ms
        self._changed.set()
        self._changed = asyncio.Event()

    async def enter(self, stop: asyncio.Event) -> bool:
        """Wait until a call may go ahead; True when it is a HALF_OPEN trial (report it as one). Raises
        ``Withheld`` once ``stop`` is set while waiting."""
        while True:
            if stop.is_set():
                raise Withheld(f"breaker {self.name} is {self.state}")
            if self.state == CLOSED:
                return False
            if self.state == HALF_OPEN or (self.state == OPEN and self._wait_ms == 0 and not self.forced):
                s = await self.store.admit()
                self._apply(s)
                if s.admitted:
                    return s.state != CLOSED
            changed = self._changed
            timeout_s = (self._wait_ms if self.state == OPEN and self._wait_ms > 0 else POLL_MS) / 1000
            waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self.state == OPEN and not changed.is_set() and self._wait_ms > 0:
                self._wait_ms = 0  # the recovery time has passed here too: ask Redis (its clock decides)

    def outcome(self, failed: bool, trial: bool) -> None:
        """Record a call's outcome; it reaches Redis within ``REPORT_MS``."""
        self._pending.add(failed, trial)
        self._reported.set()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, _Outcomes()
        self._apply(await self.store.record(*batch.args()))

    async def _report(self) -> None:
        while True:
            await self._reported.wait()
            await asyncio.sleep(REPORT_MS / 1000)
            self._reported.clear()
            await self._retrying(self._flush)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_MS / 1000)
            await self._retrying(self._refresh)

    async def _refresh(self) -> None:
        self._apply(await self.store.get())

    async def _listen(self) -> None:
        """Refresh the view whenever the channel names this breaker; resubscribe after a lost connection."""
        while True:
            try:
                async with self.store.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.keys.breaker_channel())
                    await self._refresh()  # whatever was announced before the subscription took effect
                    async for message in pubsub.listen():
                        if message.get("type") == "message" and message["data"] in (self.name, self.name.encode()):
                            await self._refresh()
            except (FabricError, rex.RedisError, OSError) as exc:
                raise_if_cancelled(exc)
                log.warning("breaker %s: lost its channel (%s); polling until it is back", self.name, exc)
                await asyncio.sleep(POLL_MS / 1000)

    async def _retrying(self, step: Callable[[], Any]) -> None:
        try:
            await step()
        except (FabricError, rex.RedisError, OSError) as exc:
            raise_if_cancelled(exc)
            log.warning("breaker %s: %s", self.name, exc)


def guard(breakers: list[Breaker], stop: asyncio.Event, fallback: HandlerFn | None = None) -> Middleware:
    """Middleware: call the handler only when every breaker allows it (waiting while one is open, until ``stop``),
    report each outcome to every breaker; with a ``fallback``, call it instead of waiting while one is open."""

    def middleware(handler: HandlerFn) -> HandlerFn:
        async def guarded(event: Event, ctx: Context) -> list[Event]:
            if fallback is not None and any(b.holding for b in breakers):  # past it: ask for a trial
                return await fallback(event, ctx)
            trials = [await b.enter(stop) for b in breakers]
            try:
                result = await handler(event, ctx)
            except Exception as exc:
                counted = [b.counts(exc) for b in breakers]
                for b, trial, failed in zip(breakers, trials, counted, strict=True):
                    b.outcome(failed, trial)
                if any(t and f for t, f in zip(trials, counted, strict=True)):
                    raise Deferred(f"a trial call failed: {type(exc).__name__}: {exc}") from exc
                raise
            for b, trial in zip(breakers, trials, strict=True):
                b.outcome(False, trial)
            return result

        return guarded

    return middleware
