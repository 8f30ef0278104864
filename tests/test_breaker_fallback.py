"""A config file's ``fallback``: loaded by ``fabric worker`` before anything starts, and answering while the worker's
breaker is open (a real worker process on the session's redis-server)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import fabric.cli
from fabric.breaker import CLOSED, OPEN
from fabric.keys import Keys
from tests.fixtures.handlers import calls_key, fallback_key, handled_key, parse_record, subprocess_env
from tests.test_breaker_processes import Flow, breaker, breaker_store, stop, write_config
from tests.test_processes import pending, publish_ticks
from tests.test_supervisor import SupervisorProcess, assert_one_error_line
from tests.waiting import eventually


@pytest.fixture
def worker_process(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Any]:
    """Start ``fabric worker --config FILE`` (one process) in the test's namespace; killed at teardown."""
    started: list[SupervisorProcess] = []

    def start(config: Path) -> SupervisorProcess:
        sup = SupervisorProcess(["--config", str(config), "--namespace", keys.ns, "--redis-url", redis_url],
                                subprocess_env(redis_url, keys.ns), tmp_path / f"worker-{len(started)}.log")
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.close()


async def answered(redis: Any, keys: Keys, key: str, published: set[str]) -> bool:
    """Every published event is recorded in ``key`` and nothing is pending."""
    return {parse_record(r)[0] for r in await redis.lrange(key, 0, -1)} >= published and not await pending(redis, keys)


@pytest.mark.real_only
async def test_the_fallback_answers_and_acks_while_the_breaker_is_open(redis, keys, worker_process, tmp_path) -> None:
    # Given a config-file worker with a fallback, its breaker forced open
    config = write_config(tmp_path, processes=1, recovery_ms=1000, fallback="fallback_record")
    await breaker_store(redis, keys, config).force("open", "maintenance")
    worker = worker_process(config)

    # When events arrive
    published = await publish_ticks(redis, keys, 50)

    # Then the fallback handles every one of them and they are acked; the handler is never called
    await eventually(lambda: answered(redis, keys, fallback_key(keys.ns), published), timeout_s=30,
                     what="every event answered by the fallback and acked")
    assert not await redis.llen(calls_key(keys.ns))
    assert not await redis.llen(handled_key(keys.ns))
    await stop(worker)


@pytest.mark.real_only
async def test_once_the_breaker_closes_the_handler_answers_again(redis, keys, worker_process, tmp_path) -> None:
    # Given a config-file worker with a fallback, its breaker forced open, then closed by hand once it runs
    config = write_config(tmp_path, processes=1, recovery_ms=1000, fallback="fallback_record")
    store = breaker_store(redis, keys, config)
    await store.force("open", "maintenance")
    worker = worker_process(config)
    first = await publish_ticks(redis, keys, 10)
    await eventually(lambda: answered(redis, keys, fallback_key(keys.ns), first), timeout_s=30,
                     what="the fallback answering while open")
    await store.force("closed", "maintenance over")
    # (a process's view follows within the breaker's poll, at once when the announcement reaches it: an event
    # arriving before that is the fallback's, as it should be)
    await eventually(lambda: _logged(worker, "breaker x: CLOSED"), timeout_s=30, what="the worker seeing it closed")

    # When more events arrive
    later = await publish_ticks(redis, keys, 10)

    # Then the handler handles them, not the fallback
    await eventually(lambda: answered(redis, keys, handled_key(keys.ns), later), timeout_s=30,
                     what="the handler answering once closed")
    by_fallback = {parse_record(r)[0] for r in await redis.lrange(fallback_key(keys.ns), 0, -1)}
    assert not by_fallback & later
    await stop(worker)


@pytest.mark.real_only
async def test_a_worker_with_a_fallback_recovers_after_the_recovery_time(redis, keys, worker_process, tmp_path) -> None:
    # Given a config-file worker with a fallback, its breaker tripped (not forced: 5 s to recover, ample for the
    # worker to start and answer from its fallback first, even on a loaded machine), on a steady flow of events
    config = write_config(tmp_path, processes=1, recovery_ms=5000, fallback="fallback_record")
    assert (await breaker_store(redis, keys, config).record(3, 3, 3, 0, 0)).state == OPEN
    worker = worker_process(config)
    async with Flow(redis, keys):
        await eventually(lambda: _at_least(redis.llen(fallback_key(keys.ns)), 1), what="the fallback answering")

        # When the recovery time has passed (the downstream is healthy)
        # Then a trial is admitted and succeeds, the breaker closes, and the handler answers again
        async def closed_and_handling() -> bool:
            return (await breaker(redis, keys))[0] == CLOSED and await redis.llen(handled_key(keys.ns)) > 0

        await eventually(closed_and_handling, timeout_s=30, what="the breaker closed and the handler answering")
    await stop(worker)


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """A CliRunner; the root logger's handlers are put back afterwards (``fabric worker`` configures logging)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        yield CliRunner()
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def test_a_fallback_that_cannot_be_imported_exits_2_naming_it(cli, redis_url, keys, tmp_path) -> None:
    # Given a config file whose worker's fallback module does not exist
    config = write_config(tmp_path, processes=2, recovery_ms=1000)
    config.write_text(config.read_text() + 'fallback = "no.such.module:fn"\n')

    # When its workers are started
    result = cli.invoke(fabric.cli.app, ["worker", "--config", str(config), "--namespace", keys.ns,
                                         "--redis-url", redis_url])

    # Then it exits 2 with one line naming the table's fallback field and the module, and starts nothing
    assert result.exit_code == 2, result.output
    assert_one_error_line(result.stderr, f"{config}: workers.w.fallback:", "no.such.module")


async def _logged(worker: Any, text: str) -> bool:
    return text in worker.output()
