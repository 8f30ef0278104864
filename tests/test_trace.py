"""``fabric.trace`` and ``fabric trace``: one correlation's events read back from the streams as a tree of causes,
with each hop's latency; the window and the entry cap that bound the scan; exit codes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from typer.testing import Result

from fabric import Publisher, Worker, WorkerConfig
from fabric.cli.options import Exit
from fabric.codec import encode
from fabric.errors import NotFound
from fabric.events import Action, Alert, Bar, Event, Order, Severity, Side, Signal, Tick
from fabric.handler import as_handler
from fabric.keys import Keys, Priority
from fabric.trace import PAGE, Trace, trace
from tests.cli_runner import invoke, parsed, with_redis
from tests.waiting import eventually
from tests.workers import running

pytestmark = pytest.mark.timeout(60)

FAST = {"block_ms": 50, "reclaim_idle_ms": 300, "reclaim_interval_ms": 50, "discover_interval_ms": 50}
ROOT = "0" * 31 + "1"


async def put(client: Any, keys: Keys, event: Event, entry_id: str, topic: str) -> None:
    """XADD an event under a chosen entry id (a chosen Redis time) and register its stream."""
    stream = keys.stream(topic, Priority.NORMAL, event.symbol)
    enc = encode(event)
    await client.xadd(stream, {"type": enc.type, "v": "1", "enc": enc.enc, "data": enc.data}, id=entry_id)
    await client.sadd(keys.topic_registry(topic), stream)


async def redis_ms(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def child(event: Event, cause: Event, ts_ns: int) -> Event:
    return msgspec.structs.replace(event, correlation_id=ROOT, causation_id=cause.event_id, ts_ns=ts_ns)


async def put_chain(client: Any, keys: Keys, base_ms: int) -> dict[str, Event]:
    """tick -> bar -> (alert, signal -> order), written 1 ms apart, and an order whose cause is not there."""
    tick = Tick(event_id=ROOT, symbol="A", bid=1, ask=2, ts_ns=1_000)
    bar = child(Bar(symbol="A", timeframe="1s", start_ns=0, open=1, high=1, low=1, close=1), tick, 3_000)
    alert = child(Alert(severity=Severity.WARNING, message="wide spread"), bar, 5_000)
    signal = child(Signal(symbol="A", action=Action.BUY, strength=0.5, strategy="s"), bar, 6_000)
    order = child(Order(symbol="A", order_id="o1", side=Side.BUY, quantity=1), signal, 10_000)
    orphan = msgspec.structs.replace(Order(symbol="A", order_id="o2", side=Side.BUY, quantity=1),
                                     correlation_id=ROOT, causation_id="f" * 32, ts_ns=11_000)
    written = [(tick, "tick"), (bar, "bar"), (alert, "alert"), (signal, "signal"), (order, "order"),
               (orphan, "order")]
    for i, (event, topic) in enumerate(written):
        await put(client, keys, event, f"{base_ms + i}-0", topic)
    unrelated = Tick(symbol="A", bid=1, ask=2)
    await put(client, keys, unrelated, f"{base_ms + 10}-0", "tick")
    its_bar = Bar(symbol="A", timeframe="1s", start_ns=0, open=1, high=1, low=1, close=1,
                  correlation_id=unrelated.event_id, causation_id=unrelated.event_id)
    await put(client, keys, its_bar, f"{base_ms + 11}-0", "bar")
    return {"tick": tick, "bar": bar, "alert": alert, "signal": signal, "order": order, "orphan": orphan}


# ---- the library -----------------------------------------------------------------------------------------


async def test_a_trace_is_the_tree_of_causes_depth_first_with_each_hops_latency(redis, keys):
    # Given a chain with a fork, an event whose cause is missing, and another correlation beside it
    events = await put_chain(redis, keys, await redis_ms(redis) - 60_000)

    # When it is traced
    found = await trace(redis, keys, ROOT)

    # Then each event comes after its cause, children in the order they were written, the orphan last at depth 0
    assert [(h.type, h.depth) for h in found.hops] == [
        ("Tick", 0), ("Bar", 1), ("Alert", 2), ("Signal", 2), ("Order", 3), ("Order", 0)]
    assert [h.event_id for h in found.hops] == [events[k].event_id for k in
                                                ("tick", "bar", "alert", "signal", "order", "orphan")]
    # and each hop's latency is its ts_ns minus its cause's, its gap the entry times' difference
    assert [h.latency_ns for h in found.hops] == [None, 2_000, 2_000, 3_000, 4_000, None]
    assert [h.gap_ms for h in found.hops] == [None, 1, 1, 2, 1, None]
    assert found.root_found and found.total_ns == 10_000 and found.total_gap_ms == 5
    assert found.hops[4].topic == "order" and found.hops[4].stream == keys.stream("order", Priority.NORMAL, "A")
    assert not found.truncated and found.topics == ["alert", "bar", "order", "signal", "tick"]


async def test_a_worker_pipeline_stamps_a_chain_that_traces_back_to_its_tick(redis, keys):
    # Given two stages: ticks make bars, bars make a signal and an alert
    async def to_bar(tick: Tick) -> list[Event]:
        return [Bar(symbol=tick.symbol, timeframe="1s", start_ns=0, open=tick.bid, high=tick.bid, low=tick.bid,
                    close=tick.bid)]

    async def to_signal(bar: Bar) -> list[Event]:
        return [Signal(symbol=bar.symbol, action=Action.BUY, strength=1.0, strategy="up"),
                Alert(severity=Severity.INFO, message="bar seen")]

    bars = Worker(redis, as_handler(to_bar), WorkerConfig(group="bars", topics=["tick"], **FAST), keys=keys,
                  handler_name="to_bar")
    signals = Worker(redis, as_handler(to_signal), WorkerConfig(group="signals", topics=["bar"], **FAST), keys=keys,
                     handler_name="to_signal")
    first, second = Tick(symbol="A", bid=1, ask=2), Tick(symbol="B", bid=3, ask=4)
    async with Publisher(redis, keys=keys) as pub:
        await pub.publish_many([first, second])
        await pub.publish(Bar(symbol="A", timeframe="1s", start_ns=0, open=1, high=1, low=1, close=1))  # registers bar

    # When both ticks have gone through both stages
    async def traced(root: Tick) -> Trace | None:
        try:
            found = await trace(redis, keys, root.event_id)
        except NotFound:
            return None
        return found if len(found.hops) == 4 else None

    async with running(bars, signals):
        chain = await eventually(lambda: traced(first), what="the first tick's four events")
        await eventually(lambda: traced(second), what="the second tick's four events")

    # Then the first tick's trace holds its own events only, each stamped by the stage that made it
    assert [(h.type, h.depth, h.producer) for h in chain.hops][:2] == [("Tick", 0, first.producer),
                                                                        ("Bar", 1, "to_bar")]
    assert sorted((h.type, h.depth, h.producer) for h in chain.hops[2:]) == [("Alert", 2, "to_signal"),
                                                                            ("Signal", 2, "to_signal")]
    assert {h.symbol for h in chain.hops} <= {"A", None}
    assert all(h.latency_ns is not None and h.latency_ns >= 0 for h in chain.hops[1:])
    assert all(h.gap_ms is not None and h.gap_ms >= 0 for h in chain.hops[1:])
    assert chain.total_ns is not None and chain.total_ns >= max(h.latency_ns or 0 for h in chain.hops)


async def test_entries_before_the_window_are_not_read(redis, keys):
    # Given a chain written two hours ago (by Redis's clock)
    now = await redis_ms(redis)
    await put_chain(redis, keys, now - 2 * 3_600_000)

    # When it is traced with the default window (the last hour) it is not found, and the message says how to widen
    with pytest.raises(NotFound, match="--since"):
        await trace(redis, keys, ROOT)

    # and with a window reaching back far enough it is
    found = await trace(redis, keys, ROOT, since_ms=now - 3 * 3_600_000)
    assert len(found.hops) == 6


async def test_entries_written_well_before_the_root_are_not_read(redis, keys):
    # Given more unrelated ticks than one page holds, written ten minutes before the chain, in the root's stream
    now = await redis_ms(redis)
    older = 3 * PAGE
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(older):
            enc = encode(Tick(symbol="A", bid=1, ask=2))
            pipe.xadd(keys.stream("tick", Priority.NORMAL, "A"),
                      {"type": enc.type, "v": "1", "enc": enc.enc, "data": enc.data}, id=f"{now - 600_000 + i}-0")
        await pipe.execute()
    await put_chain(redis, keys, now - 1_000)

    # When the chain is traced
    found = await trace(redis, keys, ROOT)

    # Then the scan stopped at the root: after the page that held it, no older tick was read
    assert len(found.hops) == 6 and found.scanned <= PAGE + 8


async def test_the_entry_cap_cuts_the_scan_and_says_so(redis, keys):
    # Given a chain with 20 unrelated ticks written after its root, in the root's stream
    now = await redis_ms(redis)
    await put_chain(redis, keys, now - 5_000)
    for i in range(20):
        await put(redis, keys, Tick(symbol="A", bid=1, ask=2), f"{now - 2_000 + i}-0", "tick")

    # When the scan may read only 10 entries
    found = await trace(redis, keys, ROOT, max_entries=10)

    # Then it read exactly 10, says it was cut short, and lacks the root
    assert found.truncated and found.scanned == 10
    assert not found.root_found and found.total_ns is None


async def test_a_cap_that_hides_every_event_says_so_in_the_not_found_message(redis, keys):
    now = await redis_ms(redis)
    await put(redis, keys, Tick(event_id=ROOT, symbol="A", bid=1, ask=2), f"{now - 5_000}-0", "tick")
    for i in range(20):
        await put(redis, keys, Tick(symbol="A", bid=1, ask=2), f"{now - 2_000 + i}-0", "tick")

    with pytest.raises(NotFound, match="--max-entries"):
        await trace(redis, keys, ROOT, max_entries=5)


async def test_only_the_topics_named_are_searched(redis, keys):
    await put_chain(redis, keys, await redis_ms(redis) - 1_000)

    found = await trace(redis, keys, ROOT, topics=["bar", "signal"])

    assert [(h.type, h.depth, h.latency_ns) for h in found.hops] == [("Bar", 0, None), ("Signal", 1, 3_000)]
    assert found.topics == ["bar", "signal"] and not found.root_found


async def test_a_topic_that_does_not_exist_is_not_found(redis, keys):
    await put_chain(redis, keys, await redis_ms(redis) - 1_000)

    with pytest.raises(NotFound, match="'nope'"):
        await trace(redis, keys, ROOT, topics=["nope"])


# ---- the command -----------------------------------------------------------------------------------------


def one_error_line(result: Result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def chain_in(redis_url: str, keys: Keys, age_ms: int = 1_000) -> dict[str, Event]:
    async def work(client: Any) -> dict[str, Event]:
        return await put_chain(client, keys, await redis_ms(client) - age_ms)

    return with_redis(redis_url, work)


@pytest.mark.real_only
def test_the_command_prints_the_tree_indented_with_latencies_and_the_end_to_end_total(redis_url, keys):
    events = chain_in(redis_url, keys)

    result = invoke(redis_url, keys, "trace", ROOT)

    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 7
    hops = [("tick", 0, "root"), ("bar", 1, "+2µs"), ("alert", 2, "+2µs"), ("signal", 2, "+3µs"),
            ("order", 3, "+4µs"), ("orphan", 0, "?")]
    for line, (key, depth, latency) in zip(lines, hops, strict=False):
        assert line.startswith("  " * depth + latency + "  "), line
        event = events[key]
        assert line.split()[1:] == [keys.parse_stream(keys.stream(line.split()[1], Priority.NORMAL, "A")).topic,
                                    type(event).__name__, event.symbol or "-", event.event_id], line
    assert lines[6].startswith("end to end: 10µs over 6 events, 3 hops deep")


@pytest.mark.real_only
def test_the_command_prints_the_trace_as_json(redis_url, keys):
    chain_in(redis_url, keys)

    doc = parsed(invoke(redis_url, keys, "trace", ROOT, "--json", "--topic", "tick", "--topic", "bar"))

    assert doc["correlation_id"] == ROOT and doc["root_found"] is True and doc["truncated"] is False
    assert [(h["type"], h["depth"], h["latency_ns"]) for h in doc["hops"]] == [("Tick", 0, None), ("Bar", 1, 2_000)]


@pytest.mark.real_only
def test_an_unknown_correlation_id_exits_5_naming_the_search_and_how_to_widen_it(redis_url, keys):
    chain_in(redis_url, keys)

    result = invoke(redis_url, keys, "trace", "e" * 32)

    one_error_line(result, Exit.NOT_FOUND, "e" * 32, keys.ns, "--since")


@pytest.mark.real_only
def test_a_scan_cut_by_the_cap_prints_what_it_found_and_exits_6(redis_url, keys):
    chain_in(redis_url, keys, age_ms=5_000)

    async def noise(client: Any) -> None:
        now = await redis_ms(client)
        for i in range(20):
            await put(client, keys, Tick(symbol="A", bid=1, ask=2), f"{now - 2_000 + i}-0", "tick")

    with_redis(redis_url, noise)

    result = invoke(redis_url, keys, "trace", ROOT, "--max-entries", "10")

    one_error_line(result, Exit.PARTIAL, "--max-entries", "10")
    assert "end to end: unknown" in result.stdout


@pytest.mark.real_only
@pytest.mark.parametrize("args", [("not an id",), (ROOT, "--since", "yesterday"), (ROOT, "--topic", "a:b"),
                                  (ROOT, "--max-entries", "0")])
def test_bad_input_exits_2(redis_url, keys, args):
    result = invoke(redis_url, keys, "trace", *args)

    assert result.exit_code == Exit.USAGE, (result.stdout, result.stderr)


def test_an_unreachable_redis_exits_3(keys):
    result = invoke("redis://127.0.0.1:1/0", keys, "trace", ROOT)

    one_error_line(result, Exit.UNREACHABLE)
