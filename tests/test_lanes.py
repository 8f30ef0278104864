"""Priority lanes: smooth weighted round robin (8/4/2/1), no starvation, bounded lanes, close."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from fabric.keys import Priority
from fabric.lanes import Lanes


def _fill(lanes: Lanes[tuple[Priority, int]], n: int, priorities=tuple(Priority)) -> None:
    for p in priorities:
        for i in range(n):
            lanes.put(p, (p, i))


def test_first_item_taken_from_full_lanes_is_critical():
    # given all four lanes full
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=4)
    _fill(lanes, 4)
    # when one item is taken
    item = lanes.get_nowait()
    # then it is the oldest critical one
    assert item == (Priority.CRITICAL, 0)


def test_fifteen_picks_over_non_empty_lanes_split_8_4_2_1():
    # given all four lanes with more items than 15 picks can drain
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=100)
    _fill(lanes, 20)
    # when 15 items are taken
    picks = Counter(lanes.get_nowait()[0] for _ in range(15))
    # then the weights decide the shares
    assert picks == {Priority.CRITICAL: 8, Priority.HIGH: 4, Priority.NORMAL: 2, Priority.LOW: 1}


def test_shares_hold_over_many_rounds():
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=1000)
    _fill(lanes, 1000)
    picks = Counter(lanes.get_nowait()[0] for _ in range(15 * 40))
    assert picks == {Priority.CRITICAL: 320, Priority.HIGH: 160, Priority.NORMAL: 80, Priority.LOW: 40}


def test_items_of_one_lane_come_out_in_order():
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=100)
    _fill(lanes, 10)
    taken = [lanes.get_nowait() for _ in range(40)]
    for p in Priority:
        assert [i for q, i in taken if q is p] == list(range(10))


def test_low_item_is_taken_while_critical_is_refilled():
    # given one low item and a critical lane that is refilled after every pick
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=100)
    _fill(lanes, 10, [Priority.CRITICAL])
    lanes.put(Priority.LOW, (Priority.LOW, 0))
    # when items are taken for one full round of weights (critical 8 + low 1)
    taken = []
    for i in range(9):
        taken.append(lanes.get_nowait())
        lanes.put(Priority.CRITICAL, (Priority.CRITICAL, 100 + i))
    # then the low item was among them: a flood of critical entries does not starve it
    assert (Priority.LOW, 0) in taken


def test_empty_lanes_give_their_share_to_the_others():
    # given only normal and low items
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=100)
    _fill(lanes, 30, [Priority.NORMAL, Priority.LOW])
    # when 30 are taken
    picks = Counter(lanes.get_nowait()[0] for _ in range(30))
    # then they split 2:1
    assert picks == {Priority.NORMAL: 20, Priority.LOW: 10}


def test_custom_weights_are_used():
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=100, weights=(1, 1, 1, 1))
    _fill(lanes, 10)
    picks = Counter(lanes.get_nowait()[0] for _ in range(8))
    assert picks == dict.fromkeys(Priority, 2)


@pytest.mark.parametrize("weights", [(1, 2, 4), (0, 1, 2, 3), (1, 2, 4, 8, 16)])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="one positive integer per priority"):
        Lanes(capacity=1, weights=weights)


def test_get_nowait_on_empty_lanes_is_none():
    lanes: Lanes[int] = Lanes(capacity=2)
    assert lanes.get_nowait() is None


def test_room_counts_down_per_lane_up_to_capacity():
    # given lanes of capacity 3
    lanes: Lanes[int] = Lanes(capacity=3)
    assert lanes.capacity == 3
    assert all(lanes.room(p) == 3 for p in Priority)
    # when two low items are queued
    lanes.put(Priority.LOW, 1)
    lanes.put(Priority.LOW, 2)
    # then only the low lane has less room
    assert lanes.room(Priority.LOW) == 1
    assert lanes.room(Priority.CRITICAL) == 3
    assert len(lanes) == 2


def test_taking_an_item_gives_its_lane_room_back():
    lanes: Lanes[int] = Lanes(capacity=1)
    lanes.put(Priority.HIGH, 1)
    assert lanes.room(Priority.HIGH) == 0
    lanes.get_nowait()
    assert lanes.room(Priority.HIGH) == 1


async def test_wait_room_returns_at_once_when_a_lane_has_room():
    lanes: Lanes[int] = Lanes(capacity=1)
    lanes.put(Priority.LOW, 1)
    await asyncio.wait_for(lanes.wait_room([Priority.LOW, Priority.HIGH]), 10)
    assert lanes.room(Priority.HIGH) == 1


async def test_wait_room_wakes_when_a_full_lane_is_drained():
    # given a full lane and a waiter for room in it
    lanes: Lanes[int] = Lanes(capacity=1)
    lanes.put(Priority.LOW, 1)
    waiter = asyncio.create_task(lanes.wait_room([Priority.LOW]))
    await asyncio.sleep(0)  # let the waiter block
    assert not waiter.done()
    # when its item is taken
    lanes.get_nowait()
    # then the waiter returns
    await asyncio.wait_for(waiter, 10)


async def test_wait_room_wakes_only_once_an_overfilled_lane_is_back_under_capacity():
    # given a low lane overfilled by a reclaim (3 of capacity 2), a critical entry beside it, and a waiter
    lanes: Lanes[int] = Lanes(capacity=2)
    lanes.extend(Priority.LOW, [1, 2, 3])
    lanes.put(Priority.CRITICAL, 9)
    waiter = asyncio.create_task(lanes.wait_room([Priority.LOW]))
    await asyncio.sleep(0)
    # when the critical entry, then one low entry are taken: the low lane is full still, and the waiter waits
    assert [lanes.get_nowait(), lanes.get_nowait()] == [9, 1]
    await asyncio.sleep(0)
    assert not waiter.done()
    # then taking one more gives it room, and the waiter returns
    assert lanes.get_nowait() == 2
    await asyncio.wait_for(waiter, 10)


async def test_wait_room_wakes_when_a_full_lane_is_served_beside_another():
    # given a full critical lane, a low entry beside it (so the rule picks between two lanes), and a waiter
    lanes: Lanes[int] = Lanes(capacity=1)
    lanes.put(Priority.CRITICAL, 9)
    lanes.put(Priority.LOW, 1)
    waiter = asyncio.create_task(lanes.wait_room([Priority.CRITICAL]))
    await asyncio.sleep(0)
    assert not waiter.done()
    # when the critical entry is taken, then the waiter returns
    assert lanes.get_nowait() == 9
    await asyncio.wait_for(waiter, 10)


async def test_get_waits_for_an_item():
    lanes: Lanes[int] = Lanes(capacity=2)
    getter = asyncio.create_task(lanes.get())
    await asyncio.sleep(0)  # let the getter block
    lanes.put(Priority.NORMAL, 7)
    assert await asyncio.wait_for(getter, 10) == 7


def test_close_returns_the_leftovers():
    # given queued items in several lanes
    lanes: Lanes[tuple[Priority, int]] = Lanes(capacity=5)
    _fill(lanes, 2)
    lanes.get_nowait()
    # when closed
    left = lanes.close()
    # then the 7 items not taken come back and the lanes are empty
    assert len(left) == 7
    assert (Priority.CRITICAL, 0) not in left
    assert len(lanes) == 0
    assert lanes.get_nowait() is None


async def test_get_returns_none_after_close():
    lanes: Lanes[int] = Lanes(capacity=2)
    lanes.put(Priority.LOW, 1)
    lanes.close()
    assert await asyncio.wait_for(lanes.get(), 10) is None


async def test_close_wakes_a_waiting_get_with_none():
    # given a getter waiting on empty lanes
    lanes: Lanes[int] = Lanes(capacity=2)
    getter = asyncio.create_task(lanes.get())
    await asyncio.sleep(0)  # let the getter block
    # when the lanes are closed
    lanes.close()
    # then it gets None
    assert await asyncio.wait_for(getter, 10) is None


def test_a_lane_is_busy_below_only_while_a_lower_lane_holds_items():
    lanes: Lanes[int] = Lanes(capacity=4)
    lanes.put(Priority.HIGH, 1)
    # a higher or equal lane holding items does not count
    assert not lanes.busy_below(Priority.HIGH) and not lanes.busy_below(Priority.LOW)
    assert lanes.busy_below(Priority.CRITICAL)
    lanes.put(Priority.LOW, 2)
    assert lanes.busy_below(Priority.NORMAL)
    # once the lower lanes are emptied, no longer
    assert lanes.get_nowait() == 1 and lanes.get_nowait() == 2
    assert not lanes.busy_below(Priority.CRITICAL)
