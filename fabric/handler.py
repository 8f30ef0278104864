"""The handler contract: a plain ``async def handle(event[, ctx])`` returning None, an event or a list.

Everything else (timeouts, retry policy, breakers, metrics, log context) wraps a handler as middleware: a function
from ``HandlerFn`` to ``HandlerFn``. (A worker with no middleware times its handler calls itself: ``Deadlines``.
So does a worker whose middleware is all ``blind_to_timeouts``: fabric's own metrics and log context, which act
alike whether a call ends in ``TimeoutError`` or not, and so need no ``timed`` layer, a coroutine frame and a
task lookup per call, to turn the deadline's cancellation into ``TimeoutError`` for them.)
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from fabric.errors import HandlerLoadError
from fabric.events import Event

__all__ = ["Context", "Deadlines", "HandlerFn", "Middleware", "Watch", "as_handler", "blind_to_timeouts",
           "load_handler", "needs_timed", "timed", "timeout", "wrap"]


class Context(msgspec.Struct, frozen=True, kw_only=True):
    """Delivery facts a handler may ask for with a second parameter."""

    stream: str
    topic: str
    priority: str
    symbol: str | None
    entry_id: str
    delivery_count: int
    group: str
    consumer: str


HandlerFn = Callable[[Event, Context], Awaitable[list[Event]]]
Middleware = Callable[[HandlerFn], HandlerFn]


def _outputs(result: Any, name: str) -> list[Event]:
    if isinstance(result, Event):
        return [result]
    if isinstance(result, (list, tuple)) and all(isinstance(e, Event) for e in result):
        return list(result)
    raise TypeError(f"handler {name} returned {type(result).__name__}: return None, an Event or a list of Events")


def as_handler(fn: Callable[..., Any], name: str | None = None) -> HandlerFn:
    """Adapt ``async def f(event)`` or ``async def f(event, ctx)`` to the uniform ``HandlerFn``."""
    label: str = name or str(getattr(fn, "__qualname__", repr(fn)))
    return _adapt(fn, label)


def _adapt(fn: Callable[..., Any], name: str) -> HandlerFn:
    if not inspect.iscoroutinefunction(fn):
        raise HandlerLoadError(f"handler {name} is not an async function: declare it with 'async def'")
    params = [
        p for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) not in (1, 2):
        raise HandlerLoadError(f"handler {name} takes {len(params)} arguments: expected (event) or (event, ctx)")

    if len(params) == 1:
        async def handle(event: Event, ctx: Context) -> list[Event]:
            result = await fn(event)
            return [] if result is None else _outputs(result, name)
    else:
        async def handle(event: Event, ctx: Context) -> list[Event]:
            result = await fn(event, ctx)
            return [] if result is None else _outputs(result, name)

    handle.__qualname__ = name
    return handle


def load_handler(ref: str) -> tuple[str, HandlerFn]:
    """Import ``MODULE:FUNCTION`` and adapt it; return (ref, handler)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise HandlerLoadError(f"handler {ref!r} is not MODULE:FUNCTION (for example handlers.quotes:mid_price)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or anything the module raised while it ran
        raise HandlerLoadError(
            f"cannot import {module_name!r} for handler {ref!r} ({type(exc).__name__}: {exc}): run from the "
            "directory that holds the module, or add it to PYTHONPATH"
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise HandlerLoadError(f"module {module_name!r} has no {attr!r}: check the handler name {ref!r}")
    return ref, as_handler(fn, ref)


def _task_finder() -> Callable[[], asyncio.Task[Any] | None]:
    """``asyncio.current_task``, or on Python 3.11 a cheaper equivalent for the hot path of every handler call.

    On 3.11 each ``current_task()`` asks for the running loop, and that asks the kernel for the process id (a
    system call, to notice a fork): about a tenth of a µs per call. This remembers each thread's loop and looks
    its running task up in asyncio's own table, asking for the loop again only when that finds none (a new loop
    in the thread); a fork forgets what it remembered. It would be wrong only if a loop that one thread ran were
    then run by another while the first runs a new loop: do not move a loop between threads. From 3.12
    ``current_task`` is C, and 3.14 has no such table: there it is used as it is."""
    table: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info >= (3, 12) or table is None:
        return asyncio.current_task

    class Remembered(threading.local):
        loop: asyncio.AbstractEventLoop | None = None

    remembered = Remembered()  # per thread, and gone with it
    os.register_at_fork(after_in_child=lambda: setattr(remembered, "loop", None))

    def current_task() -> asyncio.Task[Any] | None:
        loop = remembered.loop
        task = table.get(loop) if loop is not None else None
        if task is None:
            loop = remembered.loop = asyncio.get_running_loop()
            task = table.get(loop)
        return task

    return current_task


current_task = _task_finder()
"""``asyncio.current_task()``, cheaper on Python 3.11 (``_task_finder``)."""


class Watch:
    """One task's handler calls as ``Deadlines`` sees them. Around each call the task does ``calls += 1`` and
    ``busy = True``, then ``busy = False`` and ``if expired: settle()``: a few attribute writes per call."""

    __slots__ = ("busy", "calls", "expired", "since", "task", "seen")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.calls = 0
        self.busy = False
        self.expired = False
        """The watchdog cancelled the task for the call in progress."""
        self.seen = -1
        self.since = 0.0

    def settle(self) -> bool:
        """After a call the watchdog cancelled: undo that cancel (a call that swallowed it and returned keeps its
        result; one that raised ``CancelledError`` timed out, unless the task is still being cancelled by
        someone else). Returns True."""
        self.expired = False
        if self.task is not None:
            self.task.uncancel()
        return True


UNWATCHED = Watch(None)
"""A watch no timer checks: a caller marks its calls on it when a layer further in times them (``timed``)."""


class Deadlines:
    """A watchdog for handler calls. Each task that calls handlers (a worker's dispatcher, an ordered stream, or
    any task through ``timed``) has a ``Watch``; one timer, every ``tick_s`` (a twentieth of the limit, but at
    least every half second and at most every millisecond), cancels a task it finds busy on the same call as at
    least ``seconds`` before. A call thus times out between ``seconds`` and ``seconds + 2 * tick_s`` after it
    started (a tenth of the limit late at most, for limits of 20 ms and more, give or take the event loop's own
    lag), and the timer runs as long as some task is watched. Per call the caller writes a few attributes: a
    worker with no middleware does it around the handler itself, where a deadline per call (a clock read and a
    dict entry, keyed by the task) and a middleware frame cost 0.35 µs, a tenth of its time per event (``python
    -m bench.drain``); with middleware, ``timed`` does it innermost, so that the middleware sees
    ``TimeoutError``. ``seconds`` None: no limit (nothing is registered or cancelled)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.message = f"handler ran longer than its {seconds:g} s timeout" if seconds else ""
        self.tick_s = min(max((seconds or 0) / 20, 0.001), 0.5)
        self._watches: dict[asyncio.Task[Any], Watch] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The timer's loop: a timer left behind on a loop that has ended does not count."""

    def watch(self, task: asyncio.Task[Any] | None) -> Watch:
        """The watch of ``task``'s calls (None, outside a task: never cancelled); ``forget`` it when the task
        ends."""
        w = Watch(task)
        if self.seconds is not None and task is not None:
            self._watches[task] = w
            loop = task.get_loop()
            if self._timer is None or self._loop is not loop:
                self._watches = {t: v for t, v in self._watches.items() if t.get_loop() is loop}
                self._loop, self._timer = loop, loop.call_later(self.tick_s, self._check)
        return w

    def watching(self, task: asyncio.Task[Any] | None) -> Watch | None:
        """The watch of ``task``, if it has one."""
        return self._watches.get(task) if task is not None else None

    def forget(self, w: Watch) -> None:
        if w.task is not None and self._watches.get(w.task) is w:
            del self._watches[w.task]

    def _check(self) -> None:
        now, limit = time.monotonic(), self.seconds or 0.0
        for w in list(self._watches.values()):
            if not w.busy:
                continue
            if w.seen != w.calls:  # a call it had not seen busy yet
                w.seen, w.since = w.calls, now
            elif now - w.since >= limit and not w.expired and w.task is not None:
                w.expired = True
                w.task.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.tick_s, self._check) if self._watches else None


def timed(deadlines: Deadlines) -> Middleware:
    """``deadlines`` as the innermost middleware: a call past the limit raises ``TimeoutError`` inside the chain,
    where the middleware around it (a breaker counting failures, a retry policy) sees it. The call is watched
    through its task's watch if it has one (a worker's dispatcher, an ordered stream), else through one made for
    the call."""

    def middleware(inner: HandlerFn) -> HandlerFn:
        async def handle(event: Event, ctx: Context) -> list[Event]:
            task = current_task()
            if task is None:  # not in a task (cannot be cancelled): run unguarded
                return await inner(event, ctx)
            watch = deadlines.watching(task)
            own = watch is None
            if watch is None:
                watch = deadlines.watch(task)
            before = task.cancelling()
            watch.calls += 1
            watch.busy = True
            try:
                try:
                    return await inner(event, ctx)
                finally:  # (a call that swallowed the deadline's cancel and returned keeps its result)
                    watch.busy = False
                    timed_out = watch.expired and watch.settle()
                    if own:
                        deadlines.forget(watch)
            except asyncio.CancelledError:
                # a cancel from outside landing with the deadline's stays a cancellation
                if timed_out and task.cancelling() <= before:
                    raise TimeoutError(deadlines.message) from None
                raise

        return handle

    return middleware


def timeout(seconds: float) -> Middleware:
    """Fail a handler call that runs longer than ``seconds`` (at most a tenth of it, or a second, later) with
    ``TimeoutError``; the call then counts as a failed delivery and is retried. (A worker times its handler calls
    itself, ``WorkerConfig.handler_timeout_s``: this is for handlers called some other way.)"""
    return timed(Deadlines(seconds))


_BLIND: weakref.WeakSet[Middleware] = weakref.WeakSet()


def blind_to_timeouts(m: Middleware) -> Middleware:
    """Mark middleware that acts alike whether a handler call ends in ``TimeoutError`` or in the deadline's
    cancellation (it measures, or sets context, around the call): a worker whose middleware is all such times the
    calls itself, without a ``timed`` layer."""
    _BLIND.add(m)
    return m


def needs_timed(middleware: Sequence[Middleware]) -> bool:
    """True when some middleware may tell a handler timeout from other failures (a breaker counting them), and so
    must see ``TimeoutError``: the chain then ends in ``timed``."""
    return any(m not in _BLIND for m in middleware)


def wrap(handler: HandlerFn, middleware: Sequence[Middleware]) -> HandlerFn:
    """Apply middleware, the first in the list outermost."""
    for m in reversed(middleware):
        handler = m(handler)
    return handler
