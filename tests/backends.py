"""What a test does to "the server" when the backend may be a cluster: every node of it, or the one server.

On a Redis Cluster, server-wide commands (ACL users, CLIENT LIST/KILL, INFO) act on one node only, and the
cluster client refuses keyless ones; these helpers run them on every node and combine the replies.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from fabric.nodes import is_cluster


async def on_every_node(redis: Any, *args: Any) -> list[Any]:
    """Run a command on every node (the one server when not a cluster); the replies, one per node."""
    if not is_cluster(redis):
        return [await redis.execute_command(*args)]
    if not redis.get_nodes():
        await redis.initialize()
    replies = []
    for node in redis.get_nodes():
        client = Redis(host=node.host, port=node.port, **_auth(redis))
        try:
            replies.append(await client.execute_command(*args))
        finally:
            await client.aclose()
    return replies


def _auth(redis: Any) -> dict[str, Any]:
    kwargs = redis.get_connection_kwargs()
    return {k: kwargs[k] for k in ("username", "password") if kwargs.get(k)}


async def client_list(redis: Any) -> list[dict[str, Any]]:
    """Every node's connected clients (CLIENT LIST, parsed), with the node's replies together."""
    from redis._parsers.helpers import parse_client_list

    rows: list[dict[str, Any]] = []
    for reply in await on_every_node(redis, "CLIENT", "LIST"):
        rows += parse_client_list(reply.decode()) if isinstance(reply, bytes) else reply
    return rows


async def command_calls(redis: Any, command: str) -> int:
    """How many times every node has run ``command`` (INFO commandstats), summed."""
    total = 0
    for stats in await on_every_node(redis, "INFO", "commandstats"):
        total += int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
    return total


def with_user(url: str, user: str, password: str) -> str:
    """The URL with a user and password in it (any scheme, one host or a cluster's list)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return parts._replace(netloc=f"{user}:{password}@{host}").geturl()


async def kill_clients(redis: Any, which: Any) -> int:
    """CLIENT KILL every connection (on every node) for which ``which(row)`` holds; how many were killed."""
    if not is_cluster(redis):
        rows = await client_list(redis)
        return sum([await redis.execute_command("CLIENT", "KILL", "ID", r["id"]) for r in rows if which(r)])
    killed = 0
    for node in redis.get_nodes():
        client = Redis(host=node.host, port=node.port, **_auth(redis))
        try:
            from redis._parsers.helpers import parse_client_list

            rows = parse_client_list((await client.execute_command("CLIENT", "LIST")).decode())
            for r in rows:
                if which(r):
                    killed += await client.execute_command("CLIENT", "KILL", "ID", r["id"])
        finally:
            await client.aclose()
    return killed
