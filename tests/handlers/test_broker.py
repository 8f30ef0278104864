import pytest

from fabric.errors import Reject
from fabric.events import Order, OrderType, Side
from handlers.broker import Costs, ExchangeUnavailable, Outage, make_broker_handler, paper_exchange

pytestmark = pytest.mark.timeout(60)

COSTS = Costs(slippage_bps=10.0, commission_bps=5.0)


def _order(side: Side, **kw) -> Order:
    return Order(symbol="A", order_id="A-3", side=side, quantity=100.0, mark_price=50.0, market_ts_ns=7, seq=3,
                 **kw)


@pytest.mark.parametrize(("side", "price"), [(Side.BUY, 50.05), (Side.SELL, 49.95)])
async def test_slippage_moves_the_price_against_the_order_and_commission_is_charged(side, price):
    # given a paper broker with 10 bps slippage and 5 bps commission
    broker = make_broker_handler(paper_exchange(COSTS))
    # when it fills an order for 100 at a mark of 50
    fill = await broker(_order(side))
    # then a buy pays more and a sell gets less than the mark, and the commission is 5 bps of the traded value
    assert fill.price == pytest.approx(price)
    assert fill.commission == pytest.approx(price * 100 * 5 / 10_000)
    # and the fill is the order's: same id, side, quantity, market time and sequence number
    assert (fill.order_id, fill.fill_id, fill.side, fill.quantity, fill.market_ts_ns, fill.seq) == (
        "A-3", "A-3-1", side, 100.0, 7, 3)


async def test_the_same_order_always_gives_the_same_fill():
    broker = make_broker_handler(paper_exchange(COSTS))
    a, b = await broker(_order(Side.BUY)), await broker(_order(Side.BUY))
    assert (a.price, a.commission, a.fill_id, a.seq) == (b.price, b.commission, b.fill_id, b.seq)


async def test_an_exchange_outage_raises_and_the_order_goes_through_once_it_is_back():
    # given a broker whose exchange is down
    exchange = Outage(paper_exchange(COSTS))
    broker = make_broker_handler(exchange)
    exchange.down = True
    # when an order comes, then the call fails (a worker retries it; a breaker counts it)
    with pytest.raises(ExchangeUnavailable, match="exchange down: order A-3 not sent"):
        await broker(_order(Side.BUY))
    # and once the exchange is back the same order fills
    exchange.down = False
    assert (await broker(_order(Side.BUY))).order_id == "A-3"


async def test_an_order_the_paper_broker_cannot_fill_is_rejected():
    broker = make_broker_handler(paper_exchange(COSTS))
    with pytest.raises(Reject, match="MARKET orders"):
        await broker(_order(Side.BUY, order_type=OrderType.LIMIT, price=49.0))


async def test_a_remote_outage_lasts_while_its_key_is_in_redis(redis, keys):
    # given a broker whose exchange is down while the namespace's outage key exists
    from handlers.broker import RemoteOutage, outage_key

    broker = make_broker_handler(RemoteOutage(paper_exchange(COSTS), redis, outage_key(keys.ns)))
    # when another process sets the key, orders fail as the exchange being unavailable (what the breaker counts)
    await redis.set(outage_key(keys.ns), "test", px=60_000)
    with pytest.raises(ExchangeUnavailable, match=r"exchange down .*: order A-3 not sent; it is retried"):
        await broker(_order(Side.BUY))
    # then once the key is gone, the same order fills
    await redis.delete(outage_key(keys.ns))
    assert (await broker(_order(Side.BUY))).fill_id == "A-3-1"
