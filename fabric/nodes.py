"""Redis Cluster: which node serves a key, and fabric's own connections that follow the cluster as it changes.

fabric's hot loops (the publisher, a worker's readers and committer) talk to Redis on connections of their own
(``client.Line``) rather than through redis-py's client. On a cluster, ``ClusterLine`` gives them the same
interface over one such connection per node: each command goes to the node that serves its key's slot, and

- ``MOVED`` (the slot moved for good: a reshard or a failover) refreshes the slot map and sends it again;
- ``ASK`` (the slot is being migrated and the key is already on the target) sends ``ASKING`` and the command to
  the target, once, without changing the map;
- ``TRYAGAIN`` (a multi-key command while its keys are split by a migration) and ``CLUSTERDOWN`` (a failover in
  progress) wait a little and send it again.

Each of those replies means the command did not run, so sending it again is safe. A connection error is raised
as on a single Redis (the caller's retry decides, as there), and the slot map is refreshed before the next
command, since a dead node is the usual cause. A command must keep its keys in one slot: fabric's key layout
puts a stream and all its companions under one hash tag (``keys.py``), and callers that span streams group them
with ``by_slot``.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, TypeVar

import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from fabric.client import SOCKET_TIMEOUT_S, Line

__all__ = [
    "ClusterLine", "MAX_REDIRECTS", "by_slot", "command_key", "eval_many", "is_cluster", "line_for", "slot_of",
]

MAX_REDIRECTS = 16
"""Redirections and waits (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) one command goes through before its error is raised."""
RETRY_WAIT_S = (0.02, 0.5)
"""The wait before sending again after TRYAGAIN or CLUSTERDOWN: doubling from the first to the second."""

T = TypeVar("T")


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is redis-py's cluster client."""
    return isinstance(client, RedisCluster)


def slot_of(key: str | bytes) -> int:
    """The cluster slot of a key (its hash tag's, when it has one)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


def by_slot(items: Iterable[T], key: Any = None) -> list[list[T]]:  # key: Callable[[T], str | bytes]
    """Items grouped by the slot of their key (``key(item)``, or the item itself), first appearance first."""
    groups: defaultdict[int, list[T]] = defaultdict(list)
    for item in items:
        groups[slot_of(item if key is None else key(item))].append(item)  # type: ignore[arg-type]
    return list(groups.values())


def command_key(args: tuple[Any, ...]) -> Any:
    """The key a command is routed by (its first key), or None for a keyless one."""
    name = args[0].upper() if isinstance(args[0], str) else args[0].decode().upper()
    if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"):
        return args[3] if int(args[2]) > 0 else None
    if name in ("XREAD", "XREADGROUP"):
        for i, arg in enumerate(args):
            if arg in ("STREAMS", b"STREAMS"):
                return args[i + 1]
        return None
    if name in ("SCRIPT", "PING", "ASKING", "INFO", "TIME", "WAIT", "CLIENT", "CONFIG", "ACL"):
        return None
    return args[1] if len(args) > 1 else None


def line_for(client: Any) -> Line | ClusterLine:
    """A ``Line`` for a single Redis, a ``ClusterLine`` for a cluster: the same ``call`` either way."""
    return ClusterLine(client) if is_cluster(client) else Line(client)


REDIRECTS = (rex.MovedError, rex.AskError, rex.TryAgainError, rex.ClusterDownError)
"""Replies to a command that did not run there: sent again on its own (``ClusterLine.call_many``)."""


class ClusterLine:
    """``Line``'s interface over a Redis Cluster: one connection of its own per node, commands routed by slot.

    Like a ``Line``, it serves one sequential loop: one ``call`` at a time (``call_many`` runs the nodes'
    shares at once, each on its own connection)."""

    def __init__(self, client: RedisCluster) -> None:
        self.client = client
        self._lines: dict[str, tuple[Line, asyncio.Lock]] = {}
        self._stale = False

    # ---- routing ---------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        """Read the slot map again (after a MOVED or a dead node)."""
        self._stale = False
        await self.client.nodes_manager.initialize()

    async def node_for(self, key: Any) -> ClusterNode:
        """The primary that serves ``key``'s slot now (any primary for None)."""
        if self._stale:
            await self._refresh()
        if not self.client.nodes_manager.slots_cache:
            await self.client.initialize()
        if key is None:
            return self.client.get_default_node()
        return self.client.nodes_manager.get_node_from_slot(slot_of(key))

    def _line(self, node: ClusterNode | tuple[str, int]) -> tuple[Line, asyncio.Lock]:
        """The connection of its own to a node (made on first use), and the lock that keeps it to one call at a
        time (``call_many`` runs the nodes at once, and a redirection may lead to a node another one uses)."""
        if isinstance(node, ClusterNode):
            host, port, template = node.host, node.port, node
        else:
            (host, port), template = node, self.client.get_default_node()
        name = f"{host}:{port}"
        held = self._lines.get(name)
        if held is None:
            kwargs = dict(template.connection_kwargs, host=host, port=port)
            timeout_s = float(kwargs.get("socket_timeout") or SOCKET_TIMEOUT_S)
            kwargs["socket_timeout"] = None  # Line.call bounds each reply itself
            held = self._lines[name] = (Line.on(template.connection_class(**kwargs), timeout_s), asyncio.Lock())
        return held

    async def _send(self, node: ClusterNode | tuple[str, int], args: tuple[Any, ...], asking: bool) -> Any:
        line, lock = self._line(node)
        async with lock:
            if asking:
                await line.call("ASKING")
            return await line.call(*args)

    # ---- calls -----------------------------------------------------------------------------------

    async def call(self, *args: Any) -> Any:
        """Send one command to the node serving its key and return its raw reply (see the module docstring)."""
        return await self.call_at(command_key(args), *args)

    async def call_at(self, key: Any, *args: Any) -> Any:
        """Send one command to the node serving ``key`` (a keyless command, such as SCRIPT LOAD, goes where a
        command with ``key`` would)."""
        wait = RETRY_WAIT_S[0]
        ask: tuple[str, int] | None = None
        for _ in range(MAX_REDIRECTS):
            try:
                if ask is not None:
                    return await self._send(ask, args, asking=True)
                return await self._send(await self.node_for(key), args, asking=False)
            except rex.MovedError:
                ask = None
                await self._refresh()
            except rex.AskError as exc:
                ask = exc.node_addr
            except (rex.TryAgainError, rex.ClusterDownError):
                ask = None
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_WAIT_S[1])
                self._stale = True
            except (rex.ConnectionError, rex.TimeoutError, OSError):
                self._stale = True
                raise
        return await self._send(await self.node_for(key), args, asking=False)

    async def call_many(self, commands: list[tuple[Any, ...]], keys: list[Any] | None = None,
                        resent: list[int] | None = None) -> list[Any]:
        """Send commands, each to its key's node, and return their raw replies in order, an error reply as its
        exception in its place: the commands for one node go out together (one round trip), the nodes at once.
        A command redirected or told to wait is sent again on its own (it had not run); a lost connection
        raises, as for ``call``. ``keys``, when given, routes each command by its key there instead of its own
        (a keyless command such as WAIT then goes right behind the command it follows, on that one's node).
        ``resent``, when given, gets the indexes of the commands sent again on their own (after the others)."""
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, args in enumerate(commands):
            node = await self.node_for(command_key(args) if keys is None else keys[i])
            by_node.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(commands)

        async def run(node: ClusterNode, indexes: list[int]) -> None:
            line, lock = self._line(node)
            async with lock:
                got = await line.call_many([commands[i] for i in indexes])
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply

        try:
            results = await asyncio.gather(*(run(n, ix) for n, ix in by_node.values()), return_exceptions=True)
        except BaseException:
            self._stale = True
            raise
        for r in results:
            if isinstance(r, BaseException):
                self._stale = True
                raise r
        again = [i for i, r in enumerate(replies) if isinstance(r, REDIRECTS)]
        for i in again:
            try:
                replies[i] = await self.call_at(command_key(commands[i]) if keys is None else keys[i], *commands[i])
            except rex.ResponseError as exc:
                replies[i] = exc
        if resent is not None:
            resent += again
        return replies

    async def close(self) -> None:
        """Close every node's connection."""
        lines, self._lines = list(self._lines.values()), {}
        for line, _ in lines:
            await line.close()


async def eval_many(line: ClusterLine, script: Any, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    """Run a Lua ``script`` (a ``scripts.Script``) once per (keys, args), each call's keys in one slot, pipelined
    per node (``ClusterLine.call_many``), and return the raw replies in order. A node that did not know the script
    gets it loaded (SCRIPT LOAD at a key it serves) and its calls are sent again: they had not run. Any other error
    reply is raised (the calls before and after it in the list may have run)."""
    if not calls:
        return []
    commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for keys, args in calls]
    replies = await line.call_many(commands)
    again = [i for i, r in enumerate(replies) if isinstance(r, rex.NoScriptError)]
    if again:
        loaded: set[str] = set()
        for i in again:
            node = await line.node_for(calls[i][0][0])
            if node.name not in loaded:
                loaded.add(node.name)
                await line.call_at(calls[i][0][0], "SCRIPT", "LOAD", script.source)
        for i, reply in zip(again, await line.call_many([commands[i] for i in again]), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
