"""The wire codec refuses bad entries with DecodeError (keeping the raw fields) and oversized events."""

from __future__ import annotations

import msgspec
import pytest

from fabric.codec import decode_fields, encode
from fabric.errors import DecodeError, EventTooLarge, UnknownEventType
from fabric.events import Action, Bar, Signal, Tick, Trade


def _tick_map(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "type": "Tick", "event_id": "0" * 32, "ts_ns": 1, "producer": "p", "symbol": "A", "bid": 1.0, "ask": 2.0,
    }
    data.update(overrides)
    return data


def _fields(data: bytes, type_: bytes = b"Tick", enc: bytes = b"msgpack", v: bytes = b"1") -> dict[bytes, bytes]:
    return {b"type": type_, b"v": v, b"enc": enc, b"data": data}


def _good_fields() -> dict[bytes, bytes]:
    return _fields(msgspec.msgpack.encode(_tick_map()))


def test_well_formed_hand_built_entry_decodes():
    # given fields built by hand the way publish.lua writes them
    fields = _good_fields()
    # when decoded
    event = decode_fields(fields)
    # then it is the Tick they describe
    assert event == Tick(event_id="0" * 32, ts_ns=1, producer="p", symbol="A", bid=1.0, ask=2.0)


@pytest.mark.parametrize("enc", [b"msgpack", b"json"])
def test_garbage_data_raises_decode_error_with_the_raw_fields(enc):
    # given an entry whose data is not valid msgpack or json
    fields = _fields(b"\xc1\xff\x00not an event{", enc=enc)
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then the error keeps the raw fields
    assert info.value.fields == fields


def test_unknown_type_raises_unknown_event_type_with_the_raw_fields():
    # given an entry naming a type no module defines
    fields = _fields(msgspec.msgpack.encode(_tick_map(type="NoSuchEvent")), type_=b"NoSuchEvent")
    # when decoded
    with pytest.raises(UnknownEventType) as info:
        decode_fields(fields)
    # then it is a DecodeError that keeps the fields and says how to fix it
    assert isinstance(info.value, DecodeError)
    assert info.value.fields == fields
    assert "NoSuchEvent" in str(info.value)
    assert "--import" in str(info.value)


@pytest.mark.parametrize(
    ("enc", "encoder"), [(b"msgpack", msgspec.msgpack.encode), (b"json", msgspec.json.encode)]
)
def test_wrong_field_type_raises_decode_error_naming_the_field(enc, encoder):
    # given a Tick whose bid is a string
    fields = _fields(encoder(_tick_map(bid="1.5")), enc=enc)
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then the error names the field and keeps the raw fields
    assert "bid" in str(info.value)
    assert info.value.fields == fields


def test_missing_required_event_field_raises_decode_error():
    # given a Tick without its ask
    data = _tick_map()
    del data["ask"]
    fields = _fields(msgspec.msgpack.encode(data))
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then the error names the missing field
    assert "ask" in str(info.value)
    assert info.value.fields == fields


def test_out_of_range_value_raises_decode_error():
    # given a Signal whose strength is outside [0, 1]
    data = {"type": "Signal", "symbol": "A", "action": "BUY", "strength": 1.5, "strategy": "s"}
    fields = _fields(msgspec.msgpack.encode(data), type_=b"Signal")
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then it is refused
    assert "strength" in str(info.value)


def test_data_of_another_type_than_the_type_field_raises_decode_error():
    # given an entry labelled Tick whose data is a Bar
    bar = Bar(symbol="A", timeframe="1m", start_ns=0, open=1.0, high=1.0, low=1.0, close=1.0)
    fields = _fields(encode(bar).data, type_=b"Tick")
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then it is refused
    assert info.value.fields == fields


def test_newer_format_version_raises_decode_error_saying_to_upgrade():
    # given an entry written in format version 2
    fields = _fields(msgspec.msgpack.encode(_tick_map()), v=b"2")
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then the error keeps the fields and tells the reader to upgrade
    assert info.value.fields == fields
    assert "upgrade" in str(info.value)


@pytest.mark.parametrize("missing", [b"type", b"v", b"enc", b"data"])
def test_missing_entry_field_raises_decode_error_naming_it(missing):
    # given an entry lacking one of its four fields
    fields = _good_fields()
    del fields[missing]
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then the error names the field and keeps the fields
    assert repr(missing.decode()) in str(info.value)
    assert info.value.fields == fields


def test_unknown_encoding_raises_decode_error_with_the_raw_fields():
    # given an entry in an encoding fabric does not write
    fields = _fields(b"<tick/>", enc=b"xml")
    # when decoded
    with pytest.raises(DecodeError) as info:
        decode_fields(fields)
    # then it is refused with the fields kept
    assert "xml" in str(info.value)
    assert info.value.fields == fields


def test_encode_raises_event_too_large_over_the_limit():
    # given an event whose payload is larger than the limit
    event = Trade(symbol="A", price=1.0, quantity=1.0, trade_id="x" * 500)
    # when encoded with a 100-byte limit
    with pytest.raises(EventTooLarge) as info:
        encode(event, max_payload_bytes=100)
    # then the error names the event and the way out
    assert event.event_id in str(info.value)
    assert "max_payload_bytes" in str(info.value)


@pytest.mark.parametrize("enc", ["msgpack", "json"])
def test_encode_accepts_a_payload_exactly_at_the_limit(enc):
    # given the exact encoded size of an event
    event = Tick(symbol="A", bid=1.0, ask=2.0)
    size = len(encode(event, enc).data)
    # when encoded with that limit
    encoded = encode(event, enc, max_payload_bytes=size)
    # then it is accepted
    assert len(encoded.data) == size


def test_encode_one_byte_over_the_limit_is_refused():
    event = Tick(symbol="A", bid=1.0, ask=2.0)
    size = len(encode(event).data)
    with pytest.raises(EventTooLarge):
        encode(event, max_payload_bytes=size - 1)


def test_non_positive_quantity_raises_decode_error():
    # given a Trade with a zero quantity (Positive) in its data
    data = {"type": "Trade", "symbol": "A", "price": 1.0, "quantity": 0.0}
    fields = _fields(msgspec.msgpack.encode(data), type_=b"Trade")
    # when decoded
    with pytest.raises(DecodeError):
        decode_fields(fields)


def test_signal_round_trip_keeps_enums():
    # given a Signal with an enum field
    signal = Signal(symbol="A", action=Action.SELL, strength=0.25, strategy="s")
    # when its encoding is decoded
    decoded = decode_fields(_fields(encode(signal).data, type_=b"Signal"))
    # then the enum value comes back as the enum member
    assert decoded.action is Action.SELL
