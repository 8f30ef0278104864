"""The ``fleet`` role: fabric's workers as an operator runs them, ``fabric worker --config FILE`` with
``processes = N`` under one supervisor, handling with a no-op handler (``noop`` below).

The role starts the supervisor, reports ``ready`` once every worker process has joined the group on the warm-up
streams and the warm-up is acknowledged, then watches Redis (XINFO GROUPS lag and XPENDING, every ``POLL_S``)
until ``expect`` more entries are delivered and acknowledged, and SIGTERMs the supervisor, which must drain and
exit 0. Completion is Redis's own word: every entry read by the group and none pending (a handler acks only
after success), so nothing is lost unseen; what it cannot check is a duplicate delivery, which a no-op handler
never causes here (no process dies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.launcher import emit
from bench.streams import pending, registered, stored, undelivered
from bench.workload import TOPIC
from fabric import Keys, connect
from fabric.events import Event

__all__ = ["fleet", "noop"]

POLL_S = 0.01
"""How often Redis is asked whether the run is done: the resolution of the end time (about 1% of a run)."""
JOINED = re.compile(r"^(?P<label>\S+): .*joined group \S+ on (?P<n>\d+) new streams")
STOP_S = 60.0


async def noop(event: Event) -> None:
    """The handler: nothing, so the figures measure the fabric."""


def _config(path: Path, group: str, processes: int, fields: dict[str, Any]) -> None:
    """A config file with one ``[workers.bench]`` table (values written as JSON, which TOML reads the same)."""
    table = {"handler": "bench.fleet:noop", "processes": processes, "group": group, "topics": [TOPIC], **fields}
    path.write_text("[workers.bench]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))


async def _relay(stream: asyncio.StreamReader, joined: dict[str, int]) -> None:
    """Copy the supervisor's stderr to ours, counting the streams each worker process joined."""
    while raw := await stream.readline():
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        if m := JOINED.match(line):
            joined[m["label"]] = joined.get(m["label"], 0) + int(m["n"])


async def _until(check: Any, proc: asyncio.subprocess.Process) -> None:
    while not await check():
        if proc.returncode is not None:
            raise RuntimeError(f"the supervisor exited ({proc.returncode}) before the run ended")
        await asyncio.sleep(POLL_S)


async def fleet(args: argparse.Namespace, group: str, warm: int) -> dict[str, Any]:
    """Run the supervisor over the warm streams already published; see the module docstring."""
    client, keys = connect(), Keys(args.ns)
    streams = await registered(client, keys, TOPIC)
    joined: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "fleet.toml"
        _config(config, group, args.processes, json.loads(args.config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fabric", "worker", "--config", str(config), "--namespace", keys.ns,
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        relay = asyncio.create_task(_relay(proc.stderr, joined))

        async def ready() -> bool:
            return (len(joined) == args.processes and min(joined.values()) >= len(streams)
                    and await undelivered(client, streams, group) == 0 and not await pending(client, streams, group))

        await _until(ready, proc)
        emit(ready={"streams": len(streams), "warm": warm, "processes": len(joined)})
        total = warm + args.expect

        async def done() -> bool:
            return (await undelivered(client, streams, group) == 0 and await stored(client, streams) >= total
                    and not await pending(client, streams, group))

        await _until(done, proc)
        t_done = time.time()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), STOP_S)
        await relay
    handled = await stored(client, streams) - warm
    await client.aclose()
    return {"t_done": t_done, "exit_code": code, "handled": handled, "processes": len(joined)}
