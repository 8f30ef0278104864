"""Running a worker as a process: uvloop, a tuned garbage collector, signals, and a clean exit.

The first SIGTERM or SIGINT starts a graceful drain (``Worker.run`` documents it); a second one cancels
in-flight work at once. What did not finish stays pending in Redis for the rest of the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import uvloop

from fabric.client import connect, translated
from fabric.config import WorkerConfig
from fabric.endpoints import ANY_HOST
from fabric.handler import HandlerFn, Middleware
from fabric.keys import Keys
from fabric.logs import log_context
from fabric.metrics import HandlerTallies, measured
from fabric.preflight import check_worker
from fabric.snapshots import DIR_ENV
from fabric.supervisor import SUPERVISOR_ENV, signal_on_parent_death
from fabric.telemetry import exposed
from fabric.worker import Worker

__all__ = ["drain_when_orphaned", "run_worker", "serve", "tune_gc"]

log = logging.getLogger("fabric.runner")

GC_THRESHOLD = (50_000, 20, 100)
"""Young collections every 50,000 allocations instead of 700: a worker allocates a few objects per entry, and
almost none of them live in cycles (reference counting frees them); measured in bench/, about 0.8 µs per
event of collector time at Python's defaults."""


def tune_gc() -> None:
    """Freeze what exists at start-up (imports, config) out of the collector's sight and collect young objects
    less often: a process moving 100,000s of events a second spends far less time in the cyclic collector."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def drain_when_orphaned() -> None:
    """In a process a supervisor started: ask Linux for SIGTERM when the supervisor dies, even by SIGKILL, so the
    worker drains and hands its entries back instead of running on unsupervised (its own session keeps it from the
    terminal's signals). Elsewhere, or outside a supervisor, nothing."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if not parent:
        return
    signal_on_parent_death(signal.SIGTERM)
    if os.getppid() != int(parent):  # the supervisor died before the request above: nothing is held yet
        os.kill(os.getpid(), signal.SIGTERM)


async def serve(
    url: str | None,
    handler: HandlerFn,
    config: WorkerConfig,
    *,
    namespace: str = "fabric",
    handler_name: str = "handler",
    middleware: Sequence[Middleware] = (),
    fallback: HandlerFn | None = None,
    metrics_port: int | None = None,
    metrics_host: str = ANY_HOST,
) -> bool:
    """Run one worker until SIGTERM/SIGINT, then drain; return False if a second signal cut the drain short.
    ``fallback`` answers instead of the handler while one of its breakers is open. Metrics are served on
    ``metrics_port`` or, under a supervisor that serves them, written to its ``$FABRIC_METRICS_DIR``."""
    client = connect(url)
    directory = os.environ.get(DIR_ENV)
    tallies = HandlerTallies() if directory or metrics_port is not None else None
    chain = [*([measured(tallies)] if tallies else []), log_context, *middleware]
    worker = Worker(client, handler, config, keys=Keys(namespace), handler_name=handler_name,
                    middleware=chain, fallback=fallback)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining (send again to stop at once)", sig.name)
            worker.stop()
        elif main is not None:
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        with translated(url):
            await check_worker(client, worker.keys, config, worker.consumer, url=url)  # one line, exit 4 or 1
            log.info("worker %s of group %s on topics %s", worker.consumer, config.group, ", ".join(config.topics))
            async with _exposed(worker, tallies, metrics_port, metrics_host, directory):
                await worker.run()
            log.info("stopped: %s", worker.stats)
            return True
    except asyncio.CancelledError:
        if signals < 2 or main is None:
            raise
        main.uncancel()
        log.warning("stopped at once on a second signal: unfinished entries stay pending for the group")
        return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await client.aclose()


def _exposed(worker: Worker, tallies: HandlerTallies | None, port: int | None, host: str,
             directory: str | None) -> contextlib.AbstractAsyncContextManager[object]:
    if tallies is None:
        return contextlib.nullcontext()
    return exposed(worker, tallies, port=port, host=host, directory=Path(directory) if directory else None)


def run_worker(url: str | None, handler: HandlerFn, config: WorkerConfig, **kwargs: object) -> bool:
    """``serve`` on a fresh uvloop event loop with a tuned collector; True when it drained gracefully."""
    tune_gc()
    return uvloop.run(serve(url, handler, config, **kwargs))  # type: ignore[arg-type]
