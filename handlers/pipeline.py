"""The whole pipeline in one process, handlers called directly: the "single-process mode".

    ticks -> bars -> indicators -> strategy -> risk -> broker -> portfolio
                                                  \\-> alerts     \\-> audit (orders and fills)

``STAGES`` is the table the wiring follows too: stage name, input event type, and the factory's result; every
output goes to the stages whose input is its type, as it would through fabric's topics. Each input event runs
through to the end before the next starts, and outputs are stamped as a worker stamps them (correlation id,
causation id, producer), so a chain can be followed here as on Redis. A run over ticks (``handlers.feed``) and a
run over bars from a file (``handlers.bars.read_bars``) differ only in where they enter the table.

The final portfolio is ``combine`` of each sleeve's latest ``PortfolioUpdate``, positions marked at the last
close of each symbol's trading timeframe: both can be read back from the streams after a run on fabric, and
must equal what ``run_pipeline`` returns.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from fabric.events import Bar, Event, Features, Fill, Order, PortfolioUpdate, Signal, Tick
from handlers.audit import audit
from handlers.bars import BarState, make_bar_handler
from handlers.broker import Costs, Exchange, make_broker_handler, paper_exchange
from handlers.indicators import IndicatorState, make_indicator_handler
from handlers.portfolio import Allocation, Holding, combine, make_portfolio_handler
from handlers.risk import RiskLimits, Sleeve, make_risk_handler
from handlers.state import MemoryStore, Store
from handlers.strategy import StrategyParams, StrategyState, make_strategy_handler

__all__ = [
    "PipelineConfig", "PipelineResult", "Stage", "StoreFactory", "contents", "memory_stores", "run_pipeline", "stages",
]

Handler = Callable[[Any], Awaitable[Event | Sequence[Event] | None]]
S = TypeVar("S", bound=msgspec.Struct)


class StoreFactory(Protocol):
    """Makes the store a stage keeps its per-symbol state in: (stage name, state type) -> store."""

    def __call__(self, stage: str, state_type: type[S], /) -> Store[S]: ...


def memory_stores(stage: str, state_type: type[S]) -> Store[S]:
    """A ``MemoryStore`` for every stage: the single-process mode's state."""
    return MemoryStore(state_type)


class PipelineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything that decides what the pipeline does with its input."""

    timeframe: str = "1s"
    initial_cash: float = 1_000_000.0
    limits: RiskLimits = RiskLimits()
    costs: Costs = Costs()
    strategy: StrategyParams = StrategyParams()


@dataclass(frozen=True)
class Stage:
    """One row of the table: a stage's name, the event type it takes, and its handler."""

    name: str
    takes: type[Event]
    handler: Handler


def stages(config: PipelineConfig, allocation: Allocation, exchange: Exchange | None = None,
           store: StoreFactory = memory_stores) -> list[Stage]:
    """The pipeline's table, with state in ``store``'s stores (in memory unless given) and the paper exchange
    unless one is given."""
    return [
        Stage("bars", Tick, make_bar_handler(store("bars", BarState), (config.timeframe,))),
        Stage("indicators", Bar, make_indicator_handler(store("indicators", IndicatorState), config.timeframe)),
        Stage("strategy", Features, make_strategy_handler(store("strategy", StrategyState), config.strategy)),
        Stage("risk", Signal, make_risk_handler(store("risk", Sleeve), allocation, config.limits, config.costs)),
        Stage("broker", Order, make_broker_handler(exchange or paper_exchange(config.costs))),
        Stage("audit", Order, audit),
        Stage("audit", Fill, audit),
        Stage("portfolio", Fill, make_portfolio_handler(store("portfolio", Holding), allocation)),
    ]


class PipelineResult(msgspec.Struct, frozen=True):
    """What a run ends with: the final portfolio, each sleeve's latest update, and events per topic."""

    portfolio: PortfolioUpdate
    sleeves: dict[str, PortfolioUpdate]
    counts: dict[str, int]


def _stamped(outputs: Event | Sequence[Event] | None, cause: Event, producer: str) -> list[Event]:
    """Outputs as a worker publishes them: in the cause's chain, naming their producer."""
    if outputs is None:
        return []
    return [msgspec.structs.replace(o, correlation_id=cause.root_id, causation_id=cause.event_id, producer=producer)
            for o in ([outputs] if isinstance(outputs, Event) else outputs)]


async def run_pipeline(events: Iterable[Tick] | Iterable[Bar], symbols: Iterable[str],
                       config: PipelineConfig | None = None, exchange: Exchange | None = None,
                       store: StoreFactory = memory_stores,
                       wrap: Callable[[Stage], Stage] | None = None) -> PipelineResult:
    """Run ticks or bars (each symbol's in order) through every stage; the capital is split over ``symbols``.

    ``store`` makes the stages' state stores; ``wrap``, if given, replaces each stage (a test's fault injection).
    """
    config = config or PipelineConfig()
    allocation = Allocation(initial_cash=config.initial_cash, symbols=tuple(sorted(set(symbols))))
    routes: dict[type[Event], list[Stage]] = {}
    for stage in stages(config, allocation, exchange, store):
        routes.setdefault(stage.takes, []).append(wrap(stage) if wrap else stage)
    counts: Counter[str] = Counter()
    sleeves: dict[str, PortfolioUpdate] = {}
    marks: dict[str, float] = {}
    for event in events:
        todo: deque[Event] = deque([event])
        while todo:
            e = todo.popleft()
            counts[e.default_topic] += 1
            if isinstance(e, PortfolioUpdate) and e.symbol is not None:
                sleeves[e.symbol] = e
            elif isinstance(e, Bar) and e.timeframe == config.timeframe:
                marks[e.symbol] = e.close
            for stage in routes.get(type(e), []):
                todo.extend(_stamped(await stage.handler(e), e, f"handlers.{stage.name}"))
    portfolio = combine(sleeves.values(), allocation, marks)
    return PipelineResult(portfolio=portfolio, sleeves=dict(sorted(sleeves.items())),
                          counts=dict(sorted(counts.items())))


def contents(event: Event) -> bytes:
    """An event's contents without the envelope fabric fills in (id, time, producer, chain): equal contents,
    equal data."""
    bare = msgspec.structs.replace(event, event_id="", ts_ns=0, producer="", correlation_id="", causation_id="")
    return msgspec.msgpack.encode(bare)
