"""Several worker processes run as one: a supervisor starts each with a consumer name of its own, restarts one
that dies (with backoff, saying so in one line), forwards SIGTERM/SIGINT so that all drain, and returns once
every one has exited.

A restarted process gets a fresh consumer name (``host-pid-worker-slot-generation``): what the dead one held is
taken over by the group's reclaim (after ``reclaim_idle_ms``), never by a successor that happens to share its
name. Children run in a session of their own, so a Ctrl-C on the terminal reaches the supervisor alone, which
forwards it once. Their stderr is relayed line by line, each line prefixed with the child's label
(``indicators[1]: ...``), so interleaved logs still say who wrote them.

A child that exits 2 (fabric's exit code for bad usage, config or handler) would fail the same way every time:
the supervisor stops the others and raises ``ConfigError`` with the child's error instead of restarting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fabric.errors import ConfigError

__all__ = ["LABEL_ENV", "SUPERVISOR_ENV", "Program", "Supervisor", "consumer_name", "signal_on_parent_death"]

log = logging.getLogger("fabric.supervisor")

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_S = 10.0
"""A child that ran this long before it died is restarted after ``BACKOFF_BASE_S`` again."""
USAGE_EXIT = 2
AUTH_EXIT = 4
FATAL_EXITS = frozenset({USAGE_EXIT, AUTH_EXIT})
"""Exit codes a restart cannot cure (bad usage, config or handler; refused credentials): the supervisor stops."""
LABEL_ENV = "FABRIC_WORKER_LABEL"
"""Tells a child its label (``indicators[1]``): JSON log lines carry it, where text lines get it as a prefix."""
SUPERVISOR_ENV = "FABRIC_SUPERVISOR_PID"
"""Tells a child its supervisor's pid, so that it drains if the supervisor dies (``runner.drain_when_orphaned``)."""
MAX_CONSUMER_NAME = 100
STDERR_LINE_LIMIT = 1 << 20


PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, even by SIGKILL (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


@dataclass(frozen=True)
class Program:
    """``processes`` children of worker ``name``; ``argv(consumer)`` is the command line of one of them."""

    name: str
    processes: int
    argv: Callable[[str], list[str]]


@dataclass
class _Slot:
    """One of a program's processes, across its restarts."""

    program: Program
    index: int
    generation: int = 0
    delay_s: float = 0.0
    proc: asyncio.subprocess.Process | None = None
    consumer: str = ""
    error: str = ""
    """The last ``error:`` line the current process wrote."""
    final: int | None = field(default=None)
    """Exit code of the process that was running when the supervisor was told to stop."""

    @property
    def label(self) -> str:
        return f"{self.program.name}[{self.index}]"


def consumer_name(program: str, slot: int, generation: int) -> str:
    """``host-pid-program-slot-generation``: distinct across hosts, supervisors, slots and restarts."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    tail = f"-{os.getpid()}-{program}-{slot}-{generation}"
    return host[: MAX_CONSUMER_NAME - len(tail)] + tail


def describe(returncode: int) -> str:
    """``exited 3`` or ``killed by SIGKILL``."""
    if returncode >= 0:
        return f"exited {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class Supervisor:
    """Runs the programs' processes until SIGTERM/SIGINT, restarting those that die; see the module docstring."""

    def __init__(self, programs: Sequence[Program], *, backoff_base_s: float = BACKOFF_BASE_S,
                 backoff_max_s: float = BACKOFF_MAX_S, healthy_s: float = HEALTHY_S,
                 on_exit: Callable[[int], None] | None = None, label_lines: bool = True) -> None:
        """``on_exit(pid)`` is called as each child process exits (the metrics fold in its final counts);
        ``label_lines=False`` relays the children's lines as they are (JSON logs, which carry the label)."""
        self.slots = [_Slot(p, i) for p in programs for i in range(p.processes)]
        self.on_exit = on_exit
        self.label_lines = label_lines
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.healthy_s = healthy_s
        self.signals: list[signal.Signals] = []
        self.fatal = ""
        self._stopping = asyncio.Event()

    async def run(self) -> bool:
        """Supervise until told to stop and every child has exited; True if all drained (exited 0) after a single
        signal. Raises ``ConfigError`` if a child could not start (exit 2)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.forward, sig)
        tasks = [asyncio.create_task(self._keep(slot), name=f"supervise-{slot.label}") for slot in self.slots]
        try:
            await asyncio.gather(*tasks)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._kill_all()
        if self.fatal:
            raise ConfigError(self.fatal)
        return self._report()

    def forward(self, sig: signal.Signals) -> None:
        """Forward ``sig`` to every child; the first one also ends restarts (a second makes children stop at
        once: the caller should then exit non-zero)."""
        self.signals.append(sig)
        if len(self.signals) == 1:
            log.info("%s: draining %d workers (send again to stop at once)", sig.name, len(self._running()))
        else:
            log.warning("%s again: workers stop at once; unfinished entries stay pending for the group", sig.name)
        self._stopping.set()
        for slot in self._running():
            self._send(slot, sig)

    @property
    def stopping(self) -> bool:
        """Told to stop: the children are draining."""
        return self._stopping.is_set()

    def running(self) -> dict[str, int]:
        """The pid of each slot's running process, by label (slots between restarts are missing)."""
        return {s.label: s.proc.pid for s in self._running() if s.proc is not None}

    def _running(self) -> list[_Slot]:
        return [s for s in self.slots if s.proc is not None and s.proc.returncode is None]

    def _send(self, slot: _Slot, sig: signal.Signals) -> None:
        if slot.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # it has just exited
                slot.proc.send_signal(sig)

    async def _keep(self, slot: _Slot) -> None:
        """Keep one slot's process running until the supervisor stops."""
        while not self._stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(slot)
            if self._stopping.is_set():
                slot.final = code
                return
            if code in FATAL_EXITS:
                self._fail(slot, code)
                return
            healthy = time.monotonic() - started >= self.healthy_s
            slot.delay_s = self.backoff_base_s if healthy or not slot.delay_s else min(
                slot.delay_s * 2, self.backoff_max_s)
            log.warning("worker %s (pid %d, consumer %s) died: %s; restarting in %gs", slot.label,
                        slot.proc.pid if slot.proc else 0, slot.consumer, describe(code), slot.delay_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), slot.delay_s)

    async def _run_once(self, slot: _Slot) -> int:
        """Start the slot's next generation, relay its stderr, and return its exit code."""
        slot.consumer = consumer_name(slot.program.name, slot.index, slot.generation)
        slot.generation += 1
        slot.error = ""
        proc = await asyncio.create_subprocess_exec(
            *slot.program.argv(slot.consumer), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, limit=STDERR_LINE_LIMIT,
            env={**os.environ, SUPERVISOR_ENV: str(os.getpid()), LABEL_ENV: slot.label},
        )
        slot.proc = proc
        log.info("started worker %s (pid %d, consumer %s)", slot.label, proc.pid, slot.consumer)
        if self.signals:  # told to stop while it was being started
            self._send(slot, self.signals[-1])
        await self._relay(slot, proc)
        code = await proc.wait()
        if self.on_exit is not None:
            self.on_exit(proc.pid)
        return code

    async def _relay(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        """Copy the child's stderr to ours, each line prefixed with its label, until it closes."""
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line over STDERR_LINE_LIMIT: its bytes are dropped, the stream goes on
                raw = b"(a line too long to relay)\n"
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("error: "):
                slot.error = line.removeprefix("error: ")
            with contextlib.suppress(OSError):  # nobody reads our stderr any more: the workers go on regardless
                sys.stderr.write(f"{slot.label}: {line}\n" if self.label_lines else f"{line}\n")
                sys.stderr.flush()

    def _fail(self, slot: _Slot, code: int) -> None:
        """A child could not start: stop the others, and report it once all have exited."""
        reason = slot.error or "bad usage, config or handler (its output is above)"
        self.fatal = f"worker {slot.label} could not start (exit {code}, not restarted): {reason}"
        if not self._stopping.is_set():
            self.forward(signal.SIGTERM)

    def _report(self) -> bool:
        """Log how each child ended; True if every one drained."""
        clean = len(self.signals) < 2
        for slot in self.slots:
            # a child stopped by the forwarded signal itself died before it installed its handlers: it held nothing
            if slot.final in (None, 0) or (slot.final is not None and -slot.final in self.signals):
                continue
            clean = False
            log.warning("worker %s (consumer %s) %s while draining", slot.label, slot.consumer,
                        describe(slot.final))
        log.info("all workers stopped%s", "" if clean else " (not all drained)")
        return clean

    async def _kill_all(self) -> None:
        """On the way out after an error: no child outlives the supervisor."""
        for slot in self._running():
            self._send(slot, signal.SIGKILL)
            if slot.proc is not None:
                await slot.proc.wait()
