"""The checker scores every run the same way: what was acknowledged, handled, dead-lettered, lost, doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.checker import DeadLettered, Handling, Journal, Publish, read_journals, score

pytestmark = pytest.mark.timeout(30)


def _pub(event_id: str, outcome: str = "ack", t: float = 0.0) -> Publish:
    return Publish(outcome, event_id, "s", t)  # type: ignore[arg-type]


def _handled(event_id: str, t: float = 0.0, delivery: int = 1) -> Handling:
    return Handling(event_id, "s", "1-0", delivery, 1, t)


def _dead(event_id: str, t: float = 0.0) -> DeadLettered:
    return DeadLettered(event_id, "s", "1-0", "RuntimeError", "boom", t)


def test_an_acknowledged_event_neither_handled_nor_dead_lettered_is_lost():
    # Given three acknowledged events: one handled, one dead-lettered, one neither
    publishes = [_pub("a"), _pub("b"), _pub("c")]

    # When the run is scored
    s = score(publishes, [_handled("a")], [_dead("b")])

    # Then only the third is lost, and named
    assert (s.acknowledged, s.handled, s.dead_lettered, s.lost) == (3, 1, 1, 1)
    assert s.lost_ids == {"c"}


def test_an_indeterminate_or_refused_publish_never_counts_as_lost():
    s = score([_pub("a", "indeterminate"), _pub("b", "refused")], [])
    assert (s.acknowledged, s.indeterminate, s.refused, s.lost) == (0, 1, 1, 0)


def test_a_retried_publish_counts_once_by_its_best_outcome():
    # Given an event whose first publish ended unknown and whose retry was acknowledged
    s = score([_pub("a", "indeterminate"), _pub("a", "ack")], [_handled("a")])
    assert (s.acknowledged, s.indeterminate, s.lost) == (1, 0, 0)


def test_second_and_later_completions_of_an_event_are_duplicates():
    s = score([_pub("a"), _pub("b")], [_handled("a"), _handled("a", delivery=2), _handled("a"), _handled("b")])
    assert (s.handled, s.duplicated) == (2, 2)


def test_a_handled_event_no_producer_published_is_unexpected():
    s = score([_pub("a")], [_handled("a"), _handled("zz")])
    assert s.unexpected == 1 and s.unexpected_ids == {"zz"}


def test_a_handled_event_whose_publish_ended_unknown_is_not_unexpected():
    s = score([_pub("a", "indeterminate")], [_handled("a")])
    assert s.unexpected == 0


def test_recovery_runs_from_the_fault_end_to_the_last_acknowledged_event_first_accounted_for():
    # Given a fault that ended at t=10; events first handled at 11 and (again) at 20, and dead-lettered at 12.5
    publishes = [_pub("a"), _pub("b"), _pub("x", "indeterminate")]
    handlings = [_handled("a", 11.0), _handled("a", 20.0), _handled("x", 30.0)]

    # When scored
    s = score(publishes, handlings, [_dead("b", 12.5)], fault_end=10.0)

    # Then recovery ends at the last acknowledged event's first accounting, not at duplicates or unknown ones
    assert s.recovery_s == pytest.approx(2.5)


def test_events_acknowledged_after_the_fault_end_do_not_count_in_recovery():
    # Given a fault that ended at t=10, an event acknowledged before it and handled at 11, one acknowledged at 15
    s = score([_pub("a", t=9.0), _pub("b", t=15.0)], [_handled("a", 11.0), _handled("b", 15.5)], fault_end=10.0)
    # Then recovery is the backlog's: 1 s
    assert s.recovery_s == pytest.approx(1.0)


def test_no_recovery_time_while_something_is_lost():
    assert score([_pub("a")], [], fault_end=1.0).recovery_s is None


def test_undecodable_dead_letters_count_as_dead_lettered():
    s = score([], [], [DeadLettered("", "s", "1-0", "DecodeError", "garbage", 0.0)])
    assert s.dead_lettered == 1


def test_journals_written_by_several_processes_are_read_back_whole(tmp_path: Path):
    # Given a producer journal in this process and a handler journal in a child process killed after writing
    j = Journal(tmp_path / "publish.test.log")
    j.published("ack", ["a", "b"], "ns:s:tick:1:{X}")
    j.published("indeterminate", ["c"], "ns:s:tick:1:{X}")
    j.close()
    code = (
        "import os, signal, sys; from pathlib import Path; from tests.faults.checker import Journal;"
        f"j = Journal(Path({str(tmp_path / 'handled.child.log')!r})); j.handled('a', 'ns:s:tick:1:{{X}}', '1-0', 1);"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          timeout=20)
    assert proc.returncode == -signal.SIGKILL

    # When read back
    publishes, handlings = read_journals(tmp_path)

    # Then every line is there, whole
    assert [(p.outcome, p.event_id) for p in publishes] == [("ack", "a"), ("ack", "b"), ("indeterminate", "c")]
    assert [(h.event_id, h.stream, h.entry_id, h.delivery) for h in handlings] == [("a", "ns:s:tick:1:{X}", "1-0", 1)]
    s = score(publishes, handlings)
    assert (s.acknowledged, s.handled, s.lost, s.lost_ids) == (2, 1, 1, {"b"})


def test_a_malformed_journal_line_is_an_error_not_skipped(tmp_path: Path):
    (tmp_path / "x.log").write_text("P ack onlythree\n")
    with pytest.raises(ValueError, match="not a journal line"):
        read_journals(tmp_path)
