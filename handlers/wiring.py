"""The pipeline's stages as ``MODULE:FUNCTION`` handlers for ``fabric worker``, their state kept in Redis.

    fabric worker --group bars --topic tick --handler handlers.wiring:bars

Each function here (``bars``, ``indicators``, ``strategy``, ``risk``, ``broker``, ``audit``, ``portfolio``) is
the stage of ``handlers.pipeline.stages`` of that name, built on its first call over ``RedisStore``s that
share one client. Built lazily, because a handler module is imported before the worker's event loop runs
and a Redis client belongs to the loop that first uses it. Read from the environment at that first call:

- ``FABRIC_REDIS_URL``: the Redis holding the state (default ``redis://localhost:6379/0``), the same one the
  worker reads: state and streams of a symbol share a slot, and a worker restarted anywhere finds both;
- ``FABRIC_NAMESPACE``: the namespace of the state keys (default ``fabric``); set it to the worker's
  ``--namespace``, which a handler module cannot see;
- ``FABRIC_PIPELINE_SYMBOLS``: the symbols the capital is split over, comma-separated (required: risk and
  portfolio size each symbol's sleeve from it, and every worker of the pipeline must agree on it);
- ``FABRIC_PIPELINE_CONFIG``: optionally, a TOML file of ``PipelineConfig`` fields (timeframe, initial_cash,
  [limits], [costs], [strategy]); the defaults otherwise.

The state survives a worker restart because it is in Redis, not in the process; ``handlers.state`` says
why a redelivered entry still publishes what the dead worker applied but never published. The broker's paper
exchange is down while ``handlers.broker.outage_key`` exists in that Redis (``fabric demo --chaos`` sets it).
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import msgspec
from redis.asyncio import Redis

from fabric.client import connect
from fabric.events import Event
from handlers.broker import RemoteOutage, outage_key, paper_exchange
from handlers.pipeline import Handler, PipelineConfig, stages
from handlers.portfolio import Allocation
from handlers.state import RedisStore, Store

__all__ = [
    "CONFIG_ENV", "NAMESPACE_ENV", "SYMBOLS_ENV", "Wiring", "audit", "bars", "broker", "close", "indicators",
    "portfolio", "risk", "strategy", "wiring",
]

NAMESPACE_ENV = "FABRIC_NAMESPACE"
SYMBOLS_ENV = "FABRIC_PIPELINE_SYMBOLS"
CONFIG_ENV = "FABRIC_PIPELINE_CONFIG"
DEFAULT_NAMESPACE = "fabric"

S = TypeVar("S", bound=msgspec.Struct)
Outputs = Event | Sequence[Event] | None


class Wiring(NamedTuple):
    """The stages built over Redis stores, by name, and the client the stores share."""

    client: Redis
    stages: dict[str, Handler]


def _config() -> PipelineConfig:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return PipelineConfig()
    try:
        return msgspec.convert(tomllib.loads(Path(path).read_text()), PipelineConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{CONFIG_ENV}={path}: {exc}: point it at a TOML file of PipelineConfig fields") from exc


def _symbols() -> tuple[str, ...]:
    symbols = tuple(sorted({s.strip() for s in os.environ.get(SYMBOLS_ENV, "").split(",") if s.strip()}))
    if not symbols:
        raise ValueError(f"{SYMBOLS_ENV} is not set: set it to the pipeline's symbols, comma-separated "
                         "(for example SYM000,SYM001), the same for every worker of the pipeline")
    return symbols


@functools.cache
def wiring() -> Wiring:
    """Every stage over Redis stores, built from the environment on the first call and kept."""
    config = _config()
    allocation = Allocation(initial_cash=config.initial_cash, symbols=_symbols())
    client = connect()
    namespace = os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE

    def redis_stores(stage: str, state_type: type[S]) -> Store[S]:
        return RedisStore(client, namespace, stage, state_type)

    exchange = RemoteOutage(paper_exchange(config.costs), client, outage_key(namespace))
    return Wiring(client, {s.name: s.handler for s in stages(config, allocation, exchange, redis_stores)})


async def close() -> None:
    """Close the stores' client and forget the built stages (the next call builds them again)."""
    if wiring.cache_info().currsize:
        client = wiring().client
        wiring.cache_clear()
        await client.aclose()


async def bars(event: Event) -> Outputs:
    """Ticks to bars."""
    return await wiring().stages["bars"](event)


async def indicators(event: Event) -> Outputs:
    """Bars to features."""
    return await wiring().stages["indicators"](event)


async def strategy(event: Event) -> Outputs:
    """Features to signals."""
    return await wiring().stages["strategy"](event)


async def risk(event: Event) -> Outputs:
    """Signals to orders or alerts."""
    return await wiring().stages["risk"](event)


async def broker(event: Event) -> Outputs:
    """Orders to fills, on the paper exchange."""
    return await wiring().stages["broker"](event)


async def audit(event: Event) -> Outputs:
    """Orders and fills to audit entries."""
    return await wiring().stages["audit"](event)


async def portfolio(event: Event) -> Outputs:
    """Fills to portfolio updates."""
    return await wiring().stages["portfolio"](event)
