"""Stream ownership leases: exclusive, fenced, renewed, handed over; and the member registry, on Redis's clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.exceptions as rex
from redis.crc import key_slot

from fabric import scripts
from fabric.client import Line
from fabric.keys import Keys, Priority
from fabric.nodes import ClusterLine, line_for
from fabric.ownership import FENCED, WATCHED_READ_ATTEMPTS, Leases, Members
from tests.waiting import eventually

GROUP = "g"
SHORT_TTL_MS = 50
"""The TTL of a lease a test lets expire."""
STEADY_TTL_MS = 60_000
"""The TTL of a lease a test relies on keeping: no stall of a loaded machine outlasts it."""


def tick(keys: Keys, symbol: str = "A") -> str:
    return keys.stream("tick", Priority.NORMAL, symbol)


async def fenced_ack(redis: Any, leases: Leases, stream: str, token: int, entry_id: bytes,
                     output: str | None = None) -> list[int]:
    """Commit one entry through fenced_commit.lua under ``token``, with one output to ``output`` if given."""
    keys = [stream, leases.key(stream), leases.keys.failures(stream)] + ([output] if output else [])
    outs = [2, "Tick", "json", b"{}"] if output else [0]
    return list(await scripts.FENCED_COMMIT(redis, keys, [GROUP, 1, token, 1, entry_id, *outs]))


async def backlog(redis: Any, stream: str, n: int) -> list[bytes]:
    """``n`` entries on ``stream``, and the group created before them."""
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    return [await redis.xadd(stream, {"n": str(i)}) for i in range(n)]


async def read(redis: Any, stream: str, consumer: str, count: int) -> list[bytes]:
    reply = await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [entry_id for _, entries in reply for entry_id, _ in entries]


async def pending_of(redis: Any, stream: str) -> dict[bytes, str]:
    """Entry id -> consumer, for the group's pending entries."""
    rows = await redis.xpending_range(stream, GROUP, "-", "+", 1000)
    return {r["message_id"]: r["consumer"].decode() for r in rows}


# ---- acquiring, renewing, releasing ---------------------------------------------------------------------


async def test_a_held_stream_is_refused_to_another_member(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    assert await leases.acquire(tick(keys), "a") == 1
    assert await leases.acquire(tick(keys), "b") is None
    assert (await leases.owners([tick(keys)]))[tick(keys)].owner == "a"


async def test_the_holder_asking_again_gets_its_own_token(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    token = await leases.acquire(tick(keys), "a")
    assert await leases.acquire(tick(keys), "a") == token


async def test_a_lease_not_renewed_expires_and_another_member_takes_it(redis, keys: Keys) -> None:
    short, leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS), Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    first = await short.acquire(tick(keys), "a")
    # When "a" stops renewing, "b" gets the stream once the TTL has passed on Redis's clock, with a newer token
    second = await eventually(lambda: leases.acquire(tick(keys), "b"), what="b acquiring the expired lease")
    assert first is not None and second > first
    assert (await leases.owners([tick(keys)]))[tick(keys)].owner == "b"


async def test_tokens_only_grow_across_releases_and_expiry(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS)
    stream = tick(keys)
    tokens = []
    for member in ("a", "b", "a", "c"):
        token = await eventually(lambda m=member: leases.acquire(stream, m), what=f"{member} acquiring")
        tokens.append(token)
        if member != "c":
            await leases.release(stream, member, token)
    # the last lease expires rather than being released: the token after it is still new
    tokens.append(await eventually(lambda: leases.acquire(stream, "d"), what="d acquiring after expiry"))
    assert tokens == sorted(set(tokens)) and len(tokens) == 5


async def test_a_renewal_restarts_the_ttl(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    token = await leases.acquire(tick(keys), "a")
    assert token is not None

    async def aged() -> int:
        left = (await leases.owners([tick(keys)]))[tick(keys)].ttl_ms
        return left if left < 59_990 else 0

    before = await eventually(aged, what="the lease ageing 10 ms")
    assert await leases.renew({tick(keys): token}, "a") == set()
    assert (await leases.owners([tick(keys)]))[tick(keys)].ttl_ms > before


@contextlib.asynccontextmanager
async def own_line(redis: Any) -> AsyncIterator[Line | ClusterLine]:
    """A connection of fabric's own (on a cluster, every slot's call at once, pipelined per node), closed after."""
    line = line_for(redis)
    try:
        yield line
    finally:
        await line.close()


async def test_renew_reports_the_leases_lost_across_slots(redis, keys: Keys) -> None:
    await renew_across_slots(redis, keys, None)


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
async def test_renew_on_a_line_reports_the_leases_lost_across_slots(redis, keys: Keys) -> None:
    async with own_line(redis) as line:
        await renew_across_slots(redis, keys, line)


async def renew_across_slots(redis: Any, keys: Keys, line: Line | ClusterLine | None) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    kept, moved, stale = tick(keys, "A"), tick(keys, "B"), tick(keys, "C")
    assert len({key_slot(leases.key(s).encode()) for s in (kept, moved, stale)}) == 3
    tokens = {s: await leases.acquire(s, "a") for s in (kept, moved, stale)}
    # Given: "moved" released and taken by "b"; "stale" presented with a token "a" no longer holds
    await leases.release(moved, "a", tokens[moved])
    await leases.acquire(moved, "b")
    held = {kept: tokens[kept], moved: tokens[moved], stale: tokens[stale] - 1}
    # When "a" renews what it believes it holds, then only "kept" is still its own
    assert await leases.renew(held, "a", line) == {moved, stale}
    assert (await leases.owners([moved]))[moved].owner == "b"


async def test_acquire_many_takes_the_free_streams_across_slots(redis, keys: Keys) -> None:
    await acquire_and_hand_over_across_slots(redis, keys, None)


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
async def test_acquire_many_on_a_line_takes_the_free_streams_across_slots(redis, keys: Keys) -> None:
    async with own_line(redis) as line:
        await acquire_and_hand_over_across_slots(redis, keys, line)


async def acquire_and_hand_over_across_slots(redis: Any, keys: Keys, line: Line | ClusterLine | None) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    free, mine, theirs, again = (tick(keys, s) for s in "ABCD")
    assert len({key_slot(leases.key(s).encode()) for s in (free, mine, theirs, again)}) == 4
    # Given: "mine" held by "a", "theirs" by "b", "again" released by "a" (its fence has issued 1 token)
    held = await leases.acquire(mine, "a")
    await leases.acquire(theirs, "b")
    await leases.release(again, "a", await leases.acquire(again, "a") or 0)
    # When "a" acquires all four in one go, it gets the free ones under new tokens and its own under its token
    assert await leases.acquire_many([free, mine, theirs, again], "a", line) == {free: 1, mine: held, again: 2}
    owners = await leases.owners([free, mine, theirs, again])
    assert {s: lease.owner for s, lease in owners.items()} == {free: "a", mine: "a", theirs: "b", again: "a"}
    # And handing over marks only the streams it holds under the tokens given
    marked = await leases.hand_over_many({free: 1, mine: held or 0, theirs: 1, again: 1}, "a", line)
    assert marked == {free, mine}
    owners = await leases.owners([free, mine, theirs, again])
    assert {s for s, lease in owners.items() if lease.releasing} == {free, mine}


async def test_only_the_holder_under_its_current_token_releases(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    token = await leases.acquire(tick(keys), "a")
    assert token is not None
    assert not await leases.release(tick(keys), "b", token)
    assert not await leases.release(tick(keys), "a", token + 1)
    assert await leases.release(tick(keys), "a", token)
    assert not await leases.release(tick(keys), "a", token)  # released already
    assert await leases.owners([tick(keys)]) == {}


async def test_a_lease_is_too_short_to_renew_below_three_ms(redis, keys: Keys) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        Leases(redis, keys, GROUP, ttl_ms=2)


def test_lease_and_fence_live_in_the_slot_of_their_stream(keys: Keys) -> None:
    for symbol in ("A", "BTC-USD", None):
        stream = keys.stream("tick", Priority.HIGH, symbol)
        slots = {key_slot(k.encode()) for k in (stream, keys.lease(GROUP, stream), keys.fence(GROUP, stream))}
        assert len(slots) == 1


# ---- fencing --------------------------------------------------------------------------------------------


async def test_a_fenced_write_is_refused_after_the_lease_moved(redis, keys: Keys) -> None:
    short, leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS), Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream, output = tick(keys), keys.stream("bar", Priority.NORMAL, "A")
    entry = (await backlog(redis, stream, 1))[0]
    old = await short.acquire(stream, "a")
    await read(redis, stream, "a", 1)
    # Given "a" paused past its TTL while "b" took the stream over, entry and all
    new = await eventually(lambda: leases.acquire(stream, "b"), what="b acquiring")
    assert old is not None and await leases.take_over(stream, "b", new) is not None
    # When "a" resumes and commits its entry with an output under its old token
    assert await fenced_ack(redis, leases, stream, old, entry, output) == [FENCED]
    # Then nothing was written; "b" commits it under the current token
    assert await redis.xlen(output) == 0
    assert await fenced_ack(redis, leases, stream, new, entry, output) == [1]
    assert await redis.xlen(output) == 1 and await pending_of(redis, stream) == {}


async def test_an_expired_lease_fences_its_former_owner_even_before_anyone_takes_it(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS)
    stream = tick(keys)
    entry = (await backlog(redis, stream, 1))[0]
    token = await leases.acquire(stream, "a")
    await read(redis, stream, "a", 1)
    await eventually(lambda: _free(leases, stream), what="the lease expiring")
    assert token is not None
    assert await fenced_ack(redis, leases, stream, token, entry) == [FENCED]
    assert await pending_of(redis, stream) == {entry: "a"}


async def owner_reading_one(redis: Any, keys: Keys) -> tuple[Leases, str, str, bytes, int]:
    """Stream A's one entry, read by "a" under its lease: leases, stream, an output stream, entry id, token."""
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream, output = tick(keys), keys.stream("bar", Priority.NORMAL, "A")
    entry = (await backlog(redis, stream, 1))[0]
    token = await leases.acquire(stream, "a")
    await read(redis, stream, "a", 1)
    assert token is not None
    return leases, stream, output, entry, token


async def test_a_fenced_commit_sent_again_is_refused_and_writes_its_outputs_once(redis, keys: Keys) -> None:
    leases, stream, output, entry, token = await owner_reading_one(redis, keys)
    assert await fenced_ack(redis, leases, stream, token, entry, output) == [1]
    # When the commit is sent again (its reply was lost)
    assert await fenced_ack(redis, leases, stream, token, entry, output) == [0]
    # Then its outputs are in the output stream once
    assert await redis.xlen(output) == 1 and await pending_of(redis, stream) == {}


async def test_a_fenced_commit_whose_output_is_refused_leaves_its_entry_pending(redis, keys: Keys) -> None:
    leases, stream, output, entry, token = await owner_reading_one(redis, keys)
    await redis.set(output, "not a stream")
    # When the commit's output cannot be written (here a key of the wrong type; under maxmemory, OOM)
    with pytest.raises(rex.ResponseError):
        await fenced_ack(redis, leases, stream, token, entry, output)
    # Then the entry was not acked: it stays pending to its owner, to be handled again
    assert await pending_of(redis, stream) == {entry: "a"}


async def test_an_entry_an_unordered_consumer_took_is_committed_once(redis, keys: Keys) -> None:
    # A group wrongly run in both modes: an unordered consumer claims an entry the owner read and handles
    leases, stream, output, entry, token = await owner_reading_one(redis, keys)
    await redis.xclaim(stream, GROUP, "other", 0, [entry], justid=True)
    # When the owner commits first, then the other consumer (commit.lua, as an unordered worker does)
    assert await fenced_ack(redis, leases, stream, token, entry, output) == [1]
    other = await scripts.COMMIT(redis, [stream, output], [GROUP, "other", 1, 1, 0, entry, 1, 2, "Tick", "json", b"{}"])
    # Then the second commit is refused: the entry's outputs are written once
    assert list(other) == [0]
    assert await redis.xlen(output) == 1 and await pending_of(redis, stream) == {}


async def _free(leases: Leases, stream: str) -> bool:
    return stream not in await leases.owners([stream])


async def test_a_fenced_commit_takes_entries_with_and_without_a_failure_record_and_outputs(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream, output = tick(keys), keys.stream("signal", Priority.NORMAL, "A")
    failures = keys.failures(stream)
    first, second, third = await backlog(redis, stream, 3)
    token = await leases.acquire(stream, "a")
    assert token is not None
    await read(redis, stream, "a", 3)
    await redis.hset(failures, mapping={f"{GROUP}/{first.decode()}": "x", f"{GROUP}/{third.decode()}": "y"})
    # When one call commits: the first with its failure record and two outputs, the second plain, the third with
    # its failure record only
    lease = leases.key(stream)
    keys_ = [stream, lease, failures, output, output]
    args = [GROUP, 1, token, 3, first, 2 * 2 + 1, "Signal", "json", b"1", "Signal", "json", b"2",
            second, 0, third, 1]
    assert list(await scripts.FENCED_COMMIT(redis, keys_, args)) == [1, 1, 1]
    # Then all three are acked, both outputs written in order, both failure records dropped
    assert await pending_of(redis, stream) == {}
    assert [f[b"data"] for _, f in await redis.xrange(output)] == [b"1", b"2"]
    assert await redis.hlen(failures) == 0


async def test_a_fenced_commit_acks_a_runs_plain_entries_together_and_refuses_them_together_when_sent_again(
        redis, keys: Keys) -> None:
    # given four entries read by their stream's owner, and a call committing two of them as one run of plain entries
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    ids = await backlog(redis, stream, 4)
    token = await leases.acquire(stream, "a")
    assert token is not None
    await read(redis, stream, "a", 4)
    keys_ = [stream, leases.key(stream), keys.failures(stream)]
    run = [GROUP, 1, token, 2, ids[0], 0, ids[1], 0]
    # when it is sent, then sent again (its reply was lost)
    assert list(await scripts.FENCED_COMMIT(redis, keys_, run)) == [1, 1]
    assert list(await scripts.FENCED_COMMIT(redis, keys_, run)) == [0, 0]
    # then both were acked once; and a run of which only some are still pending (the fourth acked by someone
    # outside the ordered mode) is acked whole and counted refused whole
    assert await pending_of(redis, stream) == {ids[2]: "a", ids[3]: "a"}
    await redis.xack(stream, GROUP, ids[3])
    assert list(await scripts.FENCED_COMMIT(redis, keys_, [GROUP, 1, token, 2, ids[2], 0, ids[3], 0])) == [0, 0]
    assert await pending_of(redis, stream) == {}


async def test_a_fenced_commit_checks_each_runs_token_and_writes_nothing_for_a_stale_one(redis, keys: Keys) -> None:
    # given two streams of one symbol (one slot), two entries read on each, and both leases held
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    normal, high = tick(keys), keys.stream("tick", Priority.HIGH, "A")
    normal_ids, high_ids = await backlog(redis, normal, 2), await backlog(redis, high, 2)
    normal_token, high_token = await leases.acquire(normal, "a"), await leases.acquire(high, "a")
    assert normal_token is not None and high_token is not None
    await read(redis, normal, "a", 2)
    await read(redis, high, "a", 2)
    # when one call commits a run of each, the second under a token that is not (or no longer) its stream's
    keys_ = [normal, leases.key(normal), keys.failures(normal), high, leases.key(high), keys.failures(high)]
    args = [GROUP, 1, normal_token, 2, normal_ids[0], 0, normal_ids[1], 0,
            high_token + 1, 2, high_ids[0], 0, high_ids[1], 0]
    # then the first run is committed and the second fenced out, entry by entry, and left pending
    assert list(await scripts.FENCED_COMMIT(redis, keys_, args)) == [1, 1, -1, -1]
    assert await pending_of(redis, normal) == {}
    assert await pending_of(redis, high) == {i: "a" for i in high_ids}


@pytest.mark.real_only  # a read on a single Redis runs on a line, a connection of fabric's own to a real server
async def test_a_fenced_read_reads_the_held_streams_and_reports_the_lost(redis, keys: Keys) -> None:
    await fenced_read(redis, keys, None)


@pytest.mark.real_only  # a read on a single Redis runs on a line, a connection of fabric's own to a real server
@pytest.mark.parametrize("few", [False, True], ids=["all", "few"])  # few: fenced_read.lua on a single Redis too
async def test_a_fenced_read_on_a_line_reads_the_held_streams_and_reports_the_lost(
        redis, keys: Keys, few: bool) -> None:
    line = line_for(redis)  # on a cluster, every slot's call at once, pipelined per node
    try:
        await fenced_read(redis, keys, line, few)
    finally:
        await line.close()


async def fenced_read(redis: Any, keys: Keys, line: Line | ClusterLine | None, few: bool = False) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    held, empty, lost = tick(keys, "A"), tick(keys, "B"), tick(keys, "C")
    ids = {s: await backlog(redis, s, n) for s, n in ((held, 3), (empty, 0), (lost, 2))}
    tokens = {s: await leases.acquire(s, "a") for s in (held, empty, lost)}
    tokens[lost] -= 1  # a token "a" no longer holds
    assert len({key_slot(s.encode()) for s in tokens}) == 3
    entries, fenced, idle = await leases.read(tokens, "a", 2, line, few=few)
    assert {s: [e[0] for e in es] for s, es in entries.items()} == {held: ids[held][:2]}
    assert fenced == {lost}
    assert idle == {empty: b"0-0"}
    assert await pending_of(redis, lost) == {}


@pytest.mark.real_only  # a read on a single Redis runs on a line, a connection of fabric's own to a real server
@pytest.mark.parametrize("few", [False, True], ids=["all", "few"])
async def test_a_former_owner_resumed_reads_nothing_behind_the_new_owners_back(
        redis, keys: Keys, few: bool) -> None:
    short, leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS), Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    ids = await backlog(redis, stream, 4)
    old = await short.acquire(stream, "a")
    assert old is not None and await read(redis, stream, "a", 1) == ids[:1]
    # Given "a" paused past its TTL, and "b" owning the stream now
    new = await eventually(lambda: leases.acquire(stream, "b"), what="b acquiring")
    # When "a" resumes and reads on, then it gets nothing and learns it lost the stream
    assert await leases.read({stream: old}, "a", 10, few=few) == ({}, {stream}, {})
    # and "b" takes over the entry "a" had, then reads every later one, none skipped
    page = await leases.take_over(stream, "b", new)
    assert page is not None and [e[0] for e in page.entries] == ids[:1]
    entries, _, _ = await leases.read({stream: new}, "b", 10)
    assert [e[0] for e in entries[stream]] == ids[1:]
    assert set((await pending_of(redis, stream)).values()) == {"b"}


class Meddling(Line):
    """A line that runs ``meddle`` just before it sends EXEC: what another client (or a lost connection) does
    between the fenced read's two round trips."""

    def __init__(self, redis: Any, meddle: Any) -> None:
        super().__init__(redis)
        self.meddle = meddle

    async def call(self, *args: Any) -> Any:
        if args == ("EXEC",):
            await self.meddle(self)
        return await super().call(*args)


@contextlib.asynccontextmanager
async def meddling(redis: Any, meddle: Any) -> AsyncIterator[Line]:
    """A ``Meddling`` line, closed after."""
    line = Meddling(redis, meddle)
    try:
        yield line
    finally:
        await Line.close(line)


async def held(redis: Any, keys: Keys, n: int) -> tuple[Leases, str, list[bytes], int]:
    """A stream of ``n`` entries whose lease "a" holds: the leases, the stream, its entry ids, "a"'s token."""
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    ids = await backlog(redis, stream, n)
    token = await leases.acquire(stream, "a")
    assert token is not None
    return leases, stream, ids, token


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
@pytest.mark.single_redis  # on a cluster the read is fenced_read.lua, one atomic call
async def test_a_lease_taken_between_the_token_check_and_the_read_makes_the_read_read_nothing(
        redis, keys: Keys) -> None:
    short, leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS), Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    await backlog(redis, stream, 3)
    old = await short.acquire(stream, "a")
    assert old is not None

    async def taken(_: Line) -> None:  # the lease runs out and "b" takes the stream after "a"'s tokens were read
        await eventually(lambda: leases.acquire(stream, "b"), what="b acquiring")

    async with meddling(redis, taken) as line:
        # When "a" reads under the token it checked, then EXEC reads nothing, and the read again finds it lost
        assert await leases.read({stream: old}, "a", 10, line) == ({}, {stream}, {})
    assert await pending_of(redis, stream) == {}


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
@pytest.mark.single_redis  # on a cluster the read is fenced_read.lua, one atomic call
async def test_a_lease_renewed_between_the_token_check_and_the_read_is_read_again(redis, keys: Keys) -> None:
    leases, stream, ids, token = await held(redis, keys, 3)
    renewals: list[set[str]] = []

    async def renewed(_: Line) -> None:  # the owner's own renewal lands once, between the two round trips
        if not renewals:
            renewals.append(await leases.renew({stream: token}, "a"))

    async with meddling(redis, renewed) as line:
        # When the renewal makes EXEC read nothing, then the read is made again, and reads the entries
        entries, lost, _ = await leases.read({stream: token}, "a", 10, line)
    assert renewals == [set()] and lost == set()
    assert [e[0] for e in entries[stream]] == ids


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
@pytest.mark.single_redis  # on a cluster the read is fenced_read.lua, one atomic call
async def test_leases_changing_under_every_read_make_it_give_up_reading_nothing(redis, keys: Keys) -> None:
    leases, stream, _, token = await held(redis, keys, 3)
    renewals = 0

    async def renewed(_: Line) -> None:
        nonlocal renewals
        renewals += 1
        await leases.renew({stream: token}, "a")

    async with meddling(redis, renewed) as line:
        # When a renewal lands between the two round trips of every read, then it gives up (the reader retries
        # after a pause) and has read nothing
        with pytest.raises(rex.WatchError):
            await leases.read({stream: token}, "a", 10, line)
    assert renewals == WATCHED_READ_ATTEMPTS
    assert await pending_of(redis, stream) == {}


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
@pytest.mark.single_redis  # on a cluster the read is fenced_read.lua, one atomic call
async def test_a_connection_lost_between_the_token_check_and_the_read_reads_nothing(redis, keys: Keys) -> None:
    leases, stream, _, token = await held(redis, keys, 3)

    async def cut(line: Line) -> None:  # the connection drops with the WATCH and the queued read
        await Line.close(line)

    async with meddling(redis, cut) as line:
        # When the EXEC goes out on a new connection, then it finds no transaction: an error, nothing read unwatched
        with pytest.raises(rex.ResponseError, match="EXEC without MULTI"):
            await leases.read({stream: token}, "a", 10, line)
    assert await pending_of(redis, stream) == {}


@pytest.mark.real_only  # a line is a connection of fabric's own, to a real server
@pytest.mark.single_redis  # on a cluster, fenced_read.lua finds every idle stream's last id itself
async def test_an_idle_stream_whose_last_read_id_is_passed_is_waited_on_from_it(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    known, unknown = tick(keys, "A"), tick(keys, "B")
    ids = {s: await backlog(redis, s, 2) for s in (known, unknown)}
    tokens = {s: await leases.acquire(s, "a") for s in (known, unknown)}
    async with own_line(redis) as line:
        first = await leases.read(tokens, "a", 10, line)  # type: ignore[arg-type]
        assert {s: [e[0] for e in es] for s, es in first.entries.items()} == ids
        # Given both read to their end, and an id passed for "known" (its first, to tell it from its last)
        again = await leases.read(tokens, "a", 10, line, {known: ids[known][0]})  # type: ignore[arg-type]
    # Then both are idle: "known" waits from the id passed, unasked; "unknown" from its last entry, asked
    assert again == ({}, set(), {known: ids[known][0], unknown: ids[unknown][-1]})


# ---- hand-over ------------------------------------------------------------------------------------------


async def test_a_releasing_stream_waits_for_its_owner_to_release_it(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    entry = (await backlog(redis, stream, 1))[0]
    old = await leases.acquire(stream, "a")
    await read(redis, stream, "a", 1)
    assert old is not None
    # Given "a" told to give the stream up, with an entry in hand
    assert await leases.hand_over(stream, "a", old)
    assert (await leases.owners([stream]))[stream].releasing
    # Then nobody else takes it, while "a" still renews and commits the entry in hand
    assert await leases.acquire(stream, "b") is None
    assert await leases.renew({stream: old}, "a") == set()
    assert await fenced_ack(redis, leases, stream, old, entry) == [1]
    # and once "a" releases it, "b" takes it under a newer token
    assert await leases.release(stream, "a", old)
    new = await leases.acquire(stream, "b")
    assert new is not None and new > old
    assert not (await leases.owners([stream]))[stream].releasing


async def test_a_releasing_stream_whose_owner_died_goes_over_once_its_lease_expired(redis, keys: Keys) -> None:
    short, leases = Leases(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS), Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)

    async def marked() -> int | None:  # again if the short lease expired before it was marked
        token = await short.acquire(stream, "a")
        return token if token is not None and await short.hand_over(stream, "a", token) else None

    old = await eventually(marked, what="a holding the stream and marking it releasing")
    # "a" never releases (it died): "b" gets the stream when the lease expires
    new = await eventually(lambda: leases.acquire(stream, "b"), what="b acquiring after the lease expired")
    assert new > old


async def test_only_the_holder_marks_its_stream_releasing(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    token = await leases.acquire(tick(keys), "a")
    assert token is not None
    assert not await leases.hand_over(tick(keys), "b", token)
    assert not await leases.hand_over(tick(keys), "a", token + 1)
    assert not (await leases.owners([tick(keys)]))[tick(keys)].releasing


async def test_the_new_owner_claims_the_former_owners_pending_entries_oldest_first(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    ids = await backlog(redis, stream, 10)
    # Given a dead consumer "c" holding the 2 oldest, and "a" holding the next 4, of which it committed 2
    await read(redis, stream, "c", 2)
    old = await leases.acquire(stream, "a")
    await read(redis, stream, "a", 4)
    assert old is not None
    for entry in ids[2:4]:
        assert await fenced_ack(redis, leases, stream, old, entry) == [1]
    await leases.hand_over(stream, "a", old)
    await leases.release(stream, "a", old)
    new = await leases.acquire(stream, "b")
    assert new is not None
    # When "b" takes over, two entries a page
    taken, after, pages = [], "-", 0
    while after is not None:
        page = await leases.take_over(stream, "b", new, after=after, count=2)
        assert page is not None and page.deleted == []
        taken += page.entries
        after, pages = page.after, pages + 1
    # Then it has every unfinished entry, oldest first, each as a second delivery; then new ones follow on
    assert [entry_id for entry_id, _, _ in taken] == ids[0:2] + ids[4:6]
    assert [fields for _, fields, _ in taken] == [[b"n", str(i).encode()] for i in (0, 1, 4, 5)]
    assert {count for _, _, count in taken} == {2}
    assert set((await pending_of(redis, stream)).values()) == {"b"}
    assert await read(redis, stream, "b", 10) == ids[6:]
    # and the former owner's late commit of one of them is refused
    assert await fenced_ack(redis, leases, stream, old, ids[4]) == [FENCED]


async def test_a_takeover_under_a_stale_token_claims_nothing(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    await backlog(redis, stream, 2)
    token = await leases.acquire(stream, "a")
    await read(redis, stream, "c", 2)
    assert token is not None
    assert await leases.take_over(stream, "b", token) is None  # not b's lease
    assert await leases.take_over(stream, "a", token - 1) is None  # not the current token
    assert set((await pending_of(redis, stream)).values()) == {"c"}


async def test_a_takeover_reports_pending_entries_deleted_from_the_stream(redis, keys: Keys) -> None:
    leases = Leases(redis, keys, GROUP, ttl_ms=STEADY_TTL_MS)
    stream = tick(keys)
    ids = await backlog(redis, stream, 3)
    await read(redis, stream, "c", 3)
    await redis.hset(keys.failures(stream), f"{GROUP}/{ids[1].decode()}", "record")
    await redis.xdel(stream, ids[1])
    token = await leases.acquire(stream, "b")
    assert token is not None
    page = await leases.take_over(stream, "b", token)
    assert page is not None
    assert [e[0] for e in page.entries] == [ids[0], ids[2]] and page.deleted == [ids[1]]
    assert await pending_of(redis, stream) == {ids[0]: "b", ids[2]: "b"}
    assert await redis.hlen(keys.failures(stream)) == 0


# ---- members --------------------------------------------------------------------------------------------


async def test_a_heartbeat_lists_the_live_members(redis, keys: Keys) -> None:
    members = Members(redis, keys, GROUP)
    await members.heartbeat("b")
    assert await members.heartbeat("a") == ["a", "b"]
    assert await members.live() == ["a", "b"]


async def test_a_silent_member_drops_out_after_its_ttl(redis, keys: Keys) -> None:
    members = Members(redis, keys, GROUP, ttl_ms=SHORT_TTL_MS)
    await members.heartbeat("silent")

    async def gone() -> bool:
        return await members.heartbeat("alive") == ["alive"]

    await eventually(gone, what="the silent member dropping out")
    assert await redis.zrange(keys.members(GROUP), 0, -1) == [b"alive"]  # and is removed from the registry


async def test_a_member_that_leaves_is_gone_at_once(redis, keys: Keys) -> None:
    members = Members(redis, keys, GROUP)
    await members.heartbeat("a")
    await members.heartbeat("b")
    await members.leave("a")
    assert await members.live() == ["b"]
