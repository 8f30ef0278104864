"""The fault suite's checker: every run scored the same way, from records that outlive the processes making them.

Records are lines in append-only journal files under one run directory (``Journal``: a single ``os.write`` per
line on an ``O_APPEND`` descriptor, so a line is whole or absent even when its writer is SIGKILLed, and a file
on the test's disk survives any fault done to Redis):

- producers write ``publish.*.log`` lines: ``P OUTCOME EVENT_ID STREAM T``, OUTCOME one of
  ``ack`` (Redis confirmed the entry), ``indeterminate`` (the publish failed without knowing whether it landed:
  timeout, reset, connection lost past its retries) or ``refused`` (Redis refused it before writing: OOM, GAP);
- handlers write ``handled.*.log`` lines: ``H EVENT_ID STREAM ENTRY_ID DELIVERY PID T``, once per completed call.

Dead letters live in Redis (``read_dead_letters`` reads them after the fault, decoding each original to its
event id). ``T`` is wall-clock Unix seconds (one host, so the processes share the clock).

``score(publishes, handlings, dead_letters, fault_end=...)`` gives a ``Score``:

``acknowledged``   events whose publish Redis confirmed
``indeterminate``  events whose publish ended unknown (it may or may not have landed)
``refused``        events Redis refused before writing
``handled``        distinct events some handler completed
``dead_lettered``  distinct events (or undecodable entries) in a dead-letter stream
``lost``           acknowledged, yet neither handled nor dead-lettered (``lost_ids`` names them)
``duplicated``     handler completions beyond the first per event (at-least-once redeliveries)
``unexpected``     handled events no producer ever tried to publish
``recovery_s``     from ``fault_end`` until the last event acknowledged by then (the backlog the fault left) was
                   first handled or dead-lettered; events acknowledged later are the flow going on, not recovery
                   (None without a fault end, or while something acknowledged is still unaccounted for)
``reported_lost``  what the fabric itself reported lost (the caller passes it: a publisher's detected loss)

Typical use in a case::

    journal_dir = tmp_path / "journal"
    ...  # producers and worker processes write there
    s = score(*read_journals(journal_dir), await read_dead_letters(client, keys), fault_end=t_end)
    assert s.lost == 0, s.describe()
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DeadLettered",
    "Handling",
    "Journal",
    "Outcome",
    "Publish",
    "Score",
    "read_dead_letters",
    "read_journals",
    "score",
]

Outcome = Literal["ack", "indeterminate", "refused"]
OUTCOMES: tuple[Outcome, ...] = ("ack", "indeterminate", "refused")


@dataclass(frozen=True)
class Publish:
    """One event a producer tried to publish, and how that ended."""

    outcome: Outcome
    event_id: str
    stream: str
    t: float


@dataclass(frozen=True)
class Handling:
    """One handler call that completed (its commit may still have been lost)."""

    event_id: str
    stream: str
    entry_id: str
    delivery: int
    pid: int
    t: float


@dataclass(frozen=True)
class DeadLettered:
    """One dead letter: the event id of its original ('' when the original did not decode to an event)."""

    event_id: str
    origin_stream: str
    origin_id: str
    error_type: str
    error: str
    t: float
    """When it was dead-lettered: its dead-letter entry id's time, Unix seconds."""


class Journal:
    """An append-only file of whole lines, safe to write from any process and to be killed mid-write."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, *fields: object) -> None:
        """Append one line of space-separated fields (none may contain a space or a newline)."""
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())

    def published(self, outcome: Outcome, event_ids: Iterable[str], stream: str) -> None:
        """Record how the publish of these events (all to ``stream``) ended."""
        now = time.time()
        lines = "".join(f"P {outcome} {e} {stream} {now:.6f}\n" for e in event_ids)
        if lines:
            os.write(self._fd, lines.encode())

    def handled(self, event_id: str, stream: str, entry_id: str, delivery: int) -> None:
        """Record one completed handler call."""
        self.write("H", event_id, stream, entry_id, delivery, os.getpid(), f"{time.time():.6f}")

    def close(self) -> None:
        os.close(self._fd)


def read_journals(directory: Path) -> tuple[list[Publish], list[Handling]]:
    """Every publish and handling recorded under ``directory`` (all its ``*.log`` files)."""
    publishes: list[Publish] = []
    handlings: list[Handling] = []
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if parts[0] == "P" and len(parts) == 5 and parts[1] in OUTCOMES:
                publishes.append(Publish(parts[1], parts[2], parts[3], float(parts[4])))  # type: ignore[arg-type]
            elif parts[0] == "H" and len(parts) == 7:
                handlings.append(Handling(parts[1], parts[2], parts[3], int(parts[4]), int(parts[5]), float(parts[6])))
            else:
                raise ValueError(f"{path}: not a journal line: {line!r}")
    return publishes, handlings


async def read_dead_letters(client: Any, keys: Any) -> list[DeadLettered]:
    """Every dead letter of the namespace, with its original's event id where it decodes."""
    from fabric.deadletter import find, original_event
    from fabric.errors import DecodeError

    out = []
    for letter in await find(client, keys):
        try:
            event_id = original_event(letter).event_id
        except DecodeError:
            event_id = ""
        out.append(DeadLettered(event_id, letter.origin_stream, letter.origin_id, letter.error_type, letter.error,
                                letter.dead_ms / 1000))
    return out


@dataclass(frozen=True)
class Score:
    """One run's figures (see the module docstring)."""

    acknowledged: int
    indeterminate: int
    refused: int
    handled: int
    dead_lettered: int
    lost: int
    duplicated: int
    unexpected: int
    recovery_s: float | None
    reported_lost: int = 0
    lost_ids: frozenset[str] = field(default=frozenset(), repr=False)
    unexpected_ids: frozenset[str] = field(default=frozenset(), repr=False)

    def row(self) -> dict[str, Any]:
        """The figures as a flat dict (the long form's JSON and table rows)."""
        return {
            "acknowledged": self.acknowledged, "indeterminate": self.indeterminate, "refused": self.refused,
            "handled": self.handled, "dead_lettered": self.dead_lettered, "lost": self.lost,
            "reported_lost": self.reported_lost, "duplicated": self.duplicated, "unexpected": self.unexpected,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 3),
        }

    def describe(self) -> str:
        """The figures on one line, with a few lost and unexpected ids: an assertion message."""
        text = " ".join(f"{k}={v}" for k, v in self.row().items())
        if self.lost_ids:
            text += f"; lost e.g. {sorted(self.lost_ids)[:5]}"
        if self.unexpected_ids:
            text += f"; unexpected e.g. {sorted(self.unexpected_ids)[:5]}"
        return text


def score(
    publishes: Iterable[Publish],
    handlings: Iterable[Handling],
    dead_letters: Iterable[DeadLettered] = (),
    *,
    fault_end: float | None = None,
    reported_lost: int = 0,
) -> Score:
    """Score one run. An event published more than once (a retry after an indeterminate outcome) counts by its
    best outcome: ack over indeterminate over refused."""
    best: dict[str, Outcome] = {}
    acked_at: dict[str, float] = {}
    rank = {o: i for i, o in enumerate(OUTCOMES)}
    for p in publishes:
        known = best.get(p.event_id)
        if known is None or rank[p.outcome] < rank[known]:
            best[p.event_id] = p.outcome
        if p.outcome == "ack":
            acked_at[p.event_id] = min(p.t, acked_at.get(p.event_id, p.t))
    by_outcome = Counter(best.values())
    acked = {e for e, o in best.items() if o == "ack"}

    calls = Counter(h.event_id for h in handlings)
    first_handled: dict[str, float] = {}
    for h in handlings:
        first_handled[h.event_id] = min(h.t, first_handled.get(h.event_id, h.t))
    letters = list(dead_letters)
    dead: dict[str, float] = {}
    undecodable = 0
    for d in letters:
        if d.event_id:
            dead[d.event_id] = min(d.t, dead.get(d.event_id, d.t))
        else:
            undecodable += 1

    accounted = first_handled.keys() | dead.keys()
    lost = frozenset(acked - accounted)
    unexpected = frozenset(first_handled.keys() - best.keys())
    recovery = None
    if fault_end is not None and not lost:
        backlog = [e for e in acked if acked_at[e] <= fault_end]  # later ones are the flow going on, not recovery
        done = [min(first_handled.get(e, float("inf")), dead.get(e, float("inf"))) for e in backlog]
        recovery = max(0.0, max(done, default=fault_end) - fault_end)
    return Score(
        acknowledged=by_outcome["ack"], indeterminate=by_outcome["indeterminate"], refused=by_outcome["refused"],
        handled=len(first_handled), dead_lettered=len(dead) + undecodable, lost=len(lost),
        duplicated=sum(calls.values()) - len(calls), unexpected=len(unexpected), recovery_s=recovery,
        reported_lost=reported_lost, lost_ids=lost, unexpected_ids=unexpected,
    )
