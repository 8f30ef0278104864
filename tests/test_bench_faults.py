"""``python -m bench.faults`` (the fault suite's long form) runs a case end to end and writes its results: one
cheap case, tiny sizes (its figures are checked, its timings are not)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _need

RUN_DEADLINE_S = 60.0
"""A deadline against a hang, far above the few seconds the run takes; not a timing under test."""
CASE = "handler always raises"
EVENTS = 20


@pytest.mark.timeout(RUN_DEADLINE_S + 30)
def test_one_case_of_the_long_form_writes_its_results_and_loses_nothing(tmp_path: Path) -> None:
    _need("redis-server")  # the case starts a redis-server of its own; CI fails without one instead of skipping
    results = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--only", CASE, "--repeat", "1", "--events", str(EVENTS),
         "--json", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=RUN_DEADLINE_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(results.read_text())
    assert (doc["events"], doc["repeat"]) == (EVENTS, 1)
    [row] = doc["cases"]
    assert row["case"] == CASE and row["errors"] == 0 and row["kept"], row
    assert row["lost"] == 0 and row["unexpected"] == 0, row
    assert row["acknowledged"] == row["dead_lettered"] == EVENTS, row
    assert [r["lost"] for r in row["each"]] == [0]
    table = results.with_suffix(".md").read_text()
    assert f"| {CASE} | no loss | {EVENTS} |" in table, table
