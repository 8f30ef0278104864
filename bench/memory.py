"""Redis memory per retained tick over a range of payload sizes, at fabric's recommended stream node settings
(``fabric.embedded.STREAM_NODE_SETTINGS``) and at Redis's defaults.

    python -m bench.memory [--low 150] [--high 300] [--step 1] [--events 6000] [--redis-url URL]

For every payload size, ``--events`` ticks of one symbol are published with fabric's ``Publisher`` (the tick's
``exchange`` padded to reach the size) into a fresh stream, and ``MEMORY USAGE key SAMPLES 0`` divided by the
entries and by the payload gives the ratio. The settings are changed with CONFIG SET and restored after, on the
server this command starts (or the one named, which must allow CONFIG). Prints, per setting, the smallest,
median and largest ratio over the sizes and the sizes past 1.3x. The suite's ``memory`` case measures the
workload's own tick on the suite's server, which runs with the recommended settings.
"""

from __future__ import annotations

import argparse
import statistics
import uuid

import msgspec
import uvloop
from redis.asyncio import Redis

from bench.server import redis_target
from bench.streams import registered
from bench.workload import TOPIC, tick
from fabric import Keys, Publisher, connect
from fabric.embedded import STREAM_NODE_SETTINGS
from fabric.events import Tick

__all__ = ["REDIS_DEFAULTS", "padded_ticks", "sweep"]

REDIS_DEFAULTS = {"stream-node-max-bytes": "4096", "stream-node-max-entries": "100"}
TARGET = 1.3
CHUNK = 1000


def padded_ticks(size: int, n: int) -> list[Tick] | None:
    """n ticks of one symbol whose msgpack payload is exactly ``size`` bytes: the workload's tick with an empty
    ``producer`` and its ``exchange`` padded (None below the smallest such tick, or for the one size a string
    header's growth skips)."""
    base = len(msgspec.msgpack.encode(_sized(tick(0, 1), 0)))
    for pad in range(max(0, size - base - 2), size - base + 1):
        made = [_sized(tick(i, 1), pad) for i in range(n)]
        if all(len(msgspec.msgpack.encode(t)) == size for t in made):
            return made
    return None


def _sized(t: Tick, pad: int) -> Tick:
    return msgspec.structs.replace(t, producer="", exchange="x" * pad)


async def _ratio(client: Redis, ticks: list[Tick], size: int) -> float:
    keys = Keys(f"mem{uuid.uuid4().hex[:8]}")
    async with Publisher(client, keys=keys) as pub:
        for at in range(0, len(ticks), CHUNK):
            await pub.publish_many(ticks[at:at + CHUNK])
    [stream] = await registered(client, keys, TOPIC)
    usage = await client.memory_usage(stream, samples=0)
    entries = await client.xlen(stream)
    async for key in client.scan_iter(match=f"{keys.ns}:*"):
        await client.unlink(key)
    if entries != len(ticks):
        raise SystemExit(f"stored {entries} of {len(ticks)} ticks of {size} bytes")
    return float(usage) / entries / size


async def sweep(url: str, sizes: range, events: int) -> dict[str, dict[int, float]]:
    """The ratio to payload of every size, per setting."""
    client = connect(url)
    before: dict[str, str] = {}
    for name in STREAM_NODE_SETTINGS:
        before.update(await client.config_get(name))
    found: dict[str, dict[int, float]] = {}
    try:
        for label, settings in (("fabric's settings", STREAM_NODE_SETTINGS), ("Redis defaults", REDIS_DEFAULTS)):
            for name, value in settings.items():
                await client.config_set(name, value)
            found[label] = {}
            for size in sizes:
                ticks = padded_ticks(size, events)
                if ticks is not None:
                    found[label][size] = await _ratio(client, ticks, size)
    finally:
        for name, value in before.items():
            await client.config_set(name, value)
        await client.aclose()
    return found


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--low", type=int, default=150, help="smallest payload, bytes (fabric's smallest tick is larger)")
    p.add_argument("--high", type=int, default=300, help="largest payload, bytes")
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--events", type=int, default=6000, help="ticks per stream")
    p.add_argument("--redis-url", help="Redis to measure (default $FABRIC_REDIS_URL, else a dedicated redis-server)")
    args = p.parse_args()
    with redis_target(args.redis_url) as target:
        found = uvloop.run(sweep(target.url, range(args.low, args.high + 1, args.step), args.events))
    for label, ratios in found.items():
        values = list(ratios.values())
        over = ", ".join(f"{size}: {r:.2f}" for size, r in ratios.items() if r > TARGET) or "none"
        settings = STREAM_NODE_SETTINGS if label.startswith("fabric") else REDIS_DEFAULTS
        print(f"{label} ({', '.join(f'{k} {v}' for k, v in settings.items())}): {len(values)} payload sizes "
              f"{min(ratios)}-{max(ratios)} bytes, ratio to payload min {min(values):.2f}, median "
              f"{statistics.median(values):.2f}, max {max(values):.2f}; over {TARGET}x: {over}")


if __name__ == "__main__":
    main()
