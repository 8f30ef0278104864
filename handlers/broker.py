"""A paper broker: market orders filled at the order's mark price moved by slippage, less commission.

The broker stage holds no state: an order always gives the same fill (``fill_id`` and ``seq`` come from the
order), so a redelivered order gives a fill the portfolio recognises as a repeat. The call to the "exchange"
is a separate async function, ``Exchange``, so a breaker can guard it and a test or a chaos run can make it
fail: ``Outage`` wraps one and raises ``ExchangeUnavailable`` while it is down; ``RemoteOutage`` does the same
while a key exists in Redis (``outage_key``), so another process (``fabric demo --chaos``) can take the workers'
exchange down, for as long as the key's expiry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from redis.asyncio import Redis

from fabric.errors import Reject
from fabric.events import Fill, Order, OrderType, Side

__all__ = [
    "Costs", "Exchange", "ExchangeUnavailable", "Outage", "RemoteOutage", "cash_change", "make_broker_handler",
    "outage_key", "paper_exchange",
]

Exchange = Callable[[Order], Awaitable[Fill]]
"""Sends an order to a venue and returns its fill; raises when the venue cannot be reached."""


class Costs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What trading costs: slippage against the mark price and commission on the traded value, in basis points."""

    slippage_bps: float = 2.0
    commission_bps: float = 1.0

    def fill_price(self, side: Side, mark_price: float) -> float:
        """The price a market order fills at: worse than the mark by the slippage, in the order's direction."""
        sign = 1.0 if side is Side.BUY else -1.0
        return mark_price * (1.0 + sign * self.slippage_bps / 10_000)

    def commission(self, price: float, quantity: float) -> float:
        """The commission on trading ``quantity`` at ``price``."""
        return price * quantity * self.commission_bps / 10_000


def cash_change(side: Side, price: float, quantity: float, commission: float) -> float:
    """How a fill changes cash: a buy pays the value, a sell receives it, both pay the commission."""
    value = price * quantity
    return (-value if side is Side.BUY else value) - commission


class ExchangeUnavailable(Exception):
    """The exchange could not be reached; the order was not sent (retrying is safe)."""


def paper_exchange(costs: Costs) -> Exchange:
    """An exchange that fills every market order in full, at once, with ``costs`` applied."""

    async def execute(order: Order) -> Fill:
        price = costs.fill_price(order.side, order.mark_price)
        return Fill(symbol=order.symbol, order_id=order.order_id, side=order.side, price=price,
                    quantity=order.quantity, commission=costs.commission(price, order.quantity),
                    fill_id=f"{order.order_id}-1", market_ts_ns=order.market_ts_ns, seq=order.seq)

    return execute


class Outage:
    """An exchange that can be taken down: while ``down`` is True every call raises ``ExchangeUnavailable``."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.down = False

    async def __call__(self, order: Order) -> Fill:
        """Send the order, unless the exchange is down."""
        if self.down:
            raise ExchangeUnavailable(f"exchange down: order {order.order_id} not sent; it is retried")
        return await self.exchange(order)


def outage_key(namespace: str) -> str:
    """The key that takes the paper exchange down while it exists: ``NS:outage:exchange``, a string set with an
    expiry (so an outage always ends) by ``fabric demo --chaos``, read by ``RemoteOutage`` before each order."""
    return f"{namespace}:outage:exchange"


class RemoteOutage:
    """An exchange that is down while ``key`` exists in Redis: one EXISTS per order, orders being rare."""

    def __init__(self, exchange: Exchange, client: Redis, key: str) -> None:
        self.exchange = exchange
        self.client = client
        self.key = key

    async def __call__(self, order: Order) -> Fill:
        """Send the order, unless the key says the exchange is down."""
        if await self.client.exists(self.key):
            raise ExchangeUnavailable(f"exchange down ({self.key} is set): order {order.order_id} not sent; "
                                      "it is retried")
        return await self.exchange(order)


def make_broker_handler(exchange: Exchange) -> Callable[[Order], Awaitable[Fill]]:
    """The broker stage: a handler taking an ``Order`` and returning its ``Fill`` from ``exchange``."""

    async def broker(order: Order) -> Fill:
        """Execute a market order."""
        if order.order_type is not OrderType.MARKET or order.mark_price <= 0:
            raise Reject(f"order {order.order_id}: the paper broker fills MARKET orders with a mark_price above 0, "
                         f"got {order.order_type.value} at mark {order.mark_price}")
        return await exchange(order)

    return broker
