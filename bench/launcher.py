"""Starting ``python -m bench.procs ROLE`` subprocesses and reading what they report.

A child talks in JSON lines on stdout: ``{"ready": ...}`` once it may be measured against, other progress lines,
and ``{"result": {...}}`` last. Its stderr goes to a file, quoted when it fails. The Redis URL travels in the
environment (``FABRIC_REDIS_URL``), never on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = ["ROOT", "Child", "ChildFailed", "ChildLate", "emit", "stop_event"]

ROOT = Path(__file__).resolve().parent.parent
LINE_LIMIT = 1 << 24
STOP_S = 60.0
"""How long a process may take to stop gracefully after SIGTERM."""


def emit(**line: Any) -> None:
    """Child side: one protocol line on stdout."""
    print(json.dumps(line), flush=True)


def stop_event() -> asyncio.Event:
    """Child side: an event set by SIGTERM or SIGINT (a graceful end, with a report)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class ChildFailed(RuntimeError):
    """A benchmark process exited early, reported an error, or missed its deadline."""


class ChildLate(ChildFailed):
    """A benchmark process did not report in time."""


class Child:
    """One benchmark process."""

    def __init__(self, role: str, proc: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.role = role
        self.proc = proc
        self._log = log
        self.lines: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, role: str, url: str, *args: object) -> Child:
        """Start ``python -m bench.procs ROLE ARGS...`` against the Redis at ``url``."""
        env = {**os.environ, "FABRIC_REDIS_URL": url, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        log = tempfile.TemporaryFile(prefix=f"bench-{role}-")  # noqa: SIM115 (closed by close())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.procs", role, *map(str, args), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log, limit=LINE_LIMIT,
        )
        return cls(role, proc, log)

    async def expect(self, key: str, timeout_s: float) -> Any:
        """Read lines until one carries ``key``; return its value."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while raw := await self.proc.stdout.readline():
                    line = json.loads(raw)
                    self.lines.append(line)
                    if "error" in line:
                        raise ChildFailed(f"{self.role} failed: {line['error']}\n{self.stderr()}")
                    if key in line:
                        return line[key]
        except TimeoutError:
            raise ChildLate(f"{self.role} reported no {key!r} within {timeout_s:.0f}s\n{self.stderr()}") from None
        await self.proc.wait()
        raise ChildFailed(f"{self.role} exited ({self.proc.returncode}) before {key!r}\n{self.stderr()}")

    async def result(self, timeout_s: float) -> dict[str, Any]:
        """The final report; then wait for the exit (0 expected)."""
        result: dict[str, Any] = await self.expect("result", timeout_s)
        if await asyncio.wait_for(self.proc.wait(), timeout_s) != 0:
            raise ChildFailed(f"{self.role} exited with {self.proc.returncode}\n{self.stderr()}")
        return result

    async def finish(self, timeout_s: float, stop_s: float = STOP_S) -> dict[str, Any]:
        """The final report within ``timeout_s``; past that, SIGTERM and the report of a graceful stop."""
        try:
            return await self.result(timeout_s)
        except ChildLate:
            self.signal()
            return await self.result(stop_s)

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send a signal (SIGTERM: finish gracefully and report)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def close(self) -> None:
        """Make sure the process is gone: SIGKILL if it still runs."""
        if self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await self.proc.wait()
        self._log.close()

    def stderr(self, tail: int = 4000) -> str:
        """The end of what the process wrote on stderr."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-tail:]
