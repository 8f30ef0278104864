"""Balancing streams over live members: even, deterministic, and moving only the streams that must move."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from fabric.balance import Move, Plan, balance, quotas

SEEDS = range(200)


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def loads(plan: Plan, members: list[str]) -> list[int]:
    counts = Counter(plan.assignment.values())
    return [counts[m] for m in members]


def taken_from_live(plan: Plan, members: list[str]) -> int:
    """Moves that take a stream away from a live member (the ones that cost a hand-over)."""
    return sum(1 for m in plan.moves if m.source in members)


def random_case(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    """Streams, live members, and a current assignment that is anything but balanced: owners live or dead,
    streams unowned, and owners for streams that no longer exist."""
    streams = names("s", rng.randint(0, 60))
    live = names("m", rng.randint(1, 8))
    owners = live + names("dead", rng.randint(0, 3))
    current = {s: rng.choice(owners) for s in streams + names("gone", 3) if rng.random() < 0.8}
    return streams, live, current


def balanced(streams: list[str], members: list[str]) -> dict[str, str]:
    return balance(streams, members, {}).assignment


@pytest.mark.parametrize("seed", SEEDS)
def test_every_stream_goes_to_a_live_member_and_the_spread_is_even(seed: int) -> None:
    streams, live, current = random_case(random.Random(seed))
    plan = balance(streams, live, current)
    assert sorted(plan.assignment) == sorted(streams)
    assert set(plan.assignment.values()) <= set(live)
    spread = loads(plan, live)
    assert max(spread) - min(spread) <= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_the_same_input_in_any_order_gives_the_same_plan(seed: int) -> None:
    rng = random.Random(seed)
    streams, live, current = random_case(rng)
    shuffled_current = list(current.items())
    for seq in (streams, live, shuffled_current):
        rng.shuffle(seq)
    assert balance(streams, live, dict(shuffled_current)) == balance(sorted(streams), sorted(live), current)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_moves_lead_from_the_current_assignment_to_the_plan(seed: int) -> None:
    streams, live, current = random_case(random.Random(seed))
    plan = balance(streams, live, current)
    after = {s: o for s, o in current.items() if s in plan.assignment}
    after.update({m.stream: m.target for m in plan.moves})
    assert after == plan.assignment
    assert all(m.source == current.get(m.stream) != m.target for m in plan.moves)


@pytest.mark.parametrize("seed", range(60))
def test_no_even_assignment_takes_fewer_streams_from_live_members(seed: int) -> None:
    # brute force over every assignment of a small case
    rng = random.Random(seed)
    streams, live = names("s", rng.randint(0, 6)), names("m", rng.randint(1, 3))
    current = {s: rng.choice([*live, "dead"]) for s in streams if rng.random() < 0.9}
    fewest = min(
        sum(1 for s, m in zip(streams, choice, strict=True) if current.get(s) in live and current[s] != m)
        for choice in itertools.product(live, repeat=len(streams))
        if max(Counter(choice)[m] for m in live) - min(Counter(choice)[m] for m in live) <= 1
    )
    assert taken_from_live(balance(streams, live, current), live) == fewest


def test_200_streams_over_3_members_move_exactly_50_when_a_fourth_joins() -> None:
    streams, three = names("s", 200), names("m", 3)
    before = balanced(streams, three)
    plan = balance(streams, [*three, "new"], before)
    assert len(plan.moves) == 50
    assert {m.target for m in plan.moves} == {"new"}
    assert Counter(m.source for m in plan.moves) == {"m0": 17, "m1": 17, "m2": 16}


def test_200_streams_over_4_members_move_only_the_leavers_50_when_one_leaves() -> None:
    streams, four = names("s", 200), names("m", 4)
    before = balanced(streams, four)
    plan = balance(streams, four[:3], before)
    leavers = {s for s, m in before.items() if m == "m3"}
    assert len(plan.moves) == 50
    assert {m.stream for m in plan.moves} == leavers
    assert sorted(loads(plan, four[:3])) == [66, 67, 67]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_joining_member_takes_only_its_share_from_the_others(seed: int) -> None:
    rng = random.Random(seed)
    streams, live = names("s", rng.randint(0, 300)), names("m", rng.randint(1, 9))
    before = balanced(streams, live)
    plan = balance(streams, [*live, "new"], before)
    share = len(streams) // (len(live) + 1)  # the joiner holds the least: the floor of the new spread
    assert len(plan.moves) == share
    assert all(m.target == "new" and m.source in live for m in plan.moves)


@pytest.mark.parametrize("seed", SEEDS)
def test_when_a_member_leaves_only_its_streams_move(seed: int) -> None:
    rng = random.Random(seed)
    streams, live = names("s", rng.randint(0, 300)), names("m", rng.randint(2, 9))
    before = balanced(streams, live)
    leaver = rng.choice(live)
    plan = balance(streams, [m for m in live if m != leaver], before)
    assert sorted(m.stream for m in plan.moves) == sorted(s for s, m in before.items() if m == leaver)


@pytest.mark.parametrize("seed", SEEDS)
def test_new_streams_are_placed_without_moving_any_other(seed: int) -> None:
    rng = random.Random(seed)
    streams, live = names("s", rng.randint(0, 200)), names("m", rng.randint(1, 9))
    before = balanced(streams, live)
    added = names("new", rng.randint(1, 20))
    plan = balance(streams + added, live, before)
    assert sorted(m.stream for m in plan.moves) == sorted(added)
    assert all(m.source is None for m in plan.moves)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_plan_balanced_again_moves_nothing(seed: int) -> None:
    streams, live, current = random_case(random.Random(seed))
    plan = balance(streams, live, current)
    assert balance(streams, live, plan.assignment).moves == []


def test_streams_of_a_member_no_longer_live_are_moves_from_it() -> None:
    plan = balance(["a", "b"], ["m1"], {"a": "gone", "b": "m1"})
    assert plan.moves == [Move("a", "gone", "m1")]


def test_without_live_members_nothing_is_assigned() -> None:
    assert balance(["a", "b"], [], {"a": "m1"}) == Plan({}, [])


def test_the_larger_quotas_go_to_the_members_holding_most() -> None:
    assert quotas({"a": 1, "b": 5, "c": 5}, 7) == {"b": 3, "c": 2, "a": 2}
    assert quotas({}, 3) == {}
