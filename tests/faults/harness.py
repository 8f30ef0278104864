"""The fault suite's world: a redis-server of its own (AOF on), producers in the test, workers as processes.

``World.open(tmp_path, appendfsync=...)`` starts a redis-server on a free loopback port with AOF on and the given
``appendfsync`` (automatic rewrites off, ``aof-load-truncated yes``, so a cut AOF tail still loads), gives the run
its own namespace and journal directory, and on exit kills every process it started. Inside:

- ``w.spawn(consumer, handler=..., ...)``  a ``fabric worker`` process running ``tests.faults.handlers``;
- ``w.publish(n, ...)``                    a producer (in this process) journaling each publish's outcome;
- ``w.redis.kill()/stop()/start()/cut_aof_tail()``  faults done to the server, which keeps its port and files;
- ``w.settle()``                           wait (with a deadline) until the backlog is drained and, unless told
                                           otherwise, every acknowledged event is accounted for;
- ``w.score(fault_end=...)``               the checker's ``Score`` of the run.

Each case is an ``async def case_...(w, events) -> Score`` registered with ``@case(...)``: the tests run it small
and assert its promise, ``python -m bench.faults`` runs it big and tabulates the scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from redis.asyncio import Redis

from fabric.client import connect
from fabric.config import PublisherConfig
from fabric.errors import EventTooLarge, FabricError, PublishError, RedisOutOfMemory
from fabric.events import Tick
from fabric.keys import Keys, Priority
from fabric.publisher import Publisher
from tests.faults.checker import Journal, Outcome, Score, read_dead_letters, read_journals, score

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "tick"
GROUP = "g"
RECLAIM_IDLE_MS = 1000
EXIT_DEADLINE_S = 30.0
"""A deadline for a process to exit, far above its grace: not a timing threshold under test."""
SETTLE_DEADLINE_S = 60.0
FAULTS = ("Traceback", "Task was destroyed", "never awaited", "Exception ignored")


def entry_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable pair."""
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisNode:
    """A redis-server with AOF in a directory of its own; stopped, killed and started again on the same port."""

    def __init__(self, workdir: Path, *, appendfsync: str = "everysec", args: tuple[str, ...] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                     "--appendonly", "yes", "--appendfsync", appendfsync, "--aof-load-truncated", "yes",
                     "--auto-aof-rewrite-percentage", "0", "--aof-use-rdb-preamble", "yes", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] = (workdir / "redis.log").open("ab")

    def start(self, deadline_s: float = 20.0) -> None:
        """Start (again) and wait until it answers PING (an AOF being loaded answers LOADING until done)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(["redis-server", *self.args], stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not come up:\n{self.log_tail()}")

    def stop(self) -> None:
        """Graceful: SIGTERM makes Redis fsync its AOF and exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed beyond what ``appendfsync`` already did."""
        self._end(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(sig)
        try:
            self.proc.wait(EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def aof_tail(self) -> Path:
        """The AOF file appended to last (Redis 7: the newest ``*.incr.aof`` of ``appendonlydir``)."""
        incr = sorted((self.workdir / "appendonlydir").glob("*.incr.aof"), key=lambda p: int(p.name.split(".")[-3]))
        assert incr, f"no incremental AOF file in {self.workdir}"
        return incr[-1]

    def cut_aof_tail(self, nbytes: int) -> int:
        """Simulated power loss (call while stopped): drop the last ``nbytes`` of the AOF; return how many went."""
        assert self.proc is None or self.proc.poll() is not None, "stop or kill the server first"
        path = self.aof_tail()
        size = path.stat().st_size
        keep = max(0, size - nbytes)
        os.truncate(path, keep)
        return size - keep

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join((self.workdir / "redis.log").read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        self.kill()
        self._log.close()


class WorkerProc:
    """One ``fabric worker`` process of the run; output to a file (a pipe could fill and block it)."""

    def __init__(self, argv: list[str], env: dict[str, str], consumer: str, log: Path) -> None:
        self.consumer = consumer
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._out)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout_s: float = EXIT_DEADLINE_S) -> int:
        """Wait for the process to end; fail with its output if it is still running at the deadline."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.consumer} still running after {timeout_s}s:\n{self.output()}") from None

    async def stopped_cleanly(self) -> None:
        """SIGTERM, then exit 0 with nothing alarming in its output."""
        self.send(signal.SIGTERM)
        code = await self.exit_code()
        assert code == 0, f"worker {self.consumer} exited {code}:\n{self.output()}"
        self.assert_clean()

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def assert_clean(self) -> None:
        out = self.output()
        for fault in FAULTS:
            assert fault not in out, f"{fault!r} in the output of worker {self.consumer}:\n{out}"

    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP took effect: its state in ``/proc`` is ``T``)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "T"

    def stat(self, name: str) -> int:
        """One figure of the stats the worker logs when it stops (``stopped: WorkerStats(..., refused=N, ...)``)."""
        found = re.findall(rf"stopped: WorkerStats\(.*\b{name}=(\d+)", self.output())
        assert found, f"no stopped line with {name}= in the output of worker {self.consumer}:\n{self.output()}"
        return int(found[-1])

    async def joined(self) -> None:
        await until(lambda: _true("joined group" in self.output()), what=f"worker {self.consumer} to join")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self._out.close()


async def _true(value: bool) -> bool:
    return value


async def until(check: Callable[[], Awaitable[Any]], *, timeout_s: float = SETTLE_DEADLINE_S, what: str,
                every_s: float = 0.05) -> Any:
    """Poll ``check`` until truthy; fail naming ``what`` at the deadline. Redis errors count as not yet (the
    server may be restarting)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = await check()
        except (OSError, FabricError, ConnectionError) as exc:
            last = exc
        except Exception as exc:  # redis-py's errors while the server restarts
            if type(exc).__module__.startswith("redis"):
                last = exc
            else:
                raise
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(every_s)


def rate(events: int) -> float:
    """A producer's pace: a flow over a couple of seconds at least, so that faults land mid-flow."""
    return max(150.0, events / 10)


async def joined(*workers: WorkerProc) -> tuple[WorkerProc, ...]:
    """Wait for worker processes to join the group (on streams ``World.create_streams`` made before they started)."""
    await asyncio.gather(*(p.joined() for p in workers))
    return workers


def classify(exc: FabricError) -> Outcome:
    """A failed publish's outcome: ``refused`` when Redis (or the producer) certainly wrote nothing."""
    if isinstance(exc, (RedisOutOfMemory, EventTooLarge)):
        return "refused"
    if isinstance(exc, PublishError) and "refused" in str(exc):
        return "refused"
    return "indeterminate"


@dataclass
class Published:
    """What one producer run did."""

    acked: int = 0
    failed: int = 0
    errors: list[str] | None = None
    detected_lost: int = 0
    """Events the publisher reported Redis lost after confirming them."""


class World:
    """One case's redis-server, namespace, journals and worker processes."""

    def __init__(self, tmp: Path, *, appendfsync: str = "everysec", redis_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.keys = Keys(f"f{uuid.uuid4().hex[:10]}")
        self.journal_dir = tmp / "journal"
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisNode(tmp / "redis", appendfsync=appendfsync, args=redis_args)
        self.workers: list[WorkerProc] = []
        self.client: Redis = connect(self.redis.url)
        self.notes: dict[str, Any] = {}
        """What a case saw beside its score (faults it made...), for its short form to assert."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, tmp: Path, **kwargs: Any) -> AsyncIterator[World]:
        """Start the server; on exit kill every process of the run and close the client."""
        w = cls(tmp, **kwargs)
        try:
            w.redis.start()
            yield w
        finally:
            for p in w.workers:
                p.close()
            await w.client.aclose()
            w.redis.close()

    # ---- processes -------------------------------------------------------------------------------------

    def spawn(self, consumer: str, *, handler: str = "record", sleep_ms: int = 0, concurrency: int = 8,
              grace_s: float = 10.0, reclaim_idle_ms: int = RECLAIM_IDLE_MS, handler_timeout_s: float | None = None,
              max_deliveries: int | None = None, env: dict[str, str] | None = None,
              redis_url: str | None = None) -> WorkerProc:
        """Start a ``fabric worker`` process on the run's topic and group (on ``redis_url``, a proxy's, if given)."""
        argv = [sys.executable, "-m", "fabric", "worker", f"tests.faults.handlers:{handler}", "--topic", TOPIC,
                "--group", GROUP, "--consumer", consumer, "--namespace", self.keys.ns, "--redis-url",
                redis_url or self.redis.url,
                "--reclaim-idle-ms", str(reclaim_idle_ms), "--block-ms", "100", "--concurrency", str(concurrency),
                "--grace-s", str(grace_s)]
        if handler_timeout_s is not None:
            argv += ["--handler-timeout-s", str(handler_timeout_s)]
        if max_deliveries is not None:
            argv += ["--max-deliveries", str(max_deliveries)]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("FABRIC_", "FAULTS_"))}
        base.update(PYTHONPATH=str(ROOT), FAULTS_JOURNAL_DIR=str(self.journal_dir), FAULTS_SLEEP_MS=str(sleep_ms))
        base.update(env or {})  # may override the above (a PYTHONPATH with a directory of its own first)
        p = WorkerProc(argv, base, consumer, self.tmp / f"worker-{consumer}.log")
        self.workers.append(p)
        return p

    # ---- producing -------------------------------------------------------------------------------------

    def stream(self, symbol: str) -> str:
        return self.keys.stream(TOPIC, Priority.NORMAL, symbol)

    async def create_streams(self, symbols: int = 4) -> None:
        """The streams ``publish`` writes, registered with the group on them, as an earlier run leaves them: a
        worker started now joins them at once (and says so) instead of waiting for the first publish."""
        for i in range(symbols):
            stream = self.stream(f"S{i}")
            await self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            await self.client.sadd(self.keys.topic_registry(TOPIC), stream)

    async def publish(self, n: int, *, symbols: int = 4, batch: int = 20, rate: float = 0.0,
                      config: PublisherConfig | None = None, first_seq: int = 1, client: Redis | None = None,
                      on_error_pause_s: float = 0.05) -> Published:
        """Publish ``n`` ticks over ``symbols`` symbols, ``batch`` per call (at most ``rate`` events a second, if
        given), journaling each call's outcome; a failed call is journaled and the producer goes on with the next
        (no resend: it would be another event)."""
        journal = Journal(self.journal_dir / f"publish.{uuid.uuid4().hex[:8]}.log")
        done = Published(errors=[])
        try:
            async with Publisher(client or self.client, config or PublisherConfig(), self.keys) as pub:
                for i in range(0, n, batch):
                    events = [Tick(symbol=f"S{j % symbols}", bid=1.0, ask=2.0, seq=first_seq + j)
                              for j in range(i, min(n, i + batch))]
                    outcome: Outcome = "ack"
                    try:
                        await pub.publish_many(events)
                    except FabricError as exc:
                        outcome = classify(exc)
                        assert done.errors is not None
                        done.errors.append(f"{type(exc).__name__}: {exc}")
                    by_stream: dict[str, list[str]] = {}
                    for e in events:
                        by_stream.setdefault(self.stream(e.symbol), []).append(e.event_id)
                    for stream, ids in by_stream.items():
                        journal.published(outcome, ids, stream)
                    if outcome == "ack":
                        done.acked += len(events)
                    else:
                        done.failed += len(events)
                        await asyncio.sleep(on_error_pause_s)
                    if rate:
                        await asyncio.sleep(len(events) / rate)
                done.detected_lost = sum(getattr(pub, "lost", {}).values())
        finally:
            journal.close()
        return done

    # ---- reading the outcome ---------------------------------------------------------------------------

    async def streams(self) -> list[str]:
        return sorted(s.decode() for s in await self.client.smembers(self.keys.topic_registry(TOPIC)))

    async def drained(self) -> bool:
        """Every stream of the topic fully read by the group, and nothing pending."""
        return await self.all_read(pending_too=True)

    async def all_read(self, *, pending_too: bool = False) -> bool:
        """Every stream of the topic read to its end by the group (and, ``pending_too``, nothing pending)."""
        streams = await self.streams()
        if not streams:
            return False
        for s in streams:
            info: Any = await self.client.xinfo_stream(s)
            groups: Any = await self.client.xinfo_groups(s)
            mine = [g for g in groups if g["name"] == GROUP.encode()]
            if not mine or (pending_too and int(mine[0]["pending"])):
                return False
            if info["length"] and entry_id(mine[0]["last-delivered-id"]) < entry_id(info["last-generated-id"]):
                return False
        return True

    async def pending(self, consumer: str | None = None) -> int:
        """Entries delivered to the group (to ``consumer`` only, if given) and not acknowledged."""
        total = 0
        for s in await self.streams():
            with contextlib.suppress(Exception):  # no group on it yet
                total += len(await self.client.xpending_range(s, GROUP, "-", "+", 100_000, consumername=consumer))
        return total

    async def pending_ids(self, consumer: str) -> set[tuple[str, bytes]]:
        """The entries (stream, entry id) delivered to ``consumer`` and not acknowledged."""
        held: set[tuple[str, bytes]] = set()
        for s in await self.streams():
            with contextlib.suppress(Exception):  # no group on it yet
                entries: Any = await self.client.xpending_range(s, GROUP, "-", "+", 100_000, consumername=consumer)
                held.update((s, p["message_id"]) for p in entries)
        return held

    async def unacked(self, entries: set[tuple[str, bytes]]) -> set[tuple[str, bytes]]:
        """Which of ``entries`` are still pending in the group (to any consumer)."""
        left = set()
        for stream, entry_id in entries:
            if await self.client.xpending_range(stream, GROUP, entry_id, entry_id, 1):
                left.add((stream, entry_id))
        return left

    def handled_by(self, pid: int) -> int:
        """Handler calls a process completed."""
        path = self.journal_dir / f"handled.{pid}.log"
        return len(path.read_bytes().splitlines()) if path.exists() else 0

    async def score(self, *, fault_end: float | None = None, reported_lost: int = 0) -> Score:
        publishes, handlings = read_journals(self.journal_dir)
        letters = await read_dead_letters(self.client, self.keys)
        return score(publishes, handlings, letters, fault_end=fault_end, reported_lost=reported_lost)

    async def settle(self, *, accounted: bool = True, timeout_s: float = SETTLE_DEADLINE_S) -> None:
        """Wait until the backlog is drained and (``accounted``) no acknowledged event is unaccounted for."""
        async def done() -> bool:
            if not await self.drained():
                return False
            return not accounted or (await self.score()).lost == 0

        await until(done, timeout_s=timeout_s, what="the backlog drained and every acknowledged event accounted for",
                    every_s=0.1)

    async def stop_workers(self) -> None:
        """SIGTERM every live worker; each must exit 0 with a clean output."""
        live = [p for p in self.workers if p.proc.poll() is None]
        await asyncio.gather(*(p.stopped_cleanly() for p in live))

    async def counter(self, prefix: str) -> int:
        """The sum of ``ns:counters`` fields starting with ``prefix`` (``trimmed_pending:``...)."""
        raw: Any = await self.client.hgetall(self.keys.counters())
        return sum(int(v) for k, v in raw.items() if k.decode().startswith(prefix))


# ---- the cases' registry ---------------------------------------------------------------------------------

Promise = Literal["no loss", "no loss, no duplicates", "loss reported"]
CaseFn = Callable[[World, int], Awaitable[Score]]


@dataclass(frozen=True)
class Case:
    """One fault case: what it does, what it promises, how to set up its server."""

    name: str
    promise: Promise
    run: CaseFn
    world: dict[str, Any]


CASES: dict[str, Case] = {}


def case(name: str, promise: Promise, **world: Any) -> Callable[[CaseFn], CaseFn]:
    """Register ``async def case_x(w, events) -> Score`` under ``name``; ``world`` goes to ``World.open``."""
    def register(fn: CaseFn) -> CaseFn:
        CASES[name] = Case(name, promise, fn, world)
        return fn

    return register


def kept(promise: Promise, s: Score) -> bool:
    """Whether a score keeps its case's promise."""
    if s.unexpected:
        return False
    if promise == "loss reported":
        return s.lost <= s.reported_lost
    return s.lost == 0 and (promise == "no loss" or s.duplicated == 0)


async def run_case(c: Case, tmp: Path, events: int) -> Score:
    """Run one registered case in a fresh world."""
    async with World.open(tmp, **c.world) as w:
        return await c.run(w, events)
