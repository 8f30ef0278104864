"""The audit trail: every order and fill, copied as an ``AuditEntry`` onto the ``audit`` topic.

An audit group reads the ``order`` and ``fill`` topics and runs ``audit`` on each; its entries keep what a
reviewer asks of a trade (what, when in market time, at what price and cost, and the chain it belongs to
through the envelope's correlation id) on one topic that retention can keep longer than the pipeline's.
Alerts for risk breaches need no copy: they are ``Alert`` events on the ``alert`` topic already.
"""

from __future__ import annotations

from typing import ClassVar

from fabric.errors import Reject
from fabric.events import Event, Fill, Order, Side
from fabric.keys import Priority

__all__ = ["AuditEntry", "audit"]


class AuditEntry(Event, frozen=True, kw_only=True):
    """One order or fill, as the audit trail keeps it."""

    default_topic: ClassVar[str] = "audit"
    default_priority: ClassVar[Priority] = Priority.HIGH

    symbol: str
    kind: str
    """``order`` or ``fill``."""
    order_id: str
    side: Side
    quantity: float
    price: float
    """The fill price, or for an order the mark price it was made at."""
    commission: float = 0.0
    market_ts_ns: int = 0
    seq: int = 0
    source_event_id: str = ""
    """The ``event_id`` of the order or fill recorded."""


async def audit(event: Event) -> AuditEntry:
    """The audit entry for an order or a fill."""
    if isinstance(event, Order):
        return AuditEntry(symbol=event.symbol, kind="order", order_id=event.order_id, side=event.side,
                          quantity=event.quantity, price=event.mark_price, market_ts_ns=event.market_ts_ns,
                          seq=event.seq, source_event_id=event.event_id)
    if isinstance(event, Fill):
        return AuditEntry(symbol=event.symbol, kind="fill", order_id=event.order_id, side=event.side,
                          quantity=event.quantity, price=event.price, commission=event.commission,
                          market_ts_ns=event.market_ts_ns, seq=event.seq, source_event_id=event.event_id)
    raise Reject(f"the audit trail records orders and fills, not {type(event).__name__}: "
                 "subscribe the audit group to the order and fill topics only")
