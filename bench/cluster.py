"""The Redis Clusters of the ``cluster`` cases: started here on loopback, one at a time, each with its own client.

A cluster of M masters is M ``redis-server --cluster-enabled yes`` on free ports whose port + 10000 (the
cluster bus) is free too, without persistence (``--save '' --appendonly no``, as the suite's own server), joined
by ``redis-cli --cluster create ... --cluster-replicas 0`` and ready once every node's ``CLUSTER INFO`` says
``cluster_state:ok`` with all 16,384 slots served. ``redis-cli`` refuses to create a cluster of fewer than three
masters, so a single master takes every slot itself with ``CLUSTER ADDSLOTSRANGE 0 16383``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.server import OWN_SERVER_ARGS, START_TIMEOUT_S, Target, answers, describe, free_port
from bench.settings import Settings
from bench.suite import Bench
from fabric import connect

__all__ = ["ClusterFailed", "Clusters", "own_cluster"]

BUS_OFFSET = 10_000
"""A cluster node also listens on its port + 10,000 (the cluster bus)."""
NODE_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
             "--cluster-announce-ip", "127.0.0.1", *OWN_SERVER_ARGS]
READY_TIMEOUT_S = 30.0


class ClusterFailed(RuntimeError):
    """The cluster did not start, or did not become ok in time; the message says which step and why."""


def _node_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster-bus port is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + BUS_OFFSET < 65536 and port not in ports and _bindable(port + BUS_OFFSET):
            ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=READY_TIMEOUT_S)


def _start_node(port: int, workdir: Path, stack: ExitStack) -> list[str]:
    node_dir = workdir / str(port)
    node_dir.mkdir()
    command = ["redis-server", "--port", str(port), *NODE_ARGS, "--dir", str(node_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ClusterFailed(f"the cluster node on port {port} did not start ({' '.join(command)})")
        time.sleep(0.02)
    return command


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _join(ports: list[int]) -> None:
    """Give the nodes the slots: ``redis-cli --cluster create`` for three or more masters, else ADDSLOTSRANGE."""
    if len(ports) >= 3:
        command = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                   "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=READY_TIMEOUT_S * 2)
    else:
        [port] = ports
        done = _cli(port, "CLUSTER", "ADDSLOTSRANGE", "0", "16383")
    if done.returncode != 0 or "ERR" in done.stdout:
        raise ClusterFailed(f"joining the cluster {ports} failed: {(done.stdout + done.stderr)[-2000:]}")


def _wait_ok(ports: list[int]) -> None:
    """Until every node says ``cluster_state:ok`` and serves all 16,384 slots."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        infos = [_cli(p, "CLUSTER", "INFO").stdout for p in ports]
        if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
            return
        if time.monotonic() > deadline:
            raise ClusterFailed(f"the cluster {ports} did not reach cluster_state:ok within {READY_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


@contextmanager
def own_cluster(masters: int) -> Iterator[Target]:
    """A Redis Cluster of ``masters`` masters (no replicas) for as long as the context lasts."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            raise ClusterFailed(f"{binary} is not installed: apt-get install -y redis-server")
    ports = _node_ports(masters)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, ExitStack() as nodes:
        commands = [_start_node(port, Path(tmp), nodes) for port in ports]
        _join(ports)
        _wait_ok(ports)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        yield Target(url, owned=True, command=commands[0])


class Clusters:
    """The cluster cases' Redis: a cluster of the size a case asks for, started on first use and kept for the
    cases after it that ask for the same size; a different size stops it first (an idle cluster would still
    take some of the CPU the next one is measured on). What each cluster was is kept in ``described``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.described: dict[str, dict[str, Any]] = {}
        self._masters = 0
        self._bench: Bench | None = None
        self._stack = AsyncExitStack()

    async def bench(self, masters: int) -> Bench:
        """A ``Bench`` on a cluster of ``masters`` masters (raises ClusterFailed if it cannot start)."""
        if self._bench is not None and self._masters == masters:
            return self._bench
        await self.aclose()
        self._masters = masters
        target = self._stack.enter_context(own_cluster(masters))
        client = connect(target.url)
        self._stack.push_async_callback(client.aclose)
        self.described[str(masters)] = await describe(client, target)
        self._bench = Bench(target, client, self.settings)
        return self._bench

    async def aclose(self) -> None:
        """Stop the running cluster, if any."""
        self._bench = None
        await self._stack.aclose()

    async def __aenter__(self) -> Clusters:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
