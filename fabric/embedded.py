"""A Redis for a first run: the configured one, one answering on localhost:6379, or a ``redis-server`` started
here on a free loopback port for as long as the caller needs it (no persistence, a temporary directory)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fabric.client import URL_ENV, resolve_url
from fabric.errors import RedisUnavailable
from fabric.supervisor import signal_on_parent_death

__all__ = ["STREAM_NODE_SETTINGS", "answers", "redis_server", "redis_url", "server_args"]

START_TIMEOUT_S = 10.0

STREAM_NODE_SETTINGS = {"stream-node-max-bytes": "16320", "stream-node-max-entries": "0"}
"""The Redis settings fabric recommends for its streams (deploy/cluster/redis-node.conf; the servers that
fabric and bench/ start).

Redis packs a stream's entries into nodes of up to ``stream-node-max-bytes``, but Redis 7.0 checks the limit
without an entry's own headers, so the entry that fills a node can take it a few bytes past the limit, and the
allocator then moves the whole node to its next size class, a quarter larger. Whether that happens to every node
depends on the entry size to the byte: at Redis's defaults (4096 bytes, 100 entries) a 242-byte tick costs 1.49x
its payload, one of 241 or 243 bytes 1.25x. A limit 64 bytes under the 16 KiB class keeps every node inside that
class: 1.14-1.18x for every tick of 230 to 300 bytes (``python -m bench.memory``). There is no entry-count limit:
it would cut small entries' nodes anywhere inside a size class.
"""


def server_args(settings: dict[str, str] = STREAM_NODE_SETTINGS) -> list[str]:
    """``settings`` as redis-server command-line arguments."""
    return [arg for name, value in settings.items() for arg in (f"--{name}", value)]


def answers(host: str, port: int) -> bool:
    """Whether a Redis answers PING (or asks for a password) at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(port: int, *, quiet: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """Run a ``redis-server`` on 127.0.0.1:port (no persistence, a temporary directory) while the block runs."""
    if shutil.which("redis-server") is None:
        raise RedisUnavailable("redis-server is not installed: apt-get install -y redis-server "
                               "(or brew install redis), or point --redis-url / FABRIC_REDIS_URL at a Redis")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", *server_args(), "--dir", tmp],
                                stdout=subprocess.DEVNULL if quiet else None,
                                start_new_session=True,  # a Ctrl-C is for fabric, which stops the server last
                                preexec_fn=signal_on_parent_death)  # stops when fabric dies, even by SIGKILL
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not answers("127.0.0.1", port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RedisUnavailable(f"redis-server did not start on 127.0.0.1:{port}: is the port taken? "
                                           "Try another with --port")
                time.sleep(0.02)
            yield proc
        finally:
            proc.terminate()
            proc.wait()


@contextmanager
def redis_url(url: str | None = None, *, announce: bool = True) -> Iterator[str]:
    """Yield a URL to a Redis: ``url`` or ``$FABRIC_REDIS_URL`` if given (as is: an explicit address that does not
    answer is an error for the caller to report), else a Redis on localhost:6379 if one answers, else one started
    here for the duration of the block (announced in one line on stderr)."""
    if url or os.environ.get(URL_ENV) or answers("127.0.0.1", 6379):
        yield resolve_url(url)
        return
    port = free_port()
    with redis_server(port):
        if announce:
            print(f"no Redis on localhost:6379: started a private redis-server on 127.0.0.1:{port} "
                  "(it stops with this command; `fabric dev` runs one to share)", file=sys.stderr)
        yield f"redis://127.0.0.1:{port}/0"

