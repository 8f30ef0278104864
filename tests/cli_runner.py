"""Running the CLI in-process through typer's test runner, and Redis set-up around it from plain sync tests
(the CLI starts its own event loop, so these tests are not async)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from typer.testing import CliRunner, Result

from fabric.cli import app
from fabric.client import connect
from fabric.keys import Keys

T = TypeVar("T")


def with_redis(url: str, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(client)`` to completion on a fresh event loop and a client of its own."""

    async def main() -> T:
        client = connect(url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def invoke(url: str, keys: Keys, *args: str, stdin: str | None = None) -> Result:
    """``fabric ARGS --namespace NS --redis-url URL`` through typer's runner."""
    return CliRunner().invoke(app, [*args, "--namespace", keys.ns, "--redis-url", url], input=stdin)


def parsed(result: Result) -> Any:
    """The command's stdout as one JSON document, after checking it exited 0."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return msgspec.json.decode(result.stdout)
