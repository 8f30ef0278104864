"""The handler contract: a plain ``async def handle(event[, ctx])`` returning None, an event or a list.

Everything else (timeouts, later retry policy, breakers, metrics, log context) wraps a handler as middleware:
a function from ``HandlerFn`` to ``HandlerFn``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from fabric.errors import HandlerLoadError
from fabric.events import Event

__all__ = ["Context", "HandlerFn", "Middleware", "as_handler", "load_handler", "timeout", "wrap"]


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


_current_task = _task_finder()


class _Deadlines:
    """Handler calls in flight and their deadlines, checked by one timer every ``tick_s``: a few dict operations
    per call, where ``asyncio.timeout`` would schedule and cancel a timer per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.tick_s = min(max(seconds / 10, 0.001), 1.0)
        self.calls: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.tick_s, self.check)

    def leave(self, task: asyncio.Task[Any]) -> bool:
        """End a call (again: no-op); True if it had been cancelled for running past its deadline."""
        if self.calls.pop(task, None) is None:
            return False
        return self.settle(task)

    def settle(self, task: asyncio.Task[Any]) -> bool:
        """Undo the deadline's cancel of an ended call, if there was one; True if there was."""
        if task in self.expired:
            self.expired.discard(task)
            task.uncancel()
            return True
        return False

    def check(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self.calls.items()):
            if deadline <= now and task not in self.expired:
                self.expired.add(task)
                task.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.tick_s, self.check) if self.calls else None


def timeout(seconds: float) -> Middleware:
    """Fail a handler call that runs longer than ``seconds`` (give or take a tenth of it, at most 1 s) with
    ``TimeoutError``; the call then counts as a failed delivery and is retried."""

    def middleware(inner: HandlerFn) -> HandlerFn:
        deadlines = _Deadlines(seconds)
        calls, expired = deadlines.calls, deadlines.expired
        current_task, monotonic = _current_task, time.monotonic

        async def handle(event: Event, ctx: Context) -> list[Event]:
            task = current_task()
            if task is None:  # not in a task (cannot be cancelled): run unguarded
                return await inner(event, ctx)
            before = task.cancelling()
            calls[task] = monotonic() + seconds
            if deadlines.timer is None:
                deadlines.arm()
            try:
                return await inner(event, ctx)
            except asyncio.CancelledError:
                # a cancel from outside landing with the deadline's stays a cancellation
                if deadlines.leave(task) and task.cancelling() <= before:
                    raise TimeoutError(f"handler ran longer than its {seconds:g} s timeout") from None
                raise
            finally:
                if calls.pop(task, None) is not None and expired:
                    deadlines.settle(task)  # it swallowed the deadline's cancel and finished: its result stands

        return handle

    return middleware


def wrap(handler: HandlerFn, middleware: Sequence[Middleware]) -> HandlerFn:
    """Apply middleware, the first in the list outermost."""
    for m in reversed(middleware):
        handler = m(handler)
    return handler
