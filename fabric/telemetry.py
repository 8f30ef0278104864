"""What a worker process, or a supervisor, exposes while it runs: metrics, the sampled gauges, and the endpoints.

- ``exposed(worker, ...)`` around ``Worker.run``: counts the worker, samples its group (``sampler.py``), and
  either serves ``/metrics``, ``/healthz``, ``/readyz`` on a port or, under a supervisor that serves them
  (``$FABRIC_METRICS_DIR``), writes snapshots for it (``snapshots.py``).
- ``supervised(supervisor, ...)`` around ``Supervisor.run``: one scrape target for all its children, counting
  those that were restarted; ready while every child is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from fabric.endpoints import ANY_HOST, PORT_ENV, Endpoints
from fabric.errors import ConfigError
from fabric.metrics import Collector, HandlerTallies, Metrics
from fabric.sampler import SAMPLE_INTERVAL_MS, Sampler
from fabric.snapshots import DIR_ENV, STALE_S, SnapshotDirectory, write_snapshots
from fabric.supervisor import Supervisor
from fabric.worker import Worker

__all__ = ["DIR_ENV", "exposed", "supervised"]

log = logging.getLogger("fabric.telemetry")


@contextlib.asynccontextmanager
async def exposed(worker: Worker, tallies: HandlerTallies | None, *, port: int | None = None, host: str = ANY_HOST,
                  directory: Path | None = None, sample_interval_ms: int = SAMPLE_INTERVAL_MS,
                  registry: CollectorRegistry | None = None) -> AsyncIterator[Endpoints | None]:
    """Expose ``worker`` (and ``tallies``, its ``measured`` middleware's) while the block runs: on ``port``, or
    as snapshots in ``directory``; yields the endpoints when serving (their ``port`` is the one bound)."""
    metrics = Metrics(worker.keys)
    metrics.watch_worker(worker, tallies)
    sampler = Sampler(worker.client, worker.keys, worker.group, worker.consumer, lambda: worker.streams,
                      interval_ms=sample_interval_ms)
    metrics.watch_gauges(sampler)
    endpoints = None
    if directory is None and port is not None:  # bind first: a taken port stops the worker before it starts
        registry = registry or CollectorRegistry()
        registry.register(Collector(metrics))
        endpoints = await _serving(Endpoints(registry, lambda: worker.readiness, host=host, port=port))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sampler.run(stop))]
    if directory is not None:
        tasks.append(asyncio.create_task(write_snapshots(metrics, directory, stop)))
    try:
        yield endpoints
    finally:
        stop.set()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                log.error("metrics stopped early: %s: %s", type(result).__name__, result, exc_info=result)
        if endpoints is not None:
            await endpoints.close()


async def _serving(endpoints: Endpoints) -> Endpoints:
    try:
        await endpoints.start()
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {endpoints.host}:{endpoints.port} ({exc.strerror or exc}): "
                          "pick another --metrics-port (0 picks a free one)") from exc
    return endpoints


def _readiness(supervisor: Supervisor, snapshots: SnapshotDirectory) -> str | None:
    if supervisor.stopping:
        return "draining"
    running = supervisor.running()
    if len(running) < len(supervisor.slots):
        return f"{len(supervisor.slots) - len(running)} of {len(supervisor.slots)} workers not running"
    live = snapshots.live()
    now = time.time()
    for label, pid in sorted(running.items()):
        snap = live.get(pid)
        if snap is None or now - snap.written_s > STALE_S:
            return f"worker {label} (pid {pid}) has not reported"
        if not any(s.name == "fabric_workers_ready" and s.value for s in snap.series):
            return f"worker {label} (pid {pid}) is not ready"
    return None


@contextlib.asynccontextmanager
async def supervised(supervisor: Supervisor, *, port: int, host: str = ANY_HOST,
                     registry: CollectorRegistry | None = None) -> AsyncIterator[tuple[Endpoints, Path]]:
    """Serve the children's merged metrics while the block runs; yields the endpoints and the snapshot directory.
    Children started meanwhile write there (``$FABRIC_METRICS_DIR`` is set for them, and ``$FABRIC_METRICS_PORT``
    removed: they must not each try the port); those that exit are folded in as they go."""
    directory = Path(tempfile.mkdtemp(prefix="fabric-metrics-"))
    snapshots = SnapshotDirectory(directory)
    previous = supervisor.on_exit
    supervisor.on_exit = snapshots.retire
    registry = registry or CollectorRegistry()
    registry.register(Collector(others=snapshots))
    endpoints = None
    try:
        endpoints = await _serving(Endpoints(registry, lambda: _readiness(supervisor, snapshots), host=host,
                                             port=port))
        saved = {k: os.environ.pop(k, None) for k in (DIR_ENV, PORT_ENV)}
        os.environ[DIR_ENV] = str(directory)
        try:
            yield endpoints, directory
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
    finally:
        supervisor.on_exit = previous
        if endpoints is not None:
            await endpoints.close()
        shutil.rmtree(directory, ignore_errors=True)
