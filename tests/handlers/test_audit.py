import pytest

from fabric.errors import Reject
from fabric.events import Fill, Order, Side, Tick
from fabric.testing import run_handler
from handlers.audit import AuditEntry, audit

pytestmark = pytest.mark.timeout(60)


async def test_orders_and_fills_become_audit_entries_in_their_chain():
    order = Order(symbol="A", order_id="A-1", side=Side.BUY, quantity=5, mark_price=10.0, market_ts_ns=9, seq=1,
                  correlation_id="c" * 32)
    fill = Fill(symbol="A", order_id="A-1", side=Side.BUY, price=10.01, quantity=5, commission=0.02, seq=1)
    [o] = await run_handler(audit, order, name="handlers.audit:audit")
    [f] = await run_handler(audit, fill, name="handlers.audit:audit")
    assert isinstance(o, AuditEntry) and o.default_topic == "audit"
    assert (o.kind, o.order_id, o.price, o.market_ts_ns, o.source_event_id, o.correlation_id) == (
        "order", "A-1", 10.0, 9, order.event_id, "c" * 32)
    assert (f.kind, f.price, f.commission, f.source_event_id) == ("fill", 10.01, 0.02, fill.event_id)


async def test_anything_else_is_rejected_with_the_fix():
    with pytest.raises(Reject, match="order and fill topics only"):
        await audit(Tick(symbol="A", bid=1.0, ask=2.0))
