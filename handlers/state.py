"""Per-symbol state for the pipeline's stateful stages: the stores they keep it in, and the sequence rule.

Each stateful stage (bars, indicators, strategy, risk, portfolio) keeps one msgspec Struct per symbol and
reaches it only through a ``Store``: ``await store.get(symbol)`` and ``await store.put(symbol, state)``. The
handlers never hold state between calls, so the wiring decides where it lives: ``MemoryStore`` (it keeps the
encoded bytes, so a state that cannot round-trip through msgpack fails at once) in the single-process mode,
``RedisStore`` under fabric workers (``handlers.wiring``).

The sequence rule makes redelivery harmless. Every event a stage consumes carries ``seq``, its position in its
symbol's sequence (1, 2, 3, ...), and the state keeps the last one applied and the outputs it gave
(``last_outputs``). ``admit`` then says:

- ``seq == last + 1``: the next one: apply it, and keep its outputs in the state;
- ``seq == last``: the last one again: apply nothing, publish its outputs again (``replay``);
- ``seq < last``: an older one again: apply nothing, publish nothing;
- ``seq > last + 1``: one before it has not been applied yet (a crashed consumer still holds it, or another
  consumer took it): raise ``OutOfOrder``, a ``Retry``, so it comes back after the missing one. Each symbol's
  events are therefore applied exactly in order whatever the delivery order, which is what makes every decision
  a function of the symbol's own sequence.

Why the last event's outputs are published again. A stage saves its state during the handler call; the worker
publishes the call's outputs and acks the entry afterwards, in one atomic commit (``commit.lua``). A worker
that dies between the two leaves the state saying "applied" and the outputs unpublished; the entry is
redelivered, and without ``replay`` it would be taken for a repeat and its outputs lost for good. Publishing
them again is safe: they are the same events (same ``event_id``, same ``seq``), built once and stored, and
every stage downstream applies a ``seq`` once. Nor does it duplicate anything in practice: an entry is
redelivered only while it is unacked, that is while its outputs are unpublished (a commit refused to a
consumer that lost the entry publishes nothing), so the replay publishes them for the first time. Only an
input that is itself in its stream twice (an upstream replay is not: it happens instead of a publication, not
beside one) would publish them twice; the stateful stages downstream then drop the copy, while the stateless
ones (broker, audit) handle it again: a second audit entry with the same ``source_event_id``.

Why the last one suffices, and when it does not. Keeping one event's outputs covers a crash if, on each
symbol's stream, the entry the stage applied last is the only one whose outputs may be unpublished: the worker
hands a stream's next entry to the handler only after the previous entry's outputs have landed (with its ack,
in one commit). Then a crash leaves that entry in doubt, and before it only entries that gave no outputs and
whose acks had not landed yet; they come back first, in order, find ``seq < last`` and publish nothing (they
had nothing to publish), and the last one finds ``seq == last`` and publishes its outputs again. Fabric's
ordered mode (one owner per stream, its entries handled one after another, the new owner finishing the old
one's pending entries in order first) gives this with its default ``commit_ahead = 0``: a stream's next entry
starts only once the previous one's outputs have landed; an entry with none does not hold the next
(config/pipeline.toml's stateful stages run so; tests/handlers/test_redelivery.py kills a stage between the
two). With ``commit_ahead > 0`` it does not: up to that many entries are applied before their outputs land, so
a stage that keeps state this way must not set it.

The unordered mode does not guarantee it, even with one worker process and ``concurrency = 1``: the
dispatcher hands over the next entry as soon as the handler returns, while commits go out in batches behind
it (``_commit_loop``), so entries n and n + 1 of a symbol can both be applied with neither committed. If the
worker then dies, n comes back after n + 1 was applied, is older than the last, and its outputs are lost.
A restarted worker also reads new entries before it reclaims the dead one's pending ones, which lets a later
entry overtake the one in doubt the same way. With several workers or ``concurrency > 1``, two deliveries of
one symbol can also run at once: both read the state, both write it, and the older write can land last (the
store is last-writer-wins; the ordered mode's single owner, fenced, is what rules that out). What the
unordered mode does guarantee: without a crash nothing is lost or applied twice, and a crash loses outputs
only when a later entry of the same symbol was applied before the one in doubt was committed.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar, cast

import msgspec
from redis.asyncio import Redis

from fabric.errors import Reject, Retry
from fabric.keys import Keys, check_name, check_symbol

__all__ = ["GAP_RETRY_MS", "MemoryStore", "OutOfOrder", "RedisStore", "Store", "admit", "replay", "state_key"]

GAP_RETRY_MS = 100
"""How long an event that arrived ahead of its predecessor waits before it is delivered again."""

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


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


def state_key(namespace: str, stage: str, symbol: str) -> str:
    """The Redis key of a stage's state for one symbol: ``NS:state:STAGE:{SYMBOL}``, a string of msgpack.

    The hash tag is the symbol's, as in every key of the symbol's streams (``fabric.keys``), so the state
    shares their Redis Cluster slot. Written and read by ``RedisStore`` only.
    """
    return f"{namespace}:state:{check_name('stage', stage)}:{Keys.tag('state', check_symbol(symbol))}"


class RedisStore(Generic[S]):
    """A ``Store`` on Redis: each symbol's state of one stage as msgpack under ``state_key``."""

    def __init__(self, client: Redis, namespace: str, stage: str, state_type: type[S]) -> None:
        self.client = client
        self.namespace = namespace
        self.stage = check_name("stage", stage)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(state_type)

    async def get(self, symbol: str) -> S | None:
        """The symbol's state, or None."""
        data = cast(bytes | None, await self.client.get(state_key(self.namespace, self.stage, symbol)))
        return None if data is None else self._decoder.decode(data)

    async def put(self, symbol: str, state: S) -> None:
        """Replace the symbol's state."""
        await self.client.set(state_key(self.namespace, self.stage, symbol), self._encoder.encode(state))


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


def replay(last_seq: int, seq: int, last_outputs: T) -> T | None:
    """What a repeat publishes: the outputs kept from the last applied event if it is that one, else None."""
    return last_outputs if seq == last_seq else None
