"""Shared fixtures: a real redis-server started by the session on a free port, fakeredis beside it.

``redis`` is parametrised over both backends; tests marked ``real_only`` (blocking reads, idle times,
processes) run on the real server only. Without a redis-server binary the real cases skip locally and fail
under CI (``CI`` set), so a CI machine can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fabric.keys import Keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        real_only = metafunc.definition.get_closest_marker("real_only") is not None
        metafunc.parametrize("backend", ["real"] if real_only else ["real", "fake"], scope="function")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server process on loopback, owned by the test session."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[object]:
    """An asyncio client on the real server or on a fresh fakeredis server."""
    if backend == "real":
        from fabric.client import connect

        client = connect(request.getfixturevalue("redis_url"))
    else:
        import fakeredis

        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> Keys:
    """A fresh namespace per test, so tests never see each other's keys."""
    return Keys(f"t{uuid.uuid4().hex[:12]}")


def fabric_cmd(*args: str) -> list[str]:
    """The command line that runs the fabric CLI in a subprocess."""
    return [sys.executable, "-m", "fabric", *args]
