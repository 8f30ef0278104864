"""The start-up check (``fabric.preflight``) on every backend, and on a cluster, where each primary has its own
ACLs and config: every primary is checked. (The least-privilege users of deploy/acl and a full Redis are in
tests/faults/test_security.py, on a server of their own.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fabric import preflight
from fabric.config import WorkerConfig
from fabric.errors import PermissionDenied, RedisMisconfigured
from fabric.keys import Keys, Priority
from fabric.nodes import is_cluster

PASSWORD = "preflight-test"


def config() -> WorkerConfig:
    return WorkerConfig(group="g", topics=["tick"])


async def key_names(redis: Any) -> set[bytes]:
    """Every key's name (on a cluster, every node's): a set, not a count, since keys earlier tests left with a
    TTL (leases, producer numbers) may expire meanwhile."""
    return {key async for key in redis.scan_iter(count=1000)}


async def nodes(redis: Any) -> list[Any]:
    """Each server to configure: the one (None), or every primary of the cluster."""
    if not is_cluster(redis):
        return [None]
    await redis.initialize()
    return list(redis.get_primaries())


async def on_each(redis: Any, *args: str) -> None:
    for node in await nodes(redis):
        await (redis.execute_command(*args, target_nodes=node) if node else redis.execute_command(*args))


@pytest.fixture
async def user(redis: Any, redis_url: str) -> AsyncIterator[Any]:
    """``await user(*rules, only_first_node=(...))``: an ACL user with these rules on every node (and those on the
    first node only), and a client of it; the users are deleted at teardown."""
    from fabric.client import connect

    names: list[str] = []
    clients: list[Any] = []

    async def make(*rules: str, only_first_node: tuple[str, ...] = ()) -> Any:
        name = f"pf{uuid.uuid4().hex[:8]}"
        names.append(name)
        for i, node in enumerate(await nodes(redis)):
            node_rules = (*rules, *only_first_node) if i == 0 else rules
            args = ("ACL", "SETUSER", name, "reset", "on", f">{PASSWORD}", "~*", "&*", *node_rules)
            await (redis.execute_command(*args, target_nodes=node) if node else redis.execute_command(*args))
        scheme, rest = redis_url.split("://", 1)
        client = connect(f"{scheme}://{name}:{PASSWORD}@{rest}")
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()
        for name in names:
            await on_each(redis, "ACL", "DELUSER", name)


async def test_nothing_is_refused_to_a_user_who_may_do_everything_and_nothing_is_written(redis, keys) -> None:
    # given a Redis (or a cluster) the default user may do everything on
    before = await key_names(redis)

    # when the probes of a worker and a producer are checked, then none is refused, and nothing was written
    assert await preflight.refused(redis, preflight.worker_needs(keys, config(), "c1")) == []
    ordered = WorkerConfig(group="g", topics=["tick"], ordered=True)
    assert await preflight.refused(redis, preflight.worker_needs(keys, ordered, "c1")) == []
    assert await preflight.refused(redis, preflight.publisher_needs(keys, ("tick",), dedup=True)) == []
    assert await key_names(redis) <= before  # no key written (some of before may have expired)


@pytest.mark.real_only
async def test_a_worker_check_passes(redis, keys) -> None:
    await preflight.check_worker(redis, keys, config(), "c1")


@pytest.mark.real_only
async def test_a_missing_command_is_named(redis, keys, user) -> None:
    # given a user who may not XADD
    client = await user("+@all", "-xadd")

    # when a worker's check runs as that user, then it is refused, naming the command
    with pytest.raises(PermissionDenied, match=r"commands \+xadd"):
        await preflight.check_worker(client, keys, config(), "c1")


@pytest.mark.real_only
async def test_an_ordered_worker_needs_its_fenced_reads_transaction(redis, keys, user) -> None:
    # given a user who may do everything but WATCH and EXEC
    client = await user("+@all", "-watch", "-exec")
    ordered = WorkerConfig(group="g", topics=["tick"], ordered=True)

    # when an ordered worker's check runs as that user, then it is refused, naming both (on a cluster, where the
    # read is a script, it is not); an unordered one is not
    if is_cluster(redis):
        await preflight.check_worker(client, keys, ordered, "c1")
    else:
        with pytest.raises(PermissionDenied, match=r"commands \+exec \+watch"):
            await preflight.check_worker(client, keys, ordered, "c1")
    await preflight.check_worker(client, keys, config(), "c1")


@pytest.mark.real_only
async def test_a_command_missing_on_one_node_only_is_named(redis, keys, user) -> None:
    # given a user who may do everything, except HINCRBY on one node (one server: that one)
    client = await user("+@all", only_first_node=("-hincrby",))

    # when a worker's check runs as that user, then it is refused, naming the command
    with pytest.raises(PermissionDenied, match=r"commands \+hincrby"):
        await preflight.check_worker(client, keys, config(), "c1")


@pytest.mark.real_only
async def test_missing_keys_are_named_whichever_node_serves_them(redis, user) -> None:
    # given a user limited to another namespace's keys
    keys = Keys(f"t{uuid.uuid4().hex[:12]}")
    client = await user("+@all", "resetkeys", "~elsewhere:*")

    # when the check runs, then keys in other slots than the stream's (on a cluster: on other nodes) are named
    missing = await preflight.refused(client, preflight.worker_needs(keys, config(), "c1")) or []
    stream = keys.stream("tick", Priority.NORMAL, None)
    assert f"keys {keys.counters()} (HINCRBY)" in missing
    assert f"keys {keys.topic_registry('tick')} (SADD)" in missing
    assert f"keys {keys.dlq(stream)} (XADD)" in missing


@pytest.mark.real_only
async def test_an_evicting_node_is_refused(redis, keys) -> None:
    # given one server (or one node of the cluster) that evicts when full
    node = (await nodes(redis))[-1]

    async def policy(value: str) -> None:
        args = ("CONFIG", "SET", "maxmemory-policy", value)
        await (redis.execute_command(*args, target_nodes=node) if node else redis.execute_command(*args))

    await policy("allkeys-lru")
    try:
        # when the eviction check runs, then it refuses, naming the policy
        with pytest.raises(RedisMisconfigured, match="allkeys-lru"):
            await preflight.check_eviction(redis)
    finally:
        await policy("noeviction")
    await preflight.check_eviction(redis)
