import math
import random

import msgspec
import pytest

from fabric.events import Bar, Features
from handlers import reference
from handlers.indicators import (
    Bollinger,
    Ema,
    IndicatorState,
    Macd,
    Rsi,
    Sma,
    make_indicator_handler,
    update_features,
)
from handlers.state import MemoryStore

pytestmark = pytest.mark.timeout(60)

SIZES = [0, 1, 2, 13, 14, 15, 19, 20, 21, 25, 26, 33, 34, 35, 100, 1000]


def _closes(seed: int, n: int) -> list[float]:
    """A seeded random walk of closes; every tenth series has flat stretches (zero changes, zero variance)."""
    rng = random.Random(seed)
    price, out = rng.uniform(1.0, 1000.0), []
    for _ in range(n):
        if seed % 10 or rng.random() < 0.5:
            price *= math.exp(rng.gauss(0.0, 0.01))
        out.append(price)
    return out


def _close(a: object, b: object, scale_tol: float = 1e-9) -> bool:
    """Equal within float tolerance: 1e-9 relative, or ``scale_tol`` of the values' size for values near 0."""
    if a is None or b is None:
        return a is b
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        return all(_close(x, y, scale_tol * max(map(abs, b))) for x, y in zip(a, b, strict=True))
    assert isinstance(a, float) and isinstance(b, float)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=scale_tol)


# A standard deviation near 0 is only known to about sqrt(machine epsilon) of the prices (the variance, to
# epsilon): flat stretches put Bollinger bands there, so they are compared to 1e-7 of the price level.
BANDS_TOL = 1e-7


CASES = [
    ("sma_20", lambda: Sma(20), lambda xs: reference.sma(xs, 20), 1e-9),
    ("sma_5", lambda: Sma(5), lambda xs: reference.sma(xs, 5), 1e-9),
    ("ema_20", lambda: Ema(20), lambda xs: reference.ema(xs, 20), 1e-9),
    ("ema_12", lambda: Ema(12), lambda xs: reference.ema(xs, 12), 1e-9),
    ("rsi_14", lambda: Rsi(14), lambda xs: reference.rsi(xs, 14), 1e-9),
    ("rsi_2", lambda: Rsi(2), lambda xs: reference.rsi(xs, 2), 1e-9),
    ("macd", Macd, reference.macd, 1e-9),
    ("bollinger_20", Bollinger, reference.bollinger, BANDS_TOL),
    ("bollinger_3", lambda: Bollinger(3, 1.5), lambda xs: reference.bollinger(xs, 3, 1.5), BANDS_TOL),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("name", "make", "ref", "tol"), CASES, ids=[c[0] for c in CASES])
def test_incremental_indicator_matches_its_reference(name, make, ref, tol, n):
    for seed in range(10):
        # given a seeded random series of closes
        closes = _closes(seed, n)
        # when the incremental indicator takes them one at a time
        indicator = make()
        got = [indicator.update(x) for x in closes]
        # then every value (and every warm-up None) matches the plain computation
        want = ref(closes)
        bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _close(g, w, tol)]
        assert not bad, f"{name}, seed {seed}: first mismatches {bad[:3]}"


@pytest.mark.parametrize("seed", range(5))
def test_indicator_state_survives_encoding_between_bars(seed):
    # given closes applied to one state kept in memory, and to another encoded and decoded after every close
    closes = _closes(seed, 200)
    kept, decoder = IndicatorState(), msgspec.msgpack.Decoder(IndicatorState)
    stored = msgspec.msgpack.encode(IndicatorState())
    for x in closes:
        want = update_features(kept, x)
        state = decoder.decode(stored)
        got = update_features(state, x)
        stored = msgspec.msgpack.encode(state)
        # then both give exactly the same values at every bar
        assert got == want


def test_window_variance_stays_accurate_over_a_long_series():
    # given 100,000 closes around 10,000 (large values, small moves: where running sums lose precision)
    rng = random.Random(1)
    closes = [10_000 + rng.gauss(0, 0.5) for _ in range(100_000)]
    bands = Bollinger()
    for x in closes:
        got = bands.update(x)
    # then the last bands still match the plain computation on the last window
    assert _close(got, reference.bollinger(closes[-20:])[-1], BANDS_TOL)


async def test_indicator_stage_publishes_one_features_event_per_bar_of_its_timeframe():
    # given the indicator stage on 1s bars and 40 one-second bars
    handler = make_indicator_handler(MemoryStore(IndicatorState), "1s")
    closes = _closes(3, 40)
    outputs = []
    for seq, close in enumerate(closes, start=1):
        bar = Bar(symbol="A", timeframe="1s", start_ns=seq * 10**9, open=close, high=close, low=close, close=close,
                  seq=seq)
        outputs.append(await handler(bar))
    # when a 1m bar arrives on the same topic
    other = await handler(Bar(symbol="A", timeframe="1m", start_ns=0, open=1, high=1, low=1, close=1, seq=1))
    # then each 1s bar gave Features numbered like it, timed at its end, with the indicators ready by then
    assert all(isinstance(f, Features) for f in outputs)
    assert [f.seq for f in outputs] == list(range(1, 41))
    assert outputs[0].market_ts_ns == 2 * 10**9
    assert set(outputs[0].values) == {"close"}
    assert set(outputs[-1].values) == {"close", "sma_20", "ema_20", "rsi_14", "macd", "macd_signal", "macd_hist",
                                       "bb_lower", "bb_mid", "bb_upper"}
    assert _close(outputs[-1].values["rsi_14"], reference.rsi(closes)[-1])
    # and the 1m bar was not its business
    assert other is None
