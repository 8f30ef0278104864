"""Connecting to Redis, and the one place where redis-py's errors become fabric's.

Every other module calls ``error_code`` instead of matching error strings, and lets ``translated`` turn
redis-py exceptions into the ``fabric.errors`` tree with a message that names the cause and the fix.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from fabric.errors import (
    AuthenticationFailed,
    ConfigError,
    FabricError,
    PermissionDenied,
    RedisError,
    RedisOutOfMemory,
    RedisUnavailable,
)

__all__ = [
    "DEFAULT_URL", "Line", "Packed", "connect", "connect_within", "error_code", "own_connection", "raise_if_cancelled",
    "read_reply", "read_timeout_s", "redact", "resolve_url", "translate", "translated",
]

E = TypeVar("E", bound=BaseException)

DEFAULT_URL = "redis://localhost:6379/0"
URL_ENV = "FABRIC_REDIS_URL"
SOCKET_TIMEOUT_S = 30.0
"""No reply within this long means the connection is dead (WorkerConfig caps block_ms well below it); a URL's
``?socket_timeout=SECONDS`` replaces it (``read_timeout_s``)."""
POOL_WAIT_S = 30.0


class _HiredisPacking:
    """Pack commands with hiredis's C packer, as redis-py's sync client does (its asyncio client packs in
    Python, which profiling showed to be the largest cost of a publish batch)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) or b" " in head:
            args = (*head.split(), *args[1:])
        return [hiredis.pack_command(args)]


class FastConnection(_HiredisPacking, Connection):
    """A TCP connection that packs with hiredis."""


class FastSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection that packs with hiredis."""


class _AsksSentinels:
    """Every connect asks the sentinels for the primary: redis-py's ``connect()`` does, but a command sent on a
    closed connection (as ``Line`` sends) reconnects through ``connect_check_health``, to the last address known,
    or to localhost:6379 on a connection never connected."""

    connection_pool: SentinelConnectionPool
    host: str
    port: int
    is_connected: bool

    async def connect(self) -> None:
        await self.connect_check_health(check_health=self.connection_pool.check_connection)

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected:
            self.host, self.port = await self.connection_pool.get_master_address()  # type: ignore[no-untyped-call]
        await super().connect_check_health(  # type: ignore[misc]
            check_health=check_health, retry_socket_connect=retry_socket_connect)


class FastSentinelConnection(_AsksSentinels, _HiredisPacking, SentinelManagedConnection):
    """A TCP connection to the primary the sentinels name, packing with hiredis."""


class FastSentinelSSLConnection(_AsksSentinels, _HiredisPacking, SentinelManagedSSLConnection):
    """A TLS connection to the primary the sentinels name, packing with hiredis."""


_PACKING: dict[str, type[Connection]] = {"redis": FastConnection, "rediss": FastSSLConnection}


def resolve_url(url: str | None) -> str:
    """The URL given, else ``$FABRIC_REDIS_URL``, else the default local address."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that select redis-py's cluster client, and the plain scheme each stands for."""


class _Cluster(RedisCluster):
    """redis-py's cluster client, made safe for many concurrent callers (redis-py 8.1 is not):

    - commands sent at once to a client that has not read the slot map yet race in its start-up (a connection of
      one is closed under another's handshake): the first command reads the map, under a lock, before any is sent;
    - past its ``max_connections`` to one node it raises MaxConnectionsError instead of waiting (a command that
      raised may still have run; a pipeline that meets it closes every connection of the client, under the
      commands in flight): so its pools are left unbounded, and at most ``in_flight`` commands (not counting
      blocking reads, which wait on the server and would hold the others up) are sent at once, the others
      waiting their turn. Pipelines and blocking reads are few, and each takes a connection of its own.
    """

    def __init__(self, *args: Any, in_flight: int = 32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._room = asyncio.Semaphore(in_flight)
        self._started = asyncio.Lock()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            async with self._started:
                await self.initialize()
        if _blocking_s(args):
            return await super().execute_command(*args, **kwargs)
        async with self._room:
            return await super().execute_command(*args, **kwargs)


UNBOUNDED = 2**31
"""redis-py's own default pool size for a cluster node (``_Cluster`` bounds the commands in flight instead)."""


def _cluster(url: str, max_connections: int) -> aioredis.Redis:
    """A cluster client for ``redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]``: the nodes listed are
    where it starts; it learns the others (and every later change) from the cluster itself."""
    from redis.asyncio.cluster import ClusterNode

    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1].split(",")
    plain = parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme], netloc=parts.netloc.replace(
        parts.netloc.rsplit("@", 1)[-1], hosts[0])).geturl()
    nodes = []
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{host!r} is not HOST:PORT")
        nodes.append(ClusterNode(name, int(port)))
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a cluster has database 0 only")
    client = _Cluster.from_url(
        plain, startup_nodes=nodes, decode_responses=False, max_connections=UNBOUNDED, in_flight=max_connections,
        socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_S, socket_keepalive=True,
    )
    return client  # type: ignore[return-value]


SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
"""URL schemes that find the primary through Redis Sentinel, and the plain scheme each stands for."""
SENTINEL_TIMEOUT_S = 5.0
"""A sentinel answers SENTINEL MASTERS at once: one silent this long is passed over for the next."""
_SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port...]/SERVICE_NAME[/DB]"


class _Sentinels(Sentinel):
    """redis-py's Sentinel, whose "no primary" error says what to check."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            return await super().discover_master(service_name)  # type: ignore[no-any-return]
        except MasterNotFoundError as exc:
            where = ",".join(f"{s.connection_pool.connection_kwargs['host']}:"
                             f"{s.connection_pool.connection_kwargs['port']}" for s in self.sentinels)
            raise MasterNotFoundError(
                f"no primary for {service_name!r}: no sentinel of {where} names one that is up ({exc}); check the "
                f"name with `redis-cli -p SENTINEL_PORT SENTINEL MASTERS` (it is `sentinel monitor {service_name} "
                "...` in sentinel.conf); during a failover this lasts down-after-milliseconds plus the election"
            ) from exc


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The sentinels' primary with ``connect``'s pool behaviour: a burst waits for a free connection."""

    async def aclose(self) -> None:
        """Close the pool's connections, then those to the sentinels (the client's ``aclose`` calls this)."""
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def _sentinel(url: str, max_connections: int) -> aioredis.Redis:
    """A client of the primary of ``redis+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: every
    new connection asks the sentinels where the primary is, so after a failover a reconnect finds the new one."""
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"sentinel {host!r} is not HOST:PORT")
        sentinels.append((name.strip("[]"), int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    if not service:
        raise ValueError("the path must name the service the sentinels monitor")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    # redis-py reads the rest (password, database, ?socket_timeout=, TLS files) from the same URL in plain form.
    first = parts.netloc.replace(hosts, hosts.split(",")[0])
    plain = parts._replace(scheme=SENTINEL_SCHEMES[parts.scheme], netloc=first, path=f"/{db or 0}").geturl()
    kwargs = {k: v for k, v in parse_url(plain).items() if k not in ("host", "port", "connection_class")}
    tls = parts.scheme == "rediss+sentinel"
    to_sentinels: dict[str, Any] = {"socket_connect_timeout": SENTINEL_TIMEOUT_S, "socket_timeout": SENTINEL_TIMEOUT_S}
    if tls:  # the sentinels of a TLS deployment speak TLS too, with the same files; passwords are the data nodes'
        to_sentinels |= {"ssl": True, **{k: v for k, v in kwargs.items() if k.startswith("ssl_")}}
    settings: dict[str, Any] = {
        "decode_responses": False, "socket_connect_timeout": 5, "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_keepalive": True, "health_check_interval": 30, **kwargs,
    }
    manager = _Sentinels(sentinels, sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call]
    return manager.master_for(  # type: ignore[no-any-return]
        service, connection_pool_class=_SentinelPool,
        connection_class=FastSentinelSSLConnection if tls else FastSentinelConnection,
        max_connections=max_connections, timeout=POOL_WAIT_S, **settings,
    )


def is_cluster_url(url: str | None) -> bool:
    """Whether a URL selects the cluster client."""
    return urlsplit(resolve_url(url)).scheme in CLUSTER_SCHEMES


def connect(url: str | None = None, *, max_connections: int = 32) -> aioredis.Redis:
    """An asyncio Redis client (hiredis parser, bytes replies) for a ``redis://`` or ``rediss://`` URL, the
    client of a Sentinel-managed primary for ``redis+sentinel://`` (``rediss+sentinel://``), or redis-py's
    cluster client for ``redis+cluster://`` (``rediss+cluster://``) with the nodes to start from."""
    url = resolve_url(url)
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        try:
            return _sentinel(url, max_connections)
        except ValueError as exc:
            raise ConfigError(f"bad Redis Sentinel URL {redact(url)!r}: {exc}; expected {_SENTINEL_FORM}") from exc
    if is_cluster_url(url):
        try:
            return _cluster(url, max_connections)
        except ValueError as exc:
            raise ConfigError(f"bad Redis Cluster URL {redact(url)!r}: {exc}; expected "
                              "redis+cluster://[:password@]host:port[,host:port...]") from exc
    try:
        # A blocking pool makes a burst of calls wait for a connection instead of failing "Too many connections";
        # the socket timeout (above any block_ms) ends calls on a half-open connection instead of waiting hours.
        packing = _PACKING.get(urlsplit(url).scheme)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            **({"connection_class": packing} if packing else {}),
            decode_responses=False,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=5,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=30,
        )
        return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact(url)!r}: {exc}; expected redis://[:password@]host:port/db") from exc


def own_connection(client: aioredis.Redis) -> AbstractConnection:
    """A connection outside the client's pool, with the pool's settings, for a loop that keeps it. Reads on it
    must pass ``timeout=read_timeout_s(client)``: fabric's own connection classes have no socket timeout, because
    redis-py would run every write in a task of its own to time it (a write only waits when the socket buffer
    is full, and the read that follows has the timeout). Behind Sentinel the connection keeps the pool, whose
    sentinels it asks for the primary at every connect: a reconnect after a failover finds the new one."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    if issubclass(pool.connection_class, _HiredisPacking):
        kwargs["socket_timeout"] = None
    if issubclass(pool.connection_class, SentinelManagedConnection):
        kwargs["connection_pool"] = pool  # a strong reference: the connection may outlive every other user
    return pool.connection_class(**kwargs)


def read_timeout_s(client: aioredis.Redis) -> float:
    """How long a reply may take before its connection counts as dead: the URL's ``socket_timeout`` if it gives
    one, else ``SOCKET_TIMEOUT_S``. A blackholed Redis is detected within this (TCP keepalive takes hours)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = pool.connection_kwargs if pool is not None else client.get_connection_kwargs()  # type: ignore[no-untyped-call]
    configured = kwargs.get("socket_timeout")
    return float(configured) if configured else SOCKET_TIMEOUT_S


@asynccontextmanager
async def _deadline(conn: AbstractConnection, timeout_s: float) -> AsyncIterator[None]:
    """Raise redis-py's ``TimeoutError`` if the block takes longer than ``timeout_s``. (Not redis-py's own
    ``read_response(timeout=...)``: on expiry it returns None, which reads as a nil reply, and leaves the late
    reply on the connection to be taken as the answer to the next command.)"""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise rex.TimeoutError(f"Timeout reading from {conn._host_error()}: no reply within {timeout_s:.1f}s "
                               "(a silent or unreachable Redis)") from None


async def read_reply(conn: AbstractConnection, timeout_s: float) -> Any:
    """The next reply on a connection of ``own_connection``, or redis-py's ``TimeoutError`` after ``timeout_s``
    (the connection must then be closed: its late reply would answer the next command)."""
    async with _deadline(conn, timeout_s):
        return await conn.read_response()


async def connect_within(conn: AbstractConnection, timeout_s: float) -> None:
    """Connect a connection of ``own_connection`` (TCP, TLS, then the handshake's replies, which it reads with
    no timeout of its own), or raise redis-py's ``TimeoutError`` after ``timeout_s``."""
    async with _deadline(conn, timeout_s):
        await conn.connect()  # type: ignore[no-untyped-call]


BLOCK_WITHIN = 8
"""Where a blocking command's ``BLOCK ms`` can be (XREAD, XREADGROUP put it before STREAMS): only these first
arguments are looked at, so a script call carrying a whole commit batch costs no scan of thousands."""


def _blocking_s(args: tuple[Any, ...]) -> float:
    """How long a blocking command (``... BLOCK ms ...``) may wait on the server before it replies."""
    head = args[:BLOCK_WITHIN]
    for i, arg in enumerate(head[:-1]):
        if arg in ("BLOCK", b"BLOCK"):
            return int(head[i + 1]) / 1000
    return 0.0


class Packed:
    """A command packed once, to be sent many times (``Line.call_packed``, ``Line.send_packed``): a lane's
    XREADGROUP over its 50 streams is 100 names and ids, which hiredis took about 10 µs to pack again for every
    read, on the path of every event of a lane that trickles."""

    __slots__ = ("args", "blocking_s", "data")

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.data: bytes = hiredis.pack_command(args)
        self.blocking_s = _blocking_s(args)
        """How long the command may wait on the server before it replies (``... BLOCK ms ...``)."""


class Line:
    """A connection of its own for one sequential loop (a reader, the committer): a command goes out packed by
    hiredis and its reply comes back raw (no redis-py reply callbacks, no pool round trip). Connects lazily and
    again after an error; a reply cut short (a cancel, a timeout) closes the connection, so no stale reply is
    ever read as the answer to the next command."""

    def __init__(self, client: aioredis.Redis, *, identified: bool = False) -> None:
        self._conn = own_connection(client)
        self._timeout_s = read_timeout_s(client)
        self.client_id: int | None = None
        """With ``identified``: the connection's CLIENT ID, asked at each (re)connect, for a CLIENT UNBLOCK of its
        blocking command from another connection; None before the first connect, or when Redis refused it."""
        self.id_refused: rex.ResponseError | None = None
        """Why Redis refused CLIENT ID (a user without ``+client|id``), if it did."""
        if identified:
            self._conn.register_connect_callback(self._identify)  # type: ignore[no-untyped-call]

    async def _identify(self, conn: AbstractConnection) -> None:
        self.client_id = None
        await conn.send_command("CLIENT", "ID", check_health=False)
        try:
            self.client_id = int(await conn.read_response())
        except rex.ResponseError as exc:
            self.id_refused = exc

    @classmethod
    def on(cls, conn: AbstractConnection, timeout_s: float) -> Line:
        """A line over a connection made elsewhere (a cluster node's, see ``nodes.ClusterLine``)."""
        line = cls.__new__(cls)
        line._conn, line._timeout_s = conn, timeout_s
        line.client_id, line.id_refused = None, None
        return line

    async def call(self, *args: Any) -> Any:
        """Send one command and return its raw reply; error replies raise redis-py's ``ResponseError``s. No reply
        within the read timeout (plus a blocking command's own wait), reconnecting included, closes the
        connection and raises redis-py's ``TimeoutError``."""
        return await self._exchange(hiredis.pack_command(args), _blocking_s(args))

    async def call_packed(self, command: Packed) -> Any:
        """``call`` for a command packed beforehand."""
        return await self._exchange(command.data, command.blocking_s)

    async def _exchange(self, data: bytes, blocking_s: float) -> Any:
        conn = self._conn
        try:
            async with _deadline(conn, self._timeout_s + blocking_s):
                await conn.send_packed_command(data, check_health=False)
                return await conn.read_response()
        except rex.ResponseError:
            raise
        except BaseException:
            await self._drop()
            raise

    async def send_packed(self, command: Packed) -> None:
        """Send one command without reading its reply (``receive`` reads the replies, in order). A failed send
        closes the connection, and with it every reply still to read."""
        conn = self._conn
        try:
            async with _deadline(conn, self._timeout_s):
                await conn.send_packed_command(command.data, check_health=False)
        except BaseException:
            await self._drop()
            raise

    async def receive(self, blocking_s: float = 0.0) -> Any:
        """The raw reply to the oldest command sent and not yet answered (``blocking_s``: how long that command may
        wait on the server); error replies raise as for ``call``, anything else closes the connection."""
        conn = self._conn
        try:
            async with _deadline(conn, self._timeout_s + blocking_s):
                return await conn.read_response()
        except rex.ResponseError:
            raise
        except BaseException:
            await self._drop()
            raise

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands together and return their raw replies in order, an error reply as its exception in
        its place (a pipeline: one write, one round trip). A lost connection raises, as for ``call``."""
        conn = self._conn
        replies: list[Any] = []
        try:
            async with _deadline(conn, self._timeout_s):
                await conn.send_packed_command(b"".join(hiredis.pack_command(c) for c in commands), check_health=False)
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except rex.ResponseError as exc:
                        replies.append(exc)
        except BaseException:
            await self._drop()
            raise
        return replies

    async def close(self) -> None:
        """Close the connection."""
        self.client_id = None
        await self._conn.disconnect()

    async def _drop(self) -> None:
        """Close the connection after an error or a reply cut short: the replies still to come go with it, and so
        does its CLIENT ID (a CLIENT UNBLOCK must not reach whoever gets that id next)."""
        self.client_id = None
        await self._conn.disconnect(nowait=True)


def raise_if_cancelled(exc: BaseException) -> None:
    """A cancelled Redis call can surface as a connection error; never let a retry loop swallow the cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


def error_code(exc: BaseException) -> str:
    """The leading upper-case word of a Redis error reply (``BUSYGROUP``, ``NOGROUP``, ``OOM``...), or ''."""
    text = str(exc)
    # Errors raised inside a script arrive wrapped: "Error running script ...: @user_script:..: NOGROUP ..."
    for word in text.replace(":", " ").split():
        if word.isupper() and len(word) > 2 and word.isalpha():
            return word
    return ""


def translate(exc: BaseException, url: str | None = None) -> FabricError:
    """The fabric error for a redis-py exception (or the exception itself when it already is one)."""
    if isinstance(exc, FabricError):
        return exc
    where = f" at {redact(resolve_url(url))}" if url is not None else ""
    code = error_code(exc)
    if _cause(exc, rex.AuthenticationError) is not None or code in {"WRONGPASS", "NOAUTH"}:
        return AuthenticationFailed(
            f"Redis{where} rejected the credentials ({exc}): put the right password in the URL "
            "(redis://:PASSWORD@host:port or redis://USER:PASSWORD@host:port)"
        )
    if isinstance(exc, rex.NoPermissionError) or code == "NOPERM":
        return PermissionDenied(
            f"the Redis user may not do this{where} ({exc}): grant it the stream, script and key "
            "permissions README lists under 'Redis permissions'"
        )
    if isinstance(exc, rex.OutOfMemoryError) or code == "OOM":
        return RedisOutOfMemory(
            f"Redis{where} is out of memory and refuses writes: raise maxmemory, trim retention, "
            "or add consumers to drain the backlog"
        )
    tls = _cause(exc, ssl.SSLError)
    if tls is not None:
        return RedisUnavailable(
            f"the TLS handshake with Redis{where} failed ({tls}): pass the CA that signed the server's certificate "
            "as rediss://host:port/0?ssl_ca_certs=/path/ca.pem, and check that the certificate names the host "
            "the URL does"
        )
    if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError)) or (
            isinstance(exc, rex.RedisClusterException) and "cannot be connected" in str(exc)):
        plain = url is not None and urlsplit(resolve_url(url)).scheme == "redis"
        tls_hint = " (a TLS-only Redis resets plain connections: use rediss://)" if (
            plain and _cause(exc, ConnectionResetError) is not None) else ""
        return RedisUnavailable(
            f"cannot reach Redis{where} ({exc}): is redis-server running? "
            f"Pass --redis-url or set FABRIC_REDIS_URL{tls_hint}"
        )
    return RedisError(f"Redis{where} answered with an error: {exc}")


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``'s chain (redis-py wraps socket and TLS errors in its own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def translated(url: str | None = None) -> Iterator[None]:
    """Re-raise redis-py exceptions inside the block as fabric errors, chained with ``from``."""
    try:
        yield
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:  # the cluster's is no RedisError
        raise translate(exc, url) from exc
