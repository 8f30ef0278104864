"""Typed events: one envelope, the trading pipeline's event types, and the registry of every type.

Schema evolution rule: change an event only by appending fields with defaults. Never rename a field, remove
one, or change its type; readers of the old shape and the new one must both keep working. When a change cannot
follow that rule, define a new event type.

An application defines its own events the same way, with no registration call::

    class Quote(Event):
        symbol: str
        price: float

Subclassing ``Event`` is the registration: every subclass, imported anywhere, is known by its tag (the class
name unless ``tag="..."`` is given), which is what the ``type`` field of a stream entry carries.
"""

from __future__ import annotations

import enum
import itertools
import os
import re
import socket
import time
from typing import Annotated, Any, ClassVar

import msgspec

from fabric.keys import Priority

__all__ = [
    "Action",
    "Alert",
    "Bar",
    "BookLevel",
    "BreakerStateChanged",
    "ComponentStatus",
    "Direction",
    "Event",
    "Features",
    "Fill",
    "Indicator",
    "Liquidation",
    "Order",
    "OrderBook",
    "OrderType",
    "PortfolioUpdate",
    "Position",
    "Prediction",
    "Severity",
    "Side",
    "Signal",
    "Tick",
    "Trade",
    "event_type",
    "event_types",
    "new_event_id",
]

_MASK80 = (1 << 80) - 1


class _IdSource:
    """Time-sortable 128-bit ids: 48 bits of Unix milliseconds, then 80 bits from a per-process random
    start that counts up, so ids are unique across processes and ordered within one."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.base = int.from_bytes(os.urandom(10), "big")
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{time.time_ns() // 1_000_000:012x}{(self.base + next(self.counter)) & _MASK80:020x}"


new_event_id = _IdSource()
os.register_at_fork(after_in_child=new_event_id.reseed)


class _ProducerName:
    """``host:pid`` of this process, recomputed after a fork."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.value = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self) -> str:
        return self.value


_producer_name = _ProducerName()
os.register_at_fork(after_in_child=_producer_name.reset)

_registry: dict[str, type[Event]] = {}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """The envelope every event carries; subclass it to define an event type."""

    default_topic: ClassVar[str] = "event"
    """Topic used when ``publish`` is not given one: the snake_case class name unless set."""
    default_priority: ClassVar[Priority] = Priority.NORMAL
    """Priority used when ``publish`` is not given one."""

    event_id: str = msgspec.field(default_factory=new_event_id)
    """32 hex digits, unique, sortable by creation time (milliseconds first)."""
    ts_ns: int = msgspec.field(default_factory=time.time_ns)
    """When the event was produced, Unix nanoseconds."""
    correlation_id: str = ""
    """The ``event_id`` of the event that started this chain; empty on a root event."""
    causation_id: str = ""
    """The ``event_id`` of the event whose handling produced this one; empty on a root event."""
    producer: str = msgspec.field(default_factory=_producer_name)
    """Who produced the event: ``host:pid`` by default, the handler name for handler outputs."""
    schema_version: int = 1
    """The version of this event type's schema; raise it when appending fields matters to readers."""
    symbol: str | None = None
    """The instrument; events with one go to per-symbol streams."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "default_topic" not in cls.__dict__:
            cls.default_topic = _CAMEL.sub("_", cls.__name__).lower()
        _registry.clear()  # rebuilt on the next lookup, once msgspec has finished the class

    @property
    def root_id(self) -> str:
        """The correlation id this event's outputs carry: its own, or its own id on a root event."""
        return self.correlation_id or self.event_id


def _rebuild() -> None:
    found: dict[str, type[Event]] = {}
    todo = list(Event.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        tag = str(cls.__struct_config__.tag)
        known = found.get(tag)
        if known is not None and known is not cls:
            raise TypeError(
                f"event type {tag!r} is defined twice ({known.__module__}.{known.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__}): give one of them another name or tag=..."
            )
        found[tag] = cls
    _registry.update(found)


def event_type(name: str) -> type[Event] | None:
    """The event class registered under a tag, or None."""
    if not _registry:
        _rebuild()
    return _registry.get(name)


def event_types() -> dict[str, type[Event]]:
    """A copy of the registry: tag → class."""
    if not _registry:
        _rebuild()
    return dict(_registry)


Unit = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]


class Side(enum.Enum):
    """Side of an order, fill, trade or liquidation."""

    BUY = "BUY"
    SELL = "SELL"


class Action(enum.Enum):
    """What a signal recommends."""

    BUY = "BUY"
    SELL = "SELL"
    HOLD = "HOLD"


class Direction(enum.Enum):
    """Where a prediction expects the price to go."""

    UP = "UP"
    DOWN = "DOWN"
    FLAT = "FLAT"


class OrderType(enum.Enum):
    """How an order executes."""

    MARKET = "MARKET"
    LIMIT = "LIMIT"
    STOP = "STOP"


class Severity(enum.Enum):
    """How urgent an alert is."""

    INFO = "INFO"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


class BookLevel(msgspec.Struct, frozen=True, array_like=True):
    """One price level of an order book: ``[price, size]`` on the wire."""

    price: float
    size: NonNegative


class Position(msgspec.Struct, frozen=True, kw_only=True):
    """A holding in a portfolio."""

    quantity: float
    avg_price: float
    market_price: float = 0.0


class Tick(Event, frozen=True, kw_only=True):
    """Top of book: best bid and ask with their sizes."""

    symbol: str
    bid: float
    ask: float
    bid_size: NonNegative = 0.0
    ask_size: NonNegative = 0.0
    exchange: str = ""
    market_ts_ns: int = 0
    """Market time of the quote, Unix nanoseconds (not when the event was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of ticks, from 1 (0: unnumbered); consumers drop repeats."""


class Bar(Event, frozen=True, kw_only=True):
    """OHLCV over one interval (``timeframe`` like ``1s``, ``1m``) starting at ``start_ns``."""

    symbol: str
    timeframe: str
    start_ns: int
    open: float
    high: float
    low: float
    close: float
    volume: NonNegative = 0.0
    trades: int = 0
    seq: int = 0
    """Position in its symbol's sequence of bars of this timeframe, from 1 (0: unnumbered); consumers drop repeats."""


class OrderBook(Event, frozen=True, kw_only=True):
    """A snapshot of book levels, best first on each side."""

    symbol: str
    bids: list[BookLevel] = []
    asks: list[BookLevel] = []


class Trade(Event, frozen=True, kw_only=True):
    """A print on the tape."""

    symbol: str
    price: float
    quantity: Positive
    side: Side | None = None
    trade_id: str = ""


class Liquidation(Event, frozen=True, kw_only=True):
    """A forced close of a position on the venue."""

    symbol: str
    side: Side
    price: float
    quantity: Positive


class Indicator(Event, frozen=True, kw_only=True):
    """One named indicator value (``rsi_14``, ``sma_20``) on a timeframe."""

    symbol: str
    name: str
    value: float
    timeframe: str = ""


class Features(Event, frozen=True, kw_only=True):
    """A feature vector for a model: name → value."""

    symbol: str
    values: dict[str, float]
    timeframe: str = ""
    market_ts_ns: int = 0
    """Market time of the data this event is about, Unix nanoseconds (not when it was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of feature vectors, from 1 (0: unnumbered); consumers drop repeats."""


class Prediction(Event, frozen=True, kw_only=True):
    """A model's view of where the price goes over ``horizon_s``."""

    symbol: str
    direction: Direction
    confidence: Unit
    model: str
    horizon_s: Positive
    target: float | None = None
    stop: float | None = None


class Signal(Event, frozen=True, kw_only=True):
    """A strategy's recommendation with its strength in [0, 1]."""

    symbol: str
    action: Action
    strength: Unit
    strategy: str
    target: float | None = None
    stop: float | None = None
    price: float = 0.0
    """The market price the strategy saw when it decided."""
    market_ts_ns: int = 0
    """Market time of the data this event is about, Unix nanoseconds (not when it was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of signals, from 1 (0: unnumbered); consumers drop repeats."""


class Order(Event, frozen=True, kw_only=True):
    """An instruction to trade; ``price`` for LIMIT, ``stop_price`` for STOP."""

    default_priority: ClassVar[Priority] = Priority.HIGH

    symbol: str
    order_id: str
    side: Side
    quantity: Positive
    order_type: OrderType = OrderType.MARKET
    price: float | None = None
    stop_price: float | None = None
    strategy: str = ""
    mark_price: float = 0.0
    """The market price when the order was made; a paper broker fills a market order there."""
    market_ts_ns: int = 0
    """Market time of the data this event is about, Unix nanoseconds (not when it was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of orders, from 1 (0: unnumbered); consumers drop repeats."""


class Fill(Event, frozen=True, kw_only=True):
    """An execution of (part of) an order."""

    default_priority: ClassVar[Priority] = Priority.HIGH

    symbol: str
    order_id: str
    side: Side
    price: float
    quantity: Positive
    commission: NonNegative = 0.0
    fill_id: str = ""
    market_ts_ns: int = 0
    """Market time of the data this event is about, Unix nanoseconds (not when it was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of fills, from 1 (0: unnumbered); consumers drop repeats."""


class PortfolioUpdate(Event, frozen=True, kw_only=True):
    """The portfolio after a change: cash, positions and PnL."""

    cash: float
    total_value: float
    positions: dict[str, Position] = {}
    realized_pnl: float = 0.0
    unrealized_pnl: float = 0.0
    market_ts_ns: int = 0
    """Market time of the data this event is about, Unix nanoseconds (not when it was produced)."""
    seq: int = 0
    """Position in its symbol's sequence of portfolio updates, from 1 (0: unnumbered); consumers drop repeats."""


class Alert(Event, frozen=True, kw_only=True):
    """Something an operator should look at."""

    default_priority: ClassVar[Priority] = Priority.HIGH

    severity: Severity
    message: str
    source: str = ""


class ComponentStatus(Event, frozen=True, kw_only=True):
    """A component's lifecycle state (``starting``, ``running``, ``draining``, ``stopped``, ``failed``)."""

    component: str
    status: str
    detail: str = ""


class BreakerStateChanged(Event, frozen=True, kw_only=True):
    """A circuit breaker moved between CLOSED, OPEN and HALF_OPEN."""

    default_priority: ClassVar[Priority] = Priority.CRITICAL

    breaker: str
    old_state: str
    new_state: str
    reason: str = ""
