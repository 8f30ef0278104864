"""The workload: fabric's own ``Tick`` over 50 symbols, and entries of the same shape for the baselines."""

from __future__ import annotations

import string

import msgspec

from fabric.events import Tick

__all__ = ["SYMBOLS", "TOPIC", "WARMUP", "encoded_size", "same_shape_fields", "symbol", "tick", "ticks", "warm_ticks"]

SYMBOLS = 50
TOPIC = "tick"
WARMUP = "WARMUP"
"""The ``exchange`` of warm-up ticks: they create and join the streams before a measurement, and are not counted."""


def symbol(i: int, symbols: int = SYMBOLS) -> str:
    """The symbol of the i-th event: ``SYM000`` .. ``SYM049``, round robin."""
    return f"SYM{i % symbols:03d}"


def tick(i: int, symbols: int = SYMBOLS, *, ts_ns: int | None = None, exchange: str = "BENCH") -> Tick:
    """The i-th tick of the workload; ``ts_ns`` defaults to now (an open-loop sender gives the scheduled time)."""
    extra = {} if ts_ns is None else {"ts_ns": ts_ns}
    return Tick(symbol=symbol(i, symbols), bid=100.0 + i * 1e-4, ask=100.01 + i * 1e-4, bid_size=1.5,
                ask_size=2.5, exchange=exchange, **extra)


def warm_ticks(symbols: int = SYMBOLS) -> list[Tick]:
    """One warm-up tick per symbol (``exchange=WARMUP``: handled, never measured)."""
    return [tick(i, symbols, exchange=WARMUP) for i in range(symbols)]


def ticks(n: int, symbols: int = SYMBOLS) -> list[Tick]:
    """n ticks, created before any timing starts."""
    return [tick(i, symbols) for i in range(n)]


def encoded_size() -> int:
    """The msgpack size of one workload tick: what fabric stores in an entry's ``data`` field."""
    return len(msgspec.msgpack.encode(tick(12_345)))


def same_shape_fields(size: int) -> list[str]:
    """``type Tick v 1 enc msgpack data PAYLOAD``: an entry shaped like fabric's, with a printable payload of
    ``size`` bytes (for redis-benchmark's command line)."""
    alphabet = string.ascii_letters + string.digits
    payload = "".join(alphabet[i % len(alphabet)] for i in range(size))
    return ["type", "Tick", "v", "1", "enc", "msgpack", "data", payload]
