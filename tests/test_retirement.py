"""Consumers left by dead processes are retired once idle and holding nothing, never while they hold entries."""

from __future__ import annotations

from typing import Any

import pytest

from fabric.keys import Keys, Priority
from fabric.retirement import retire_idle_consumers
from tests.waiting import eventually

pytestmark = pytest.mark.real_only  # idle times are the server's clock; fakeredis does not age consumers

GROUP = "g"


async def consumers(redis: Any, stream: str) -> dict[str, int]:
    """Consumer name -> pending count."""
    return {c["name"].decode(): c["pending"] for c in await redis.xinfo_consumers(stream, GROUP)}


async def idle_ms(redis: Any, stream: str, name: str) -> int:
    infos = {c["name"].decode(): c["idle"] for c in await redis.xinfo_consumers(stream, GROUP)}
    return int(infos[name])


async def test_an_idle_consumer_with_nothing_pending_is_retired(redis, keys: Keys) -> None:
    # Given a consumer "dead" that read an entry and acked it, then went quiet
    stream = keys.stream("tick", Priority.NORMAL, "A")
    entry = await redis.xadd(stream, {"f": "v"})
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "dead", {stream: ">"})
    await redis.xack(stream, GROUP, entry)
    await eventually(lambda: _idle_at_least(redis, stream, "dead", 50), what="dead idle 50 ms")

    # When the group is swept with a 50 ms idle limit
    retired = await retire_idle_consumers(redis, [stream], GROUP, min_idle_ms=50)

    # Then it is gone from the group
    assert retired == {stream: ["dead"]}
    assert await consumers(redis, stream) == {}


async def test_a_consumer_holding_pending_entries_is_kept_however_idle(redis, keys: Keys) -> None:
    # Given a consumer "dead" holding an unacknowledged entry, idle past the limit
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xadd(stream, {"f": "v"})
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, "dead", {stream: ">"})
    await eventually(lambda: _idle_at_least(redis, stream, "dead", 50), what="dead idle 50 ms")

    # When the group is swept
    retired = await retire_idle_consumers(redis, [stream], GROUP, min_idle_ms=50)

    # Then it stays, with its entry still pending (deleting it would orphan the entry)
    assert retired == {}
    assert await consumers(redis, stream) == {"dead": 1}


async def test_a_recently_active_consumer_and_the_callers_own_name_are_kept(redis, keys: Keys) -> None:
    # Given two consumers with nothing pending: "me" (the caller) idle long, and "busy" that just read
    stream = keys.stream("tick", Priority.NORMAL, "A")
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, GROUP, "me")
    await eventually(lambda: _idle_at_least(redis, stream, "me", 50), what="me idle 50 ms")
    await redis.xgroup_createconsumer(stream, GROUP, "busy")

    # When "me" sweeps with a limit "busy" cannot have reached
    retired = await retire_idle_consumers(redis, [stream], GROUP, min_idle_ms=60_000, keep="me")
    retired_keep = await retire_idle_consumers(redis, [stream], GROUP, min_idle_ms=50, keep="me")

    # Then the long limit removes neither, and the short one spares "me"
    assert retired == {}
    assert "me" in await consumers(redis, stream)
    assert "me" not in retired_keep.get(stream, [])


async def test_a_missing_stream_or_group_is_skipped(redis, keys: Keys) -> None:
    # Given a stream key that does not exist and a stream without the group
    missing = keys.stream("tick", Priority.NORMAL, "GONE")
    bare = keys.stream("tick", Priority.NORMAL, "BARE")
    await redis.xadd(bare, {"f": "v"})

    # When both are swept, Then nothing is retired and nothing raises
    assert await retire_idle_consumers(redis, [missing, bare], GROUP, min_idle_ms=0) == {}


async def _idle_at_least(redis: Any, stream: str, name: str, ms: int) -> bool:
    return await idle_ms(redis, stream, name) >= ms
