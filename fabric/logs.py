"""Log output: one JSON object per line when asked for (log shippers), readable lines on a terminal otherwise.

Either way a record carries the ids of the event it is about: the worker's own lines pass them (``stream``,
``entry_id``, ``group``, ``consumer``, ``event_id``, ``correlation_id``), and lines a handler logs while handling
an event get the event's ids from the ``log_context`` middleware. In text format they follow the message as
``key=value``; in JSON they are fields.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
from typing import Any

import msgspec

from fabric.events import Event
from fabric.handler import Context, HandlerFn, blind_to_timeouts
from fabric.supervisor import LABEL_ENV

__all__ = ["FORMAT_ENV", "FORMATS", "JsonFormatter", "TextFormatter", "configure", "log_context"]

FORMAT_ENV = "FABRIC_LOG_FORMAT"
FORMATS = ("text", "json")
IDS = ("event_id", "correlation_id", "stream", "entry_id", "group", "consumer")
"""Fields a record may carry beside its message, in the order text output shows them."""

_current: contextvars.ContextVar[tuple[Event, Context] | None] = contextvars.ContextVar("fabric_event", default=None)
_encode = msgspec.json.Encoder().encode


@blind_to_timeouts
def log_context(inner: HandlerFn) -> HandlerFn:
    """Middleware: while the handler runs, records it logs carry the event's ids."""

    async def handle(event: Event, ctx: Context) -> list[Event]:
        token = _current.set((event, ctx))
        try:
            return await inner(event, ctx)
        finally:
            _current.reset(token)

    return handle


class _EventIds(logging.Filter):
    """Adds the ids of the event being handled to records that do not carry their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _current.get()
        if found is not None and not hasattr(record, "event_id"):
            event, ctx = found
            record.event_id = event.event_id
            record.correlation_id = event.root_id
            record.stream = ctx.stream
            record.entry_id = ctx.entry_id
            record.group = ctx.group
            record.consumer = ctx.consumer
        return True


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in IDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., "worker": ..., <ids>, "exc": ...}``, one line
    each (``worker``: the label a supervisor gave this process, if any)."""

    def __init__(self) -> None:
        super().__init__()
        self.worker = os.environ.get(LABEL_ENV)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            **({"worker": self.worker} if self.worker else {}), **_ids(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message  key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as a readable line, its ids after the message."""
        line = super().format(record)
        ids = _ids(record)
        return line + ("  " + " ".join(f"{k}={v}" for k, v in ids.items()) if ids else "")


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Send fabric's (and the handlers') logs to stderr in ``fmt`` (``text`` or ``json``) at ``level``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_EventIds())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
