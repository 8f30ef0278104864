"""``fabric breaker list | show NAME | open NAME | close NAME | reset NAME``: the fleet's shared circuit breakers.

``list`` and ``show`` read each breaker's state in Redis without changing it; ``open``, ``close`` and ``reset``
force one through ``breaker.lua``, with a reason recorded in the transition's ``BreakerStateChanged`` event, and
every running worker follows within a second (``fabric.breaker.POLL_MS``; the pub/sub notice usually makes it a
few milliseconds). No command starts a private Redis: an empty one has no breakers. A NAME that no process has
used exits 5.
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from fabric.breaker import OPEN, BreakerInfo, BreakerState, describe, force_breaker, list_breakers
from fabric.cli.options import ConfigFile, Json, Namespace, RedisUrl, breaker_app, example, on_redis, settings
from fabric.cli.output import age, emit_json, table, timestamp

__all__ = ["close", "list_all", "open_", "reset", "show"]

T = TypeVar("T")

Name = Annotated[str, typer.Argument(metavar="NAME", help="The breaker, as `fabric breaker list` names it.")]
Reason = Annotated[str | None, typer.Option(metavar="TEXT", help="Why: recorded in the BreakerStateChanged event "
                                                                  "(default: the command, user and host).")]


def _state(info: BreakerInfo) -> str:
    return info.state + (" (forced)" if info.forced else "")


@breaker_app.command("list", epilog=example("fabric breaker list", "fabric breaker list --config config/x.toml "
                                                                    "--json"))
def list_all(json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None,
             config_file: ConfigFile = None) -> None:
    """List the breakers in use in the namespace: state, for how long, failure counts, the latest transition.

    Window counts cover the --config file's [breakers.NAME] window_ms, else the default 10 s."""
    s = settings(config_file, redis_url, namespace)
    infos = on_redis(s.url, lambda client: list_breakers(client, s.keys, s.config.breakers))
    if json:
        emit_json(infos)
        return
    table(["name", "state", "for", "consecutive", "window calls", "window failures", "last transition"],
          [[i.name, _state(i), age(i.age_ms), i.consecutive_failures, i.window_calls, i.window_failures,
            f"{i.transitions[0].new_state}: {i.transitions[0].reason}" if i.transitions else "-"] for i in infos],
          empty="(no breakers: a worker with breakers registers them when it starts)")


def _show_text(info: BreakerInfo) -> None:
    since = "-" if info.since_ms is None else f"{timestamp(info.since_ms)} ({age(info.age_ms)} ago)"
    rows = [("name", info.name), ("state", _state(info)), ("since", since),
            ("consecutive failures", f"{info.consecutive_failures:,}"),
            (f"window ({age(info.window_ms)})", f"{info.window_calls:,} calls, {info.window_failures:,} failed"),
            ("half-open trials", f"{info.trials:,} admitted, {info.successes:,} succeeded"),
            ("transitions so far", f"{info.generation:,}")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name.ljust(width)}  {value}")
    typer.echo("")
    table(["time", "from", "to", "reason"],
          [[timestamp(t.time_ms), t.old_state, t.new_state, t.reason] for t in info.transitions],
          empty="(no transitions recorded)")


@breaker_app.command(epilog=example("fabric breaker show exchange", "fabric breaker show exchange --json"))
def show(name: Name, json: Json = False, redis_url: RedisUrl = None, namespace: Namespace = None,
         config_file: ConfigFile = None) -> None:
    """Show one breaker: its state and since when, its failure counts, and its latest transitions with their
    reasons. An unknown NAME exits 5."""
    s = settings(config_file, redis_url, namespace)
    info = on_redis(s.url, lambda client: describe(client, s.keys, name, s.config.breakers.get(name)))
    if json:
        emit_json(info)
    else:
        _show_text(info)


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the password database
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _force(name: str, target: str, reason: str, json: bool, redis_url: str | None, namespace: str | None,
           config_file: Path | None) -> None:
    """Force the breaker, then print its new state in one line (or JSON)."""
    s = settings(config_file, redis_url, namespace)
    state: BreakerState = on_redis(s.url, lambda client: force_breaker(client, s.keys, name, target, reason))
    if json:
        emit_json({"name": name, "state": state.state, "forced": state.forced, "generation": state.generation,
                   "reason": reason})
    elif state.state == OPEN and state.forced:
        typer.echo(f"{name}: {OPEN} (forced: no calls until `fabric breaker close {name}`)")
    else:
        typer.echo(f"{name}: {state.state}" + (" (counts cleared)" if target == "reset" else ""))


@breaker_app.command("open", epilog=example("fabric breaker open exchange",
                                            "fabric breaker open exchange --reason 'exchange maintenance' --json"))
def open_(name: Name, reason: Reason = None, json: Json = False, redis_url: RedisUrl = None,
          namespace: Namespace = None, config_file: ConfigFile = None) -> None:
    """Force a breaker open: every worker it guards stops reading and calling within a second, until
    `fabric breaker close NAME` (no trial calls meanwhile). An unknown NAME exits 5."""
    _force(name, "open", reason or f"forced open by fabric breaker open ({_who()})", json, redis_url, namespace,
           config_file)


@breaker_app.command(epilog=example("fabric breaker close exchange",
                                    "fabric breaker close exchange --reason 'maintenance over' --json"))
def close(name: Name, reason: Reason = None, json: Json = False, redis_url: RedisUrl = None,
          namespace: Namespace = None, config_file: ConfigFile = None) -> None:
    """Force a breaker closed (forced open or not): its workers read and call again within a second.
    An unknown NAME exits 5."""
    _force(name, "closed", reason or f"forced closed by fabric breaker close ({_who()})", json, redis_url,
           namespace, config_file)


@breaker_app.command(epilog=example("fabric breaker reset exchange", "fabric breaker reset exchange --json"))
def reset(name: Name, reason: Reason = None, json: Json = False, redis_url: RedisUrl = None,
          namespace: Namespace = None, config_file: ConfigFile = None) -> None:
    """Close a breaker and clear its failure counts (consecutive and the window's). An unknown NAME exits 5."""
    _force(name, "reset", reason or f"reset by fabric breaker reset ({_who()})", json, redis_url, namespace,
           config_file)
