"""How commands print: aligned tables for people, JSON for scripts, and progress bars only on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec
import typer

__all__ = ["age", "emit_json", "progress", "table", "timestamp"]


def emit_json(data: Any) -> None:
    """Write ``data`` (Structs, lists, dicts, numbers, strings) to stdout as one JSON document."""
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    sys.stdout.flush()


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str = "(none)") -> None:
    """Print rows under upper-case headers in aligned columns (numbers right-aligned)."""
    if not rows:
        typer.echo(empty)
        return
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] is None
                   for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    typer.echo(line([h.upper() for h in headers]).rstrip())
    for row in cells:
        typer.echo(line(row).rstrip())


def age(ms: int | float | None) -> str:
    """A duration in milliseconds, short: ``850ms``, ``12.3s``, ``4m05s``, ``3h02m``, ``2d04h``."""
    if ms is None:
        return "-"
    if ms < 1_000:
        return f"{int(ms)}ms"
    s = ms / 1_000
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def timestamp(ms: int | None) -> str:
    """A Unix time in milliseconds as local ``YYYY-MM-DD HH:MM:SS.mmm``."""
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


@contextmanager
def progress(total: int, label: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; a bar on stderr while it runs, only when stderr is a terminal and not ``quiet``."""
    if quiet or not sys.stderr.isatty() or total <= 0:
        yield lambda n: None
        return
    with typer.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update
