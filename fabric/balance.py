"""Spreading an ordered group's streams over its live members: evenly, deterministically, moving only what must.

Pure functions, no Redis: every member computes the same plan from the same streams, live members and current
owners, in any order. The scheme is greedy rebalancing from the current assignment:

1. A stream whose owner is live stays with it for now; the others (new streams, those of members that left or
   died) go to a pool.
2. Quotas: with ``n`` streams and ``m`` members, ``n % m`` members may hold ``n // m + 1`` and the rest
   ``n // m``; the larger quotas go to the members holding most now (ties: by name), which makes the streams
   that must leave their owners as few as possible.
3. A member over its quota gives up its excess to the pool: the streams it has least affinity for (a rendezvous
   score of stream and member), so the choice does not depend on the order anything was listed in.
4. Each pooled stream, in name order, goes to the member with room that it has most affinity for.

So when a member joins, it takes only the excess of those over the new quotas (200 streams over 3 → 4 members
moves exactly 50); when one leaves, only its streams move; a plan applied and balanced again moves nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

__all__ = ["Move", "Plan", "balance", "quotas"]

_MASK = (1 << 64) - 1


class Move(NamedTuple):
    """One stream changing hands: ``source`` is ``None`` for a stream nobody held (new, or its owner gone)."""

    stream: str
    source: str | None
    target: str


class Plan(NamedTuple):
    """The target assignment (stream → member) and the moves from the current one, by stream name."""

    assignment: dict[str, str]
    moves: list[Move]


def _hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit score from two names' hashes combined."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _shed(held: list[str], excess: int, member_hash: int) -> list[str]:
    """Remove and return the ``excess`` streams of ``held`` its member has least affinity for."""
    if excess <= 0:
        return []
    held.sort(key=lambda s: (_mix(_hash(s) ^ member_hash), s))
    shed = held[:excess]
    del held[:excess]
    return shed


def quotas(loads: Mapping[str, int], total: int) -> dict[str, int]:
    """How many of ``total`` streams each member may hold: ``total // m`` or one more, the larger quotas to the
    members with the largest ``loads`` (ties by name), so that as few streams as possible leave their owners."""
    if not loads:
        return {}
    base, extra = divmod(total, len(loads))
    order = sorted(loads, key=lambda m: (-loads[m], m))
    return {m: base + (1 if i < extra else 0) for i, m in enumerate(order)}


def balance(streams: Iterable[str], members: Iterable[str], current: Mapping[str, str]) -> Plan:
    """The target assignment of ``streams`` over the live ``members``, given ``current`` (stream → owner; owners
    not live and streams not listed are ignored), and the moves that reach it."""
    names = sorted(set(streams))
    live = sorted(set(members))
    if not live:
        return Plan({}, [])
    member_hash = {m: _hash(m) for m in live}
    kept: dict[str, list[str]] = {m: [] for m in live}
    pool: list[str] = []
    for s in names:
        kept.get(current.get(s, ""), pool).append(s)
    quota = quotas({m: len(held) for m, held in kept.items()}, len(names))
    for m, held in kept.items():
        pool += _shed(held, len(held) - quota[m], member_hash[m])
    assignment = {s: m for m, held in kept.items() for s in held}
    room = {m: quota[m] - len(held) for m, held in kept.items()}
    for s in sorted(pool):
        h = _hash(s)
        target = max((m for m in live if room[m] > 0), key=lambda m: (_mix(h ^ member_hash[m]), m))
        room[target] -= 1
        assignment[s] = target
    moves = [Move(s, current.get(s), assignment[s]) for s in names if current.get(s) != assignment[s]]
    return Plan(dict(sorted(assignment.items())), moves)
