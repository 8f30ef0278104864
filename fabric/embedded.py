"""A Redis for a first run: the configured one, one answering on localhost:6379, or a ``redis-server`` started
here on a free loopback port for as long as the caller needs it (no persistence, a temporary directory)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fabric.client import DEFAULT_URL, resolve_url
from fabric.errors import RedisUnavailable

__all__ = ["answers", "redis_url"]

START_TIMEOUT_S = 10.0


def answers(host: str, port: int) -> bool:
    """Whether a Redis answers PING (or asks for a password) at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_url(url: str | None = None, *, announce: bool = True) -> Iterator[str]:
    """Yield a URL to a Redis: ``url``/``$FABRIC_REDIS_URL``, a local default one, or one started here."""
    url = resolve_url(url)
    if url != DEFAULT_URL or answers("127.0.0.1", 6379):
        yield url
        return
    if shutil.which("redis-server") is None:
        raise RedisUnavailable("no Redis answers on localhost:6379 and redis-server is not installed: "
                               "apt-get install -y redis-server, or set FABRIC_REDIS_URL")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not answers("127.0.0.1", port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RedisUnavailable(f"the embedded redis-server did not start on port {port}")
                time.sleep(0.02)
            if announce:
                print(f"started an embedded redis-server on 127.0.0.1:{port}")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait()
