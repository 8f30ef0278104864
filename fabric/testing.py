"""Test handlers without Redis: call one exactly as a worker would and get its outputs back.

    outputs = await run_handler(on_tick, Tick(symbol="BTC", bid=1.0, ask=1.1))
    assert outputs[0].causation_id == ...

Outputs come back as the worker would publish them: with the input's correlation id, the input's
``event_id`` as causation id, and the handler's name as producer. ``Retry`` and ``Reject`` propagate, so a
test can assert them with ``pytest.raises``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from fabric.events import Event
from fabric.handler import Context, as_handler
from fabric.keys import Keys, Priority

__all__ = ["make_context", "run_handler"]


def make_context(event: Event, *, topic: str | None = None, priority: Priority = Priority.NORMAL,
                 delivery_count: int = 1, group: str = "test", consumer: str = "test-consumer") -> Context:
    """The ``Context`` a worker would pass for ``event``."""
    topic = topic or event.default_topic
    return Context(
        stream=Keys().stream(topic, priority, event.symbol), topic=topic, priority=priority.label,
        symbol=event.symbol, entry_id="0-1", delivery_count=delivery_count, group=group, consumer=consumer,
    )


async def run_handler(fn: Callable[..., Any], event: Event, *, name: str = "handler", **context: Any) -> list[Event]:
    """Run ``fn`` on ``event`` like a worker; return its outputs stamped as the worker stamps them."""
    outputs = await as_handler(fn, name)(event, make_context(event, **context))
    return [
        msgspec.structs.replace(o, correlation_id=event.root_id, causation_id=event.event_id, producer=name)
        for o in outputs
    ]
