"""The ``fabric`` command as a user runs it: a subprocess, stdin, exit codes, and what it says on stderr."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from fabric.cli.options import Exit
from fabric.codec import decode_fields
from fabric.events import Tick
from fabric.keys import Keys
from tests.backends import on_every_node, with_user
from tests.conftest import ROOT, fabric_cmd
from tests.fixtures.handlers import subprocess_env

pytestmark = pytest.mark.real_only

UNREACHABLE = "redis://127.0.0.1:1/0"
DEADLINE_S = 60.0
"""A deadline for one command to finish, so a hang fails the test instead of stalling it."""


async def fabric(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``fabric ARGS`` to completion in a subprocess."""
    return await asyncio.to_thread(
        subprocess.run, fabric_cmd(*args), cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
        timeout=DEADLINE_S,
    )


def tick_line(symbol: str = "A") -> tuple[str, str]:
    """A good JSON line and the event id it carries."""
    event = Tick(symbol=symbol, bid=1.0, ask=2.0)
    return msgspec.json.encode(event).decode(), event.event_id


async def published_ids(redis: Any, keys: Keys, topic: str = "tick") -> list[str]:
    """Event ids of every entry in the topic's streams."""
    ids = []
    for stream in sorted(await redis.smembers(keys.topic_registry(topic))):
        ids += [decode_fields(fields).event_id for _, fields in await redis.xrange(stream)]
    return ids


def assert_one_line_error(result: subprocess.CompletedProcess[str], *hints: str) -> str:
    """Non-zero exit, no traceback, exactly one ``error:`` line, last on stderr, naming a fix; return it."""
    err = result.stderr
    assert result.returncode != 0, f"exit 0 for a failure; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one error line, last on stderr:\n{err}"
    assert any(h in errors[0] for h in hints), f"no hint ({' / '.join(hints)}) in: {errors[0]}"
    return errors[0]


# ---- publish -----------------------------------------------------------------------------------------------


async def test_publish_reports_bad_lines_by_number_publishes_the_good_and_exits_1(redis, redis_url, keys) -> None:
    # Given 5 lines: 3 good, line 2 not JSON, line 4 with a string where a float belongs
    good = [tick_line(s) for s in ("A", "B", "C")]
    wrong_type = '{"type": "Tick", "symbol": "D", "bid": "one", "ask": 2.0}'
    stdin = "\n".join([good[0][0], "this is not json", good[1][0], wrong_type, good[2][0]]) + "\n"

    # When they are piped to `fabric publish`
    result = await fabric("publish", "--topic", "tick", "--namespace", keys.ns, "--redis-url", redis_url,
                          env=subprocess_env(redis_url, keys.ns), stdin=stdin)

    # Then it publishes the 3 good ones, names the 2 bad ones by line number, and exits 6 (partly done)
    assert result.returncode == 6, result.stderr
    assert "published 3 events" in result.stdout
    assert "Traceback" not in result.stderr
    bad = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(bad) == 2 and "line 2" in bad[0] and "line 4" in bad[1], result.stderr
    assert not any(f"line {n}" in result.stderr for n in (1, 3, 5)), result.stderr
    assert sorted(await published_ids(redis, keys)) == sorted(i for _, i in good)


async def test_publish_of_good_lines_exits_0(redis, redis_url, keys) -> None:
    good = [tick_line(s) for s in ("A", "B", "C")]
    result = await fabric("publish", "--topic", "tick", "--namespace", keys.ns, "--redis-url", redis_url,
                          env=subprocess_env(redis_url, keys.ns), stdin="".join(line + "\n" for line, _ in good))
    assert result.returncode == 0, result.stderr
    assert "published 3 events" in result.stdout
    assert "error" not in result.stderr
    assert sorted(await published_ids(redis, keys)) == sorted(i for _, i in good)


async def test_publish_uses_fabric_redis_url_when_no_option_is_given(redis, redis_url, keys) -> None:
    # Given FABRIC_REDIS_URL naming the session server (not the default localhost:6379)
    good = [tick_line(s) for s in ("A", "B")]
    env = subprocess_env(redis_url, keys.ns, FABRIC_REDIS_URL=redis_url)

    # When `fabric publish` runs without --redis-url
    result = await fabric("publish", "--topic", "tick", "--namespace", keys.ns, env=env,
                          stdin="".join(line + "\n" for line, _ in good))

    # Then the events land on the server the variable names
    assert result.returncode == 0, result.stderr
    assert "published 2 events" in result.stdout
    assert sorted(await published_ids(redis, keys)) == sorted(i for _, i in good)


async def test_publish_takes_url_and_namespace_from_a_config_file(redis, redis_url, keys, tmp_path) -> None:
    # given a config file naming the server and the namespace, and no --redis-url or --namespace
    config = tmp_path / "fabric.toml"
    config.write_text(f'redis_url = "{redis_url}"\nnamespace = "{keys.ns}"\n')
    line, event_id = tick_line()
    # when publishing with --config
    result = await fabric("publish", "--topic", "tick", "--config", str(config),
                          env=subprocess_env(redis_url, keys.ns), stdin=line + "\n")
    # then the event lands in that namespace on that server
    assert result.returncode == 0, result.stderr
    assert await published_ids(redis, keys) == [event_id]


async def test_a_bad_config_file_is_one_line_error_naming_the_field(redis_url, keys, tmp_path) -> None:
    config = tmp_path / "fabric.toml"
    config.write_text("[publisher]\nmax_batch = 0\n")
    result = await fabric(*worker_args(keys.ns, redis_url), "--config", str(config),
                          env=subprocess_env(redis_url, keys.ns))
    assert_one_line_error(result, "max_batch")
    assert result.returncode == Exit.USAGE


# ---- errors: one line, a hint, no traceback -------------------------------------------------------------


@pytest.fixture
async def acl_user(redis: Any) -> AsyncIterator[str]:
    """A user on the session server (on every node of a cluster) whose password is 'right'."""
    name = f"u_{uuid.uuid4().hex[:8]}"
    await on_every_node(redis, "ACL", "SETUSER", name, "on", ">right", "~*", "+@all")
    yield name
    await on_every_node(redis, "ACL", "DELUSER", name)


def worker_args(ns: str, url: str, handler: str = "tests.fixtures.handlers:record") -> list[str]:
    return ["worker", handler, "--topic", "tick", "--group", "g", "--namespace", ns, "--redis-url", url,
            "--block-ms", "100"]


def publish_args(ns: str, url: str) -> list[str]:
    return ["publish", "--topic", "tick", "--namespace", ns, "--redis-url", url]


UNREACHABLE_HINTS = ("is redis-server running", "--redis-url", "FABRIC_REDIS_URL")


async def test_publish_to_unreachable_redis_is_one_line_error(redis_url, keys) -> None:
    result = await fabric(*publish_args(keys.ns, UNREACHABLE), env=subprocess_env(redis_url, keys.ns),
                          stdin=tick_line()[0] + "\n")
    assert_one_line_error(result, *UNREACHABLE_HINTS)
    assert result.returncode == Exit.UNREACHABLE


async def test_worker_on_unreachable_redis_is_one_line_error(redis_url, keys) -> None:
    result = await fabric(*worker_args(keys.ns, UNREACHABLE), env=subprocess_env(redis_url, keys.ns))
    assert_one_line_error(result, *UNREACHABLE_HINTS)
    assert result.returncode == Exit.UNREACHABLE


@pytest.mark.parametrize("verb", ["publish", "worker"])
async def test_wrong_password_is_one_line_error_without_the_password(redis_url, keys, acl_user, verb) -> None:
    # Given a URL with a real user and a wrong password
    secret = f"wrong-{uuid.uuid4().hex[:8]}"
    url = with_user(redis_url, acl_user, secret)
    args = publish_args(keys.ns, url) if verb == "publish" else worker_args(keys.ns, url)

    # When the command connects
    result = await fabric(*args, env=subprocess_env(redis_url, keys.ns), stdin=tick_line()[0] + "\n")

    # Then it says the credentials were refused and how to fix them, and never echoes the password
    assert_one_line_error(result, "password")
    assert result.returncode == Exit.AUTH
    assert secret not in result.stderr + result.stdout


async def test_worker_with_unimportable_handler_is_one_line_error(redis_url, keys) -> None:
    result = await fabric(*worker_args(keys.ns, redis_url, "no.such.module:fn"), env=subprocess_env(redis_url, keys.ns))
    line = assert_one_line_error(result, "PYTHONPATH", "current directory", "working directory", "sys.path")
    assert "no.such.module" in line
    assert result.returncode == Exit.USAGE


async def test_worker_with_a_sync_handler_is_one_line_error(redis_url, keys) -> None:
    result = await fabric(*worker_args(keys.ns, redis_url, "tests.fixtures.handlers:not_async"),
                          env=subprocess_env(redis_url, keys.ns))
    assert_one_line_error(result, "async def")
    assert result.returncode == Exit.USAGE


async def test_publish_with_unknown_priority_is_one_line_error(redis_url, keys) -> None:
    result = await fabric(*publish_args(keys.ns, redis_url), "--priority", "urgent",
                          env=subprocess_env(redis_url, keys.ns), stdin=tick_line()[0] + "\n")
    line = assert_one_line_error(result, "low, normal, high, critical")
    assert "urgent" in line
    assert result.returncode == Exit.USAGE


async def test_an_invalid_namespace_is_one_line_error(redis_url, keys) -> None:
    result = await fabric("publish", "--topic", "tick", "--namespace", "bad:ns", "--redis-url", redis_url,
                          env=subprocess_env(redis_url, keys.ns), stdin="")
    assert_one_line_error(result, "namespace")
    assert result.returncode == Exit.USAGE


async def test_an_empty_namespace_is_refused_not_taken_for_the_default(redis_url, keys) -> None:
    result = await fabric("publish", "--topic", "tick", "--namespace", "", "--redis-url", redis_url,
                          env=subprocess_env(redis_url, keys.ns), stdin="")
    assert_one_line_error(result, "namespace")
    assert result.returncode == Exit.USAGE


async def test_a_malformed_redis_url_is_bad_usage(redis_url, keys) -> None:
    result = await fabric(*publish_args(keys.ns, "foo://x"), env=subprocess_env(redis_url, keys.ns), stdin="")
    assert_one_line_error(result, "redis://")
    assert result.returncode == Exit.USAGE
