import pytest

from fabric.errors import Reject
from fabric.events import Indicator, Tick
from fabric.testing import run_handler


async def mid(event: Tick) -> Indicator:
    return Indicator(symbol=event.symbol, name="mid", value=(event.bid + event.ask) / 2)


async def picky(event: Tick, ctx) -> None:
    if event.bid > event.ask:
        raise Reject(f"crossed book on {ctx.symbol}")


async def test_outputs_are_stamped_like_the_worker_stamps_them():
    tick = Tick(symbol="BTC", bid=1.0, ask=3.0)
    [out] = await run_handler(mid, tick, name="handlers.mid")
    assert (out.value, out.causation_id, out.correlation_id, out.producer) == (2.0, tick.event_id, tick.event_id,
                                                                               "handlers.mid")


async def test_handler_signals_propagate_with_a_context():
    with pytest.raises(Reject, match="crossed book on BTC"):
        await run_handler(picky, Tick(symbol="BTC", bid=2.0, ask=1.0))
