"""Redis errors reach users as fabric errors that name the cause and the fix."""

import asyncio
import re
import uuid
from pathlib import Path

import pytest

from fabric import Publisher, Worker, WorkerConfig
from fabric.client import connect
from fabric.errors import PermissionDenied
from fabric.events import Tick
from fabric.handler import as_handler
from tests.waiting import eventually
from tests.workers import running

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_acl_rules(namespace: str) -> list[str]:
    line = next(x for x in README.read_text().splitlines() if x.startswith("ACL SETUSER fabric on"))
    rules = line.split()[4:]
    return [r.replace("~fabric:*", f"~{namespace}:*") for r in rules]


def url_for(redis_url: str, user: str, password: str) -> str:
    return re.sub(r"redis://", f"redis://{user}:{password}@", redis_url)


@pytest.fixture
async def acl_user(redis_url):
    admin = connect(redis_url)
    user = f"u{uuid.uuid4().hex[:8]}"
    yield admin, user
    await admin.execute_command("ACL", "DELUSER", user)
    await admin.aclose()


@pytest.mark.real_only
async def test_the_permissions_readme_lists_are_enough_to_publish_and_handle(acl_user, redis_url, keys):
    admin, user = acl_user
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", *readme_acl_rules(keys.ns))
    client = connect(url_for(redis_url, user, "pw"))
    seen: list[str] = []

    async def handle(event: Tick) -> None:
        seen.append(event.event_id)

    worker = Worker(client, as_handler(handle), WorkerConfig(group="g", topics=["tick"], block_ms=50), keys=keys)
    async with Publisher(client, keys=keys) as pub:
        await pub.publish(Tick(symbol="A", bid=1, ask=2))
    try:
        async with running(worker):
            await eventually(lambda: asyncio.sleep(0, result=len(seen) == 1), what="the event handled")
    finally:
        await client.aclose()


@pytest.mark.real_only
async def test_a_missing_key_permission_is_reported_as_permission_denied(acl_user, redis_url, keys):
    admin, user = acl_user
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~elsewhere:*", "+@all")
    client = connect(url_for(redis_url, user, "pw"))
    try:
        async with Publisher(client, keys=keys) as pub:
            with pytest.raises(PermissionDenied, match="Redis permissions"):
                await pub.publish(Tick(symbol="A", bid=1, ask=2))
    finally:
        await client.aclose()


@pytest.mark.parametrize("args", [
    ("XADD", "s:{A}", "*", "type", "Tick", "data", b"\x00\xff\r\n"),
    ("CONFIG GET", "maxmemory"),
    (b"SCRIPT LOAD", "return 1"),
    ("EVALSHA", "ab" * 20, 2, "k1", "k2", 0, 1.5, -7),
])
def test_fabric_packs_commands_byte_for_byte_as_redis_py_does(args):
    from redis.asyncio.connection import Connection

    from fabric.client import FastConnection

    assert b"".join(FastConnection().pack_command(*args)) == b"".join(Connection().pack_command(*args))


async def test_a_cluster_client_runs_more_concurrent_commands_than_connections_each_once(redis_cluster, keys) -> None:
    # given a fresh cluster client allowed two connections per node (nothing sent yet: no slot map)
    client = connect(redis_cluster.url, max_connections=2)
    counter = f"{keys.ns}:count"
    try:
        async def piped() -> list[int]:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(5):
                    pipe.incr(counter)
                return await pipe.execute()

        # when 200 increments are sent at once, then 200 more beside 20 pipelines of 5
        first = await asyncio.gather(*(client.incr(counter) for _ in range(200)), return_exceptions=True)
        second = await asyncio.gather(*(client.incr(counter) for _ in range(200)),
                                      *(piped() for _ in range(20)), return_exceptions=True)
        # then none fails (redis-py alone races in its start-up and raises MaxConnectionsError, and a pipeline
        # meeting that limit closes the connections of the commands in flight)
        assert [r for r in first + second if isinstance(r, BaseException)] == []
        # and each ran exactly once
        assert int(await client.get(counter)) == 500
    finally:
        await client.delete(counter)
        await client.aclose()
