"""``Script.many``: one script run for many (keys, args) at once, on one Redis (a pipeline) and on a cluster (whose
pipeline refuses EVALSHA: concurrent calls, each to its key's node)."""

from __future__ import annotations

import hashlib

import pytest
from redis.exceptions import ResponseError

from fabric.keys import Keys
from fabric.nodes import slot_of
from fabric.scripts import Script


class Inline(Script):
    """A script from a string, for the test (fabric's own come from .lua files)."""

    def __init__(self, source: str) -> None:
        self.name = "inline"
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


INCR_BY = Inline("return redis.call('INCRBY', KEYS[1], ARGV[1])")
FAILS_ON_ZERO = Inline("if ARGV[1] == '0' then return redis.error_reply('ZERO no zero') end return 1")


def counters(keys: Keys, n: int) -> list[str]:
    """Keys under n different hash tags (on a cluster: n slots, spread over the nodes)."""
    return [f"{keys.ns}:{{c{i}}}" for i in range(n)]


async def test_many_returns_each_calls_reply_in_order_across_slots(redis, keys) -> None:
    # given keys in many slots
    names = counters(keys, 20)
    assert len({slot_of(k) for k in names}) == 20

    # when the script runs once per key, one key twice (its calls run in order, as in a pipeline)
    calls = [([k], [i]) for i, k in enumerate(names)] + [([names[0]], [100])]
    replies = await INCR_BY.many(redis, calls)

    # then every call ran once, and its reply is in its place
    assert replies == [*range(20), 100]
    assert int(await redis.get(names[0])) == 100
    assert int(await redis.get(names[19])) == 19


async def test_many_loads_a_script_the_servers_do_not_know(redis, keys) -> None:
    # given servers without the script
    await redis.script_flush()  # (on a cluster: every node)

    # when it runs many times
    replies = await INCR_BY.many(redis, [([k], [1]) for k in counters(keys, 10)])

    # then it was loaded and every call ran once
    assert replies == [1] * 10


async def test_many_raises_an_error_reply_after_every_call_ran(redis, keys) -> None:
    # given calls of which one fails
    calls = [([k], [i]) for i, k in enumerate(counters(keys, 5))]

    # when they run, then the error is raised
    with pytest.raises(ResponseError, match="ZERO"):
        await FAILS_ON_ZERO.many(redis, calls)


async def test_many_can_return_an_error_reply_in_its_calls_place(redis, keys) -> None:
    # given calls over several slots of which one fails
    calls = [([k], [i]) for i, k in enumerate(counters(keys, 5))]

    # when they run with errors returned, then the failed call's error is in its place and the others' replies in
    # theirs
    replies = await FAILS_ON_ZERO.many(redis, calls, errors=True)
    assert isinstance(replies[0], ResponseError) and "ZERO" in str(replies[0])
    assert replies[1:] == [1, 1, 1, 1]


async def test_many_of_nothing_is_nothing(redis) -> None:
    assert await INCR_BY.many(redis, []) == []
