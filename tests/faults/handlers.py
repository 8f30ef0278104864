"""Handlers the fault suite's ``fabric worker`` processes run; each journals the calls it completes.

Settings come from the environment the harness gives each process:

- ``FAULTS_JOURNAL_DIR``  where ``handled.PID.log`` goes (see ``checker.Journal``);
- ``FAULTS_SLEEP_MS``     how long each call works first (default 0), so that signals land mid-batch;
- ``FAULTS_HANG_EVERY``   ``hang_some``: the first delivery of every tick whose ``seq`` is a multiple of this hangs;
- ``FAULTS_GATE``         ``gated``: each call waits until this file exists (the test creates it to let them go).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fabric.events import Event
from fabric.handler import Context
from tests.faults.checker import Journal

_journal: Journal | None = None
HANG_S = 3600.0
GATE_POLL_S = 0.02


def _record(event: Event, ctx: Context) -> None:
    global _journal
    if _journal is None:
        _journal = Journal(Path(os.environ["FAULTS_JOURNAL_DIR"]) / f"handled.{os.getpid()}.log")
    _journal.handled(event.event_id, ctx.stream, ctx.entry_id, ctx.delivery_count)


async def _work() -> None:
    sleep_ms = int(os.environ.get("FAULTS_SLEEP_MS", "0"))
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)


async def record(event: Event, ctx: Context) -> None:
    """Work ``FAULTS_SLEEP_MS``, then journal the call."""
    await _work()
    _record(event, ctx)


async def gated(event: Event, ctx: Context) -> None:
    """Like ``record``, once the file ``FAULTS_GATE`` exists: until then the call holds its entry."""
    gate = Path(os.environ["FAULTS_GATE"])
    while not gate.exists():
        await asyncio.sleep(GATE_POLL_S)
    await record(event, ctx)


async def hang_some(event: Event, ctx: Context) -> None:
    """Like ``record``, except that some first deliveries hang (past any handler timeout)."""
    every = int(os.environ.get("FAULTS_HANG_EVERY", "10"))
    if ctx.delivery_count == 1 and getattr(event, "seq", 1) % every == 0:
        await asyncio.sleep(HANG_S)
    await record(event, ctx)


async def always_raise(event: Event, ctx: Context) -> None:
    """Fail every call, naming the event in the error."""
    await _work()
    raise RuntimeError(f"always fails on {event.event_id}")
