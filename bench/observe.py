"""What one histogram observation costs: fabric's ``Tally`` against prometheus-client's ``Histogram``, in its
default mode and in its multiprocess mode (a memory-mapped file per process).

``python -m bench.observe`` prints microseconds per observation for each (median of 5 runs of 200,000).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import timeit

from fabric.tally import SECONDS_BUCKETS, Tally

N = 200_000
RUNS = 5


def _per_call_us(call: object) -> float:
    times = [timeit.timeit(call, number=N) / N * 1e6 for _ in range(RUNS)]  # type: ignore[arg-type]
    return statistics.median(times)


def _prometheus() -> float:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    hist = prometheus_client.Histogram("x_seconds", "x", registry=registry, buckets=SECONDS_BUCKETS)
    return _per_call_us(lambda: hist.observe(0.0003))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--prometheus":
        print(f"{_prometheus():.3f}")
        return
    tally = Tally(SECONDS_BUCKETS)
    print(f"fabric Tally.observe:                    {_per_call_us(lambda: tally.observe(0.0003)):.3f} µs")
    print(f"prometheus_client Histogram.observe:     {_prometheus():.3f} µs")
    with tempfile.TemporaryDirectory() as directory:  # the mode is chosen by the environment at import time
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        out = subprocess.run([sys.executable, "-m", "bench.observe", "--prometheus"], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    print(f"  the same, multiprocess mode:           {float(out):.3f} µs")


if __name__ == "__main__":
    main()
