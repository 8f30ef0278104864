"""Bad input, scored by the checker: entries no fabric publisher wrote, beside good ones, through a worker process;
the producer's own refusals; hostile lines on ``fabric publish``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from fabric.cli import app
from fabric.cli.options import Exit
from fabric.codec import DEFAULT_MAX_PAYLOAD_BYTES
from fabric.config import PublisherConfig
from fabric.errors import EventTooLarge, PublishError
from fabric.events import Tick, new_event_id
from fabric.publisher import Publisher
from tests.faults.checker import Journal, Score, read_dead_letters
from tests.faults.harness import World, case, joined

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

EVENTS = 120


def _tick_map(**fields: Any) -> dict[str, Any]:
    """A tick as a plain map, the shape another writer (an older or newer fabric, another language) encodes."""
    return {"type": "Tick", "event_id": new_event_id(), "ts_ns": time.time_ns(), "symbol": "S0", "bid": 1.0,
            "ask": 2.0, **fields}


def _entry(data: bytes, *, type_: str = "Tick", v: str = "1", enc: str = "msgpack") -> dict[str, Any]:
    return {"type": type_, "v": v, "enc": enc, "data": data}


def _readable() -> list[tuple[dict[str, Any], str]]:
    """Entries another writer may add that a worker must handle, with their event ids: older and newer shapes of
    Tick side by side, NULs in a string, an odd symbol inside the data (the stream's own name is fine)."""
    shapes = [
        ("msgpack", _tick_map()),  # written before the appended fields (exchange, market_ts_ns, seq...) existed
        ("json", _tick_map(seq=7, venue_latency_ns=1234, routing={"via": ["a", "b"]})),  # fields appended since
        ("msgpack", _tick_map(exchange="NUL\x00in\x00the\x00middle")),
        ("msgpack", _tick_map(symbol="A\x00B" + "Z" * 10_000)),
    ]
    encoders = {"msgpack": msgspec.msgpack.encode, "json": msgspec.json.encode}
    return [(_entry(encoders[enc](m), enc=enc), m["event_id"]) for enc, m in shapes]


def _unreadable() -> list[dict[str, Any]]:
    """Entries that cannot be an event: each is dead-lettered at once, with the reason."""
    huge = msgspec.msgpack.encode(_tick_map(exchange="x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)))
    return [
        {"garbage": b"\xff\xfe\x00"},
        {"type": "Tick", "v": "1"},
        _entry(b"\x93\x01\x02"),  # msgpack, but not a map
        _entry(b"\xde\xad\xbe\xef"),
        _entry(msgspec.msgpack.encode(_tick_map())[:-3]),  # cut short
        _entry(msgspec.msgpack.encode(_tick_map(bid="one"))),  # a field of the wrong type
        _entry(msgspec.msgpack.encode(_tick_map()), type_="NoSuchType"),
        _entry(msgspec.msgpack.encode(_tick_map()), type_="\x00" * 50_000),
        _entry(msgspec.msgpack.encode(_tick_map()), v="2"),
        _entry(msgspec.msgpack.encode(_tick_map()), enc="pickle"),
        _entry(b"{not json", enc="json"),
        _entry(huge),  # a valid tick, over the payload limit: written raw, past the producer's check
    ]


UNREADABLE = len(_unreadable())


@case("bad input beside good (raw entries)", "no loss")
async def case_bad_input(w: World, events: int) -> Score:
    # Given a worker, and a producer publishing good ticks
    await w.create_streams(1)
    (worker,) = await joined(w.spawn("w"))
    producing = asyncio.create_task(w.publish(events, symbols=1, batch=10))

    # When another writer adds, meanwhile, entries of other shapes and entries that are no events at all
    stream = w.stream("S0")
    journal = Journal(w.journal_dir / "publish.raw.log")
    try:
        for _ in range(max(1, events // 40)):
            for fields, event_id in _readable():
                await w.client.xadd(stream, fields)
                journal.published("ack", [event_id], stream)
        for fields in _unreadable():
            await w.client.xadd(stream, fields)
    finally:
        journal.close()
    await producing
    fault_end = time.time()

    # Then the good and the readable are handled, the rest dead-lettered, and the worker goes on
    await w.settle()
    await worker.stopped_cleanly()
    return await w.score(fault_end=fault_end)


# ---- the short form ------------------------------------------------------------------------------------


async def test_entries_no_publisher_wrote_are_dead_lettered_and_other_shapes_handled(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w:
        s = await case_bad_input(w, EVENTS)
        letters = await read_dead_letters(w.client, w.keys)
    readable = len(_readable()) * (EVENTS // 40)
    assert (s.lost, s.unexpected, s.duplicated) == (0, 0, 0), s.describe()
    assert s.handled == s.acknowledged == EVENTS + readable, s.describe()
    assert s.dead_lettered == UNREADABLE, [(d.error_type, d.error[:80]) for d in letters]
    assert all(d.error_type in ("DecodeError", "UnknownEventType") and d.error for d in letters)
    assert all(len(d.error) <= 2000 for d in letters)
    oversized = [d for d in letters if "payload limit" in d.error]
    assert len(oversized) == 1, "the raw tick over the payload limit is dead-lettered, not handled"


async def test_the_producer_refuses_an_oversized_event_before_writing_anything(tmp_path: Path) -> None:
    async with World.open(tmp_path) as w, Publisher(w.client, PublisherConfig(max_payload_bytes=1000), w.keys) as p:
        ok = Tick(symbol="S0", bid=1.0, ask=2.0)
        with pytest.raises(EventTooLarge, match="max_payload_bytes"):
            await p.publish_many([ok, Tick(symbol="S0", bid=1.0, ask=2.0, exchange="x" * 2000)])
        assert await w.client.exists(w.stream("S0")) == 0
        assert await p.publish(ok)


@pytest.mark.parametrize("symbol", ["A\x00B", "\x00", "S" * 10_000, "{S}", "a b", ""],
                         ids=["nul-inside", "nul", "huge", "braces", "space", "empty"])
async def test_the_producer_refuses_a_symbol_no_stream_can_be_named_by(tmp_path: Path, symbol: str) -> None:
    async with World.open(tmp_path) as w, Publisher(w.client, PublisherConfig(), w.keys) as pub:
        with pytest.raises(PublishError, match="invalid symbol") as info:
            await pub.publish(Tick(symbol=symbol, bid=1.0, ask=2.0))
        assert len(str(info.value)) < 500, "the message does not echo a huge name whole"
        assert await w.client.keys(f"{w.keys.ns}:*") == []


HOSTILE = [
    '{"type": "Tick", "symbol": "A\\u0000B", "bid": 1, "ask": 2}',
    '{"type": "Tick", "symbol": "' + "X" * 100_000 + '", "bid": 1, "ask": 2}',
    "[" * 100_000 + "]" * 100_000,
    '{"type": "Tick", "symbol": "S0", "bid": 1e999, "ask": 2}',
    '{"type": "Tick", "symbol": "S0", "bid": 1, "ask": 2, "event_id": "' + "e" * 2_000_000 + '"}',
    '{"type": "Tick", "symbol": "S0", "bid": 1, "ask": 2, "ts_ns": 99999999999999999999999999}',
    '{"type": "__init__"}',
    '{"type": "Event"}',
    '{"type": 5}',
    "\x00\x01\x02",
    '"\\ud800"',
    '{"type": "Tick", "symbol": "S0", "bid": NaN, "ask": 2}',
]
GOOD = [
    '{"type": "Tick", "symbol": "S0", "bid": 1, "ask": 2}',
    '{"type": "Tick", "symbol": "S0", "bid": 1, "ask": 2, "exchange": "\\u0000\\u0000", "unknown_field": [1]}',
]


def test_hostile_lines_on_fabric_publish_are_reported_by_number_and_the_rest_published(tmp_path: Path) -> None:
    # Given a file of hostile lines with good ones among them
    lines = [GOOD[0], *HOSTILE[:6], GOOD[1], *HOSTILE[6:]]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n")

    async def scenario() -> tuple[Any, int]:
        async with World.open(tmp_path / "w") as w:
            # When it is published with fabric publish
            result = await asyncio.to_thread(CliRunner().invoke, app, [
                "publish", "--file", str(path), "--namespace", w.keys.ns, "--redis-url", w.redis.url])
            return result, int(await w.client.xlen(w.stream("S0")))

    result, stored = asyncio.run(scenario())

    # Then every hostile line is reported by its number, in a bounded line, the good ones are published, exit 6
    assert result.exit_code == int(Exit.PARTIAL), result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    reported = [line for line in result.stderr.splitlines() if line.startswith("error: line ")]
    assert [int(line.split()[2].rstrip(":")) for line in reported] == [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14]
    assert all(len(line) < 500 for line in reported)
    assert stored == len(GOOD)
    assert f"published {len(GOOD)} events; {len(HOSTILE)} bad lines not published" in result.stdout
