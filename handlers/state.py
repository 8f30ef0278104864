"""Per-symbol state for the pipeline's stateful stages: the store they keep it in, and the sequence rule.

Each stateful stage (bars, indicators, strategy, risk, portfolio) keeps one msgspec Struct per symbol and
reaches it only through a ``Store``: ``await store.get(symbol)`` and ``await store.put(symbol, state)``. The
handlers never hold state between calls, so the wiring decides where it lives: ``MemoryStore`` here (it keeps
the encoded bytes, so a state that cannot round-trip through msgpack fails at once), a Redis hash later, or a
rebuild from the streams.

The sequence rule makes redelivery harmless. Every event a stage consumes carries ``seq``, its position in its
symbol's sequence (1, 2, 3, ...), and the state keeps the last one applied. ``admit`` then says:

- ``seq <= last``: a redelivery (at-least-once): apply nothing, publish nothing;
- ``seq == last + 1``: the next one: apply it;
- ``seq > last + 1``: one before it has not been applied yet (a crashed consumer still holds it, or another
  consumer took it): raise ``OutOfOrder``, a ``Retry``, so it comes back after the missing one. Each symbol's
  events are therefore applied exactly in order whatever the delivery order, which is what makes every decision
  a function of the symbol's own sequence.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import msgspec

from fabric.errors import Reject, Retry

__all__ = ["GAP_RETRY_MS", "MemoryStore", "OutOfOrder", "Store", "admit"]

GAP_RETRY_MS = 100
"""How long an event that arrived ahead of its predecessor waits before it is delivered again."""

S = TypeVar("S", bound=msgspec.Struct)


class Store(Protocol[S]):
    """Where a stage keeps its state: one Struct per symbol."""

    async def get(self, symbol: str) -> S | None:
        """The symbol's state, or None before its first event."""

    async def put(self, symbol: str, state: S) -> None:
        """Replace the symbol's state."""


class MemoryStore(Generic[S]):
    """A ``Store`` in a dict, holding msgpack bytes: every get decodes a fresh copy, as a Redis store would."""

    def __init__(self, state_type: type[S]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(state_type)
        self._states: dict[str, bytes] = {}

    async def get(self, symbol: str) -> S | None:
        """The symbol's state, or None."""
        data = self._states.get(symbol)
        return None if data is None else self._decoder.decode(data)

    async def put(self, symbol: str, state: S) -> None:
        """Replace the symbol's state."""
        self._states[symbol] = self._encoder.encode(state)

    def symbols(self) -> list[str]:
        """The symbols holding state, sorted."""
        return sorted(self._states)


class OutOfOrder(Retry):
    """An event arrived before its predecessor was applied: deliver it again later."""


def admit(last_seq: int, seq: int, what: str, symbol: str) -> bool:
    """True to apply event number ``seq`` after ``last_seq``, False for a repeat; raise for a gap or no number."""
    if seq == last_seq + 1:
        return True
    if seq <= 0:
        raise Reject(f"{what} for {symbol} has no seq: number each symbol's {what}s 1, 2, 3, ... (field 'seq')")
    if seq <= last_seq:
        return False
    raise OutOfOrder(GAP_RETRY_MS, f"{what} {seq} for {symbol} arrived before {what} {last_seq + 1}: "
                                   f"retrying in {GAP_RETRY_MS} ms, once the missing one has been applied")
