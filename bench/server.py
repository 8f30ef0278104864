"""The Redis under the benchmark: the one named (``--redis-url``, ``$FABRIC_REDIS_URL``), else a dedicated
``redis-server`` started here on a free loopback port with no persistence (``--save '' --appendonly no``), so
that snapshots and AOF rewrites never show up in the figures."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from fabric.client import redact
from fabric.embedded import server_args
from fabric.nodes import is_cluster

__all__ = ["OWN_SERVER_ARGS", "Target", "answers", "cleanup", "delete_namespace", "describe", "free_port",
           "redis_target"]

OWN_SERVER_ARGS = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1", *server_args()]
"""No persistence, loopback, and the stream node settings fabric recommends (``fabric.embedded``)."""
CONFIG_REPORTED = ("save", "appendonly", "appendfsync", "maxmemory", "maxmemory-policy", "io-threads",
                   "stream-node-max-bytes", "stream-node-max-entries", "hz", "lazyfree-lazy-user-del")
START_TIMEOUT_S = 10.0


@dataclass
class Target:
    """A Redis URL, and whether this run started that server (then it may be flushed and stopped)."""

    url: str
    owned: bool
    command: list[str] = field(default_factory=list)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    """Whether a Redis on this loopback port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def _own_server() -> Iterator[Target]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server, or pass --redis-url")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        command = ["redis-server", "--port", str(port), *OWN_SERVER_ARGS, "--dir", tmp]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not answers(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the dedicated redis-server did not start on port {port}")
                time.sleep(0.02)
            yield Target(f"redis://127.0.0.1:{port}/0", owned=True, command=command)
        finally:
            proc.terminate()
            proc.wait()


@contextmanager
def redis_target(url: str | None) -> Iterator[Target]:
    """The Redis to measure: ``url``, else ``$FABRIC_REDIS_URL``, else a dedicated server for this run."""
    url = url or os.environ.get("FABRIC_REDIS_URL")
    if url:
        yield Target(url, owned=False)
        return
    with _own_server() as target:
        yield target


async def describe(client: Redis, target: Target) -> dict[str, Any]:
    """The server's version and the configuration that matters to the figures (on a cluster, of the node redis-py
    asks by default: the suite starts every node of its clusters alike), and a cluster's number of masters."""
    info = await client.info("server")
    config: dict[str, str] = {}
    for name in CONFIG_REPORTED:
        reply = await client.config_get(name)
        config.update({_text(k): _text(v) for k, v in reply.items()})
    found: dict[str, Any] = {"url": redact(target.url), "started_by_suite": target.owned,
                             "command": target.command, "version": _text(info["redis_version"]), "config": config}
    if is_cluster(client):
        found["masters"] = len(cast(RedisCluster, client).get_primaries())
    return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def delete_namespace(client: Redis, prefix: str) -> int:
    """Delete every key under ``prefix:``; return how many (a namespace is never shared between runs). On a
    cluster, SCAN covers every primary and UNLINK is split by slot (redis-py's cluster client does both)."""
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


async def cleanup(client: Redis, target: Target, prefix: str) -> None:
    """Remove what a run wrote: FLUSHDB on a server (or every primary of a cluster) this suite started, else the
    keys under ``prefix:``."""
    if target.owned:
        await client.flushdb()
    else:
        await delete_namespace(client, prefix)
