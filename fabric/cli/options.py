"""What every command shares: the app, its common options, exit codes, and the one place errors become a line."""

from __future__ import annotations

import enum
import importlib
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import uvloop
from redis.asyncio import Redis

from fabric.client import connect, translated
from fabric.config import FabricConfig, load_config
from fabric.embedded import redis_url
from fabric.errors import (
    AuthenticationFailed,
    ConfigError,
    FabricError,
    HandlerLoadError,
    NotFound,
    PermissionDenied,
    RedisUnavailable,
)
from fabric.keys import Keys, check_name

__all__ = [
    "ConfigFile", "Exit", "Imports", "Json", "Namespace", "RedisUrl", "Settings", "app", "breaker_app", "dlq_app",
    "example", "fail", "import_modules", "reported", "run", "settings",
]

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="fabric: typed events on Redis Streams.")
dlq_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="Dead letters: list, show, replay to their origin stream, purge.")
app.add_typer(dlq_app, name="dlq")
breaker_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Circuit breakers: list, show, force open or closed, reset.")
app.add_typer(breaker_app, name="breaker")


class Exit(enum.IntEnum):
    """The exit codes of every command (README lists them)."""

    OK = 0
    FAILED = 1
    """A fabric error not listed below; ``fabric health``: not healthy."""
    USAGE = 2
    """Bad arguments, a bad config file, a handler that cannot be loaded (click's own usage errors exit 2)."""
    UNREACHABLE = 3
    """Redis cannot be reached (refused, reset, timed out), or an embedded one cannot be started."""
    AUTH = 4
    """Wrong password or user, or the ACL user lacks a permission."""
    NOT_FOUND = 5
    """A stream, group, consumer, dead letter or breaker named does not exist."""
    PARTIAL = 6
    """Some of the work was done and some was not (bad input lines, a replay cut short); the output says which."""


_CODES: tuple[tuple[type[FabricError], Exit], ...] = (
    (ConfigError, Exit.USAGE),
    (HandlerLoadError, Exit.USAGE),
    (RedisUnavailable, Exit.UNREACHABLE),
    (AuthenticationFailed, Exit.AUTH),
    (PermissionDenied, Exit.AUTH),
    (NotFound, Exit.NOT_FOUND),
)

RedisUrl = Annotated[str | None, typer.Option("--redis-url", envvar="FABRIC_REDIS_URL",
                                              help="redis://[:password@]host:port/db; default localhost:6379 "
                                                   "(publish and worker start a private redis-server when "
                                                   "none answers there).")]
Namespace = Annotated[str | None, typer.Option("--namespace", envvar="FABRIC_NAMESPACE",
                                                help="Key prefix (default: the config file's, else fabric).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", envvar="FABRIC_CONFIG",
                                                 help="A config/*.toml: Redis URL, namespace, publisher, retention, "
                                                      "workers.")]
Imports = Annotated[list[str] | None, typer.Option("--import", metavar="MODULE",
                                                   help="Import a module that defines event types.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_debug = False


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")] = False,
          ) -> None:
    global _debug
    _debug = debug


def example(*lines: str) -> str:
    """An epilog for ``--help`` that shows how the command is used."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def fail(message: str, code: Exit = Exit.FAILED) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(int(code))


def exit_code(exc: FabricError) -> Exit:
    """The exit code for a fabric error."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return Exit.FAILED


@contextmanager
def reported() -> Iterator[None]:
    """Turn errors raised in the block into one line and an exit code (a traceback only with ``--debug``)."""
    try:
        yield
    except FabricError as exc:
        fail(str(exc), exit_code(exc))
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        fail("interrupted", Exit.FAILED)
    except Exception as exc:
        if _debug:
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (rerun with fabric --debug for the traceback, "
             "and please report it)")


class Settings:
    """The config file (or defaults), with the command line's URL and namespace taking precedence."""

    def __init__(self, config: FabricConfig, url: str | None, ns: str) -> None:
        self.config = config
        self.url = url
        self.keys = Keys(ns)


def settings(config_file: Path | None, url: str | None, namespace: str | None) -> Settings:
    """Load and check the settings every command starts from; a problem exits 2 with the field and reason."""
    with reported():
        config = load_config(config_file) if config_file else FabricConfig()
        ns = config.namespace if namespace is None else namespace  # an empty one is an error, not the default
        try:
            check_name("namespace", ns)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return Settings(config, url or config.redis_url, ns)


def import_modules(modules: list[str] | None) -> None:
    """Import the modules named by ``--import`` (event types, handlers); a failure exits 2 naming the module."""
    for name in modules or ():
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module may fail in any way while it runs; say which and why
            fail(f"cannot import {name!r} ({type(exc).__name__}: {exc}): check the module, and PYTHONPATH",
                 Exit.USAGE)


def run(main: Callable[[str], Coroutine[Any, Any, T]], url: str | None, *, embedded: bool = True) -> T:
    """Run ``main(url)`` on uvloop against the Redis ``url`` names (or, with ``embedded`` and no URL given and none
    on localhost:6379, a private one for the duration), reporting errors as one line."""
    with reported():
        if not embedded:
            from fabric.client import resolve_url

            return uvloop.run(main(resolve_url(url)))
        with redis_url(url) as resolved:
            return uvloop.run(main(resolved))
    raise AssertionError("unreachable")  # reported() exits on every error


def on_redis(url: str | None, work: Callable[[Redis], Awaitable[T]]) -> T:
    """Run ``work(client)`` against the Redis ``url`` names (never a private one: the commands that look at what
    is there would find it empty), reporting errors as one line."""

    async def main(resolved: str) -> T:
        client = connect(resolved)
        try:
            with translated(resolved):
                return await work(client)
        finally:
            await client.aclose()

    return run(main, url, embedded=False)
