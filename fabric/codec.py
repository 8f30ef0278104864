"""The wire format: how an event becomes the fields of a stream entry, and back.

An entry has four fields, all plain strings or bytes (README, "Wire format"; a replay adds ``for_group``):

``type``  the event type's tag, e.g. ``Tick``
``v``     the format version of this layout, ``1``
``enc``   ``msgpack`` (default) or ``json``
``data``  the event encoded with ``enc``: a map of field name → value that also holds ``type``

Encoders and decoders are built once per type and reused (msgspec's own advice).

A reader refuses ``data`` over ``max_payload_bytes`` (default ``DEFAULT_MAX_PAYLOAD_BYTES``, the publisher's
own default limit) before decoding it: no fabric writer with the default limit produces one, so it was written
raw, and decoding it would cost a worker the memory and time of an event no one meant.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from fabric.errors import DecodeError, EventTooLarge, UnknownEventType
from fabric.events import Event, event_type

__all__ = ["FORMAT_VERSION", "Codec", "Encoded", "decode_entry", "decode_fields", "encode", "fields_of", "oversized"]

FORMAT_VERSION = 1
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20

Codec = Literal["msgpack", "json"]


class Encoded(msgspec.Struct, frozen=True, array_like=True):
    """An event ready for XADD: its tag, codec and payload."""

    type: str
    enc: str
    data: bytes


_encoders: dict[str, msgspec.msgpack.Encoder | msgspec.json.Encoder] = {
    "msgpack": msgspec.msgpack.Encoder(),
    "json": msgspec.json.Encoder(),
}
_decoders: dict[tuple[Any, bytes], msgspec.msgpack.Decoder[Event] | msgspec.json.Decoder[Event]] = {}
"""Keyed by (type name as str and as bytes, enc); the bytes key serves ``decode_entry``'s fast path."""


def oversized(event: Event, size: int, max_payload_bytes: int) -> EventTooLarge:
    """The error for an event that encodes past the payload limit."""
    return EventTooLarge(
        f"{type(event).__name__} {event.event_id} encodes to {size} bytes, over the "
        f"{max_payload_bytes}-byte limit: split it, or raise max_payload_bytes in the publisher config"
    )


def encode(event: Event, enc: Codec = "msgpack", max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Encoded:
    """Encode an event for a stream entry; raise ``EventTooLarge`` past ``max_payload_bytes``."""
    data = _encoders[enc].encode(event)
    if len(data) > max_payload_bytes:
        raise oversized(event, len(data), max_payload_bytes)
    return Encoded(str(type(event).__struct_config__.tag), enc, data)


def _decoder(
    name: str, enc: bytes
) -> msgspec.msgpack.Decoder[Event] | msgspec.json.Decoder[Event]:
    key = (name, enc)
    dec = _decoders.get(key)
    if dec is None:
        cls = event_type(name)
        if cls is None:
            raise UnknownEventType(
                f"unknown event type {name[:100]!r}: import the module that defines it in this worker "
                "(fabric worker --import MODULE)"
            )
        if enc == b"msgpack":
            dec = msgspec.msgpack.Decoder(cls)
        elif enc == b"json":
            dec = msgspec.json.Decoder(cls)
        else:
            raise DecodeError(f"unknown encoding {enc!r}: fabric writes 'msgpack' or 'json'")
        _decoders[key] = dec
        _decoders[(name.encode(), enc)] = dec
    return dec


def decode_fields(fields: dict[bytes, bytes], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """Decode and validate an entry's fields; raise ``DecodeError`` (with the raw fields) if they are bad."""
    try:
        version = fields[b"v"]
        name = fields[b"type"]
        enc = fields[b"enc"]
        data = fields[b"data"]
    except KeyError as exc:
        raise DecodeError(f"entry lacks the {exc.args[0].decode()!r} field: not written by fabric", fields) from None
    if version != b"1":
        raise DecodeError(
            f"format version {version.decode(errors='replace')!r} is not {FORMAT_VERSION}: "
            "the writer is newer than this reader; upgrade fabric on this worker",
            fields,
        )
    if len(data) > max_payload_bytes:
        raise DecodeError(
            f"{name.decode(errors='replace')[:100]} entry of {len(data)} bytes, over the {max_payload_bytes}-byte "
            "payload limit: it was not written by a fabric publisher with that limit; split the event, or raise "
            "max_payload_bytes for the writer and the readers alike",
            fields,
        )
    try:
        return _decoder(name.decode(errors="replace"), enc).decode(data)
    except DecodeError as exc:
        exc.fields = fields
        raise
    except msgspec.DecodeError as exc:
        raise DecodeError(f"{name.decode(errors='replace')[:100]}: {exc}", fields) from None


def decode_entry(flat: list[bytes], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """Decode an entry from its raw field list; the fast path for entries in fabric's own field order."""
    if len(flat) == 8 and flat[0] == b"type" and flat[2] == b"v" and flat[3] == b"1" and flat[4] == b"enc":
        dec = _decoders.get((flat[1], flat[5]))
        if dec is not None and flat[6] == b"data" and len(flat[7]) <= max_payload_bytes:
            try:
                return dec.decode(flat[7])
            except msgspec.DecodeError:
                pass  # the slow path below says what is wrong
    return decode_fields(fields_of(flat), max_payload_bytes)


def fields_of(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's raw field list as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=False))
