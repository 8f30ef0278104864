"""Event types: every one round-trips through the wire codec, ids sort by time, subclassing registers."""

from __future__ import annotations

import re

import pytest

from fabric.codec import decode_fields, encode
from fabric.events import (
    Action,
    Alert,
    Bar,
    BookLevel,
    BreakerStateChanged,
    ComponentStatus,
    Direction,
    Event,
    Features,
    Fill,
    Indicator,
    Liquidation,
    Order,
    OrderBook,
    OrderType,
    PortfolioUpdate,
    Position,
    Prediction,
    Severity,
    Side,
    Signal,
    Tick,
    Trade,
    event_type,
    event_types,
    new_event_id,
)
from fabric.keys import Priority


class Quote(Event):
    """An application-defined event: no registration call, subclassing is enough."""

    symbol: str
    price: float


def _samples() -> list[Event]:
    """One instance of every built-in event type, with optional fields filled in."""
    return [
        Tick(symbol="BTC-USD", bid=100.5, ask=100.75, bid_size=2.0, ask_size=3.5, exchange="X",
             correlation_id="c" * 32, causation_id="d" * 32),
        Bar(symbol="ETH-USD", timeframe="1m", start_ns=1_700_000_000_000_000_000, open=1.0, high=2.0,
            low=0.5, close=1.5, volume=10.0, trades=7),
        OrderBook(symbol="BTC-USD", bids=[BookLevel(100.0, 1.0), BookLevel(99.5, 2.0)],
                  asks=[BookLevel(100.5, 0.5)]),
        Trade(symbol="BTC-USD", price=100.25, quantity=0.1, side=Side.SELL, trade_id="t1"),
        Liquidation(symbol="BTC-USD", side=Side.BUY, price=95.0, quantity=3.0),
        Indicator(symbol="BTC-USD", name="rsi_14", value=55.5, timeframe="1m"),
        Features(symbol="BTC-USD", values={"rsi_14": 55.5, "sma_20": 101.25}, timeframe="1m"),
        Prediction(symbol="BTC-USD", direction=Direction.UP, confidence=0.75, model="m1", horizon_s=60.0,
                   target=110.0, stop=95.0),
        Signal(symbol="BTC-USD", action=Action.HOLD, strength=0.5, strategy="s1", target=None, stop=90.0),
        Order(symbol="BTC-USD", order_id="o1", side=Side.BUY, quantity=1.5, order_type=OrderType.LIMIT,
              price=100.0, strategy="s1"),
        Fill(symbol="BTC-USD", order_id="o1", side=Side.BUY, price=100.0, quantity=1.5, commission=0.01,
             fill_id="f1"),
        PortfolioUpdate(cash=1000.0, total_value=1150.0,
                        positions={"BTC-USD": Position(quantity=1.5, avg_price=100.0, market_price=100.0)},
                        realized_pnl=5.0, unrealized_pnl=-1.25),
        Alert(severity=Severity.CRITICAL, message="feed down", source="feed"),
        ComponentStatus(component="worker-1", status="running", detail="ok"),
        BreakerStateChanged(breaker="exchange-x", old_state="CLOSED", new_state="OPEN", reason="5 errors"),
    ]


SAMPLES = _samples()


def _fields(event: Event, enc: str) -> dict[bytes, bytes]:
    """The entry fields exactly as publish.lua writes them."""
    encoded = encode(event, enc)  # type: ignore[arg-type]
    return {b"type": encoded.type.encode(), b"v": b"1", b"enc": encoded.enc.encode(), b"data": encoded.data}


def test_samples_cover_every_builtin_event_type():
    # given the registry of every event type defined by fabric.events
    builtin = {name for name, cls in event_types().items() if cls.__module__ == "fabric.events"}
    # then the round-trip samples include one of each
    assert {type(e).__name__ for e in SAMPLES} == builtin


@pytest.mark.parametrize("enc", ["msgpack", "json"])
@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_event_round_trips_through_the_wire_codec(event, enc):
    # given an event encoded into stream-entry fields
    fields = _fields(event, enc)
    # when the fields are decoded
    decoded = decode_fields(fields)
    # then the same event comes back, with its type
    assert type(decoded) is type(event)
    assert decoded == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_entry_type_field_is_the_class_tag(event):
    # when an event is encoded
    encoded = encode(event)
    # then the type field names its class
    assert encoded.type == type(event).__name__


def test_event_id_is_32_hex_digits():
    # when an event is created without an id
    event = Tick(symbol="A", bid=1.0, ask=2.0)
    # then it gets 32 lower-case hex digits
    assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)


def test_event_ids_made_later_sort_later():
    # when ids are made one after another
    ids = [new_event_id() for _ in range(2000)]
    # then they are unique and already in sorted order
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_events_made_later_have_later_ids():
    # when events are created one after another
    events = [Tick(symbol="A", bid=1.0, ask=2.0) for _ in range(500)]
    # then their ids sort in creation order
    ids = [e.event_id for e in events]
    assert ids == sorted(ids)


def test_application_subclass_is_found_without_registration():
    # given Quote, defined in this module by subclassing Event only
    # when the registry is asked for its tag
    # then it is found
    assert event_type("Quote") is Quote


def test_unknown_event_type_is_none():
    assert event_type("NoSuchEventType") is None


@pytest.mark.parametrize("enc", ["msgpack", "json"])
def test_application_subclass_round_trips(enc):
    # given an application-defined event
    quote = Quote(symbol="AAPL", price=187.25)
    # when it goes through the wire codec
    decoded = decode_fields(_fields(quote, enc))
    # then it comes back as a Quote equal to the original
    assert type(decoded) is Quote
    assert decoded == quote


def test_subclass_defined_after_a_lookup_is_found():
    # given a lookup that built the registry
    assert event_type("Tick") is Tick

    # when a new event class is defined afterwards
    class LateQuoteForRegistryTest(Event):
        price: float

    # then it is found too
    assert event_type("LateQuoteForRegistryTest") is LateQuoteForRegistryTest


@pytest.mark.parametrize(
    ("cls", "topic"),
    [
        (Tick, "tick"),
        (Bar, "bar"),
        (OrderBook, "order_book"),
        (PortfolioUpdate, "portfolio_update"),
        (ComponentStatus, "component_status"),
        (BreakerStateChanged, "breaker_state_changed"),
        (Quote, "quote"),
    ],
)
def test_default_topic_is_snake_case_of_the_class_name(cls, topic):
    assert cls.default_topic == topic


def test_explicit_default_topic_is_kept():
    # given a subclass that names its topic
    class VenueStatusForTopicTest(Event):
        default_topic = "venues"
        up: bool

    # then the topic is not replaced by the snake_case name
    assert VenueStatusForTopicTest.default_topic == "venues"


@pytest.mark.parametrize("cls", [Order, Fill])
def test_orders_and_fills_default_to_high_priority(cls):
    assert cls.default_priority is Priority.HIGH


def test_market_data_defaults_to_normal_priority():
    assert Tick.default_priority is Priority.NORMAL
    assert Quote.default_priority is Priority.NORMAL


def test_root_id_is_own_id_on_a_root_event():
    event = Tick(symbol="A", bid=1.0, ask=2.0)
    assert event.root_id == event.event_id


def test_root_id_is_correlation_id_on_a_derived_event():
    event = Tick(symbol="A", bid=1.0, ask=2.0, correlation_id="f" * 32)
    assert event.root_id == "f" * 32
