"""The HTTP endpoints of a worker process or a supervisor, on one port: ``/metrics`` (Prometheus text format),
``/healthz`` (the process is alive: its event loop answers) and ``/readyz`` (ready for work: connected, group
joined, not draining; 503 otherwise, with the reason).

A few dozen lines of asyncio instead of a web framework: the endpoints answer on the process's own event loop,
so a loop blocked by a handler shows as a failing liveness probe, which is what it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["ANY_HOST", "Endpoints", "PORT_ENV"]

log = logging.getLogger("fabric.endpoints")

PORT_ENV = "FABRIC_METRICS_PORT"
"""The port ``fabric worker`` serves the endpoints on when ``--metrics-port`` is not given."""
ANY_HOST = "0.0.0.0"  # noqa: S104 (a scrape target listens for scrapers)
"""The default address: every interface."""
READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 8192
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
           503: "Service Unavailable"}


class Endpoints:
    """Serves the endpoints for ``registry``; ``ready()`` returns None when ready, else why not."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], str | None], *,
                 host: str = ANY_HOST, port: int = 0) -> None:
        self.registry = registry
        self.ready = ready
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; return the port (useful with port 0: any free one). Raises OSError if it is taken."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", self.host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            why = self.ready()
            return (200, "text/plain; charset=utf-8", b"ready\n") if why is None else (
                503, "text/plain; charset=utf-8", f"not ready: {why}\n".encode())
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n"

    def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"GET only\n"
        try:
            return self._answer(path.split("?", 1)[0])
        except Exception:  # a bug in collecting: say so to the scraper and in the log, keep serving
            log.exception("answering %s failed", path)
            return 500, "text/plain; charset=utf-8", b"internal error: see the process's log\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
                method, path, *_ = head[:MAX_REQUEST_BYTES].decode("latin-1").split(" ", 2)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                return  # no complete request: nothing to answer
            status, ctype, body = self._respond(method, path)
            writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (body if method == "GET" else b""))
            await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
