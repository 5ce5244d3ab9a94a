"""RaftLog, the in-memory unpurged log: positions, purge, truncate, eviction, its refusals."""

from __future__ import annotations

import msgspec
import pytest

from engine_helpers import entry, lid, log_of
from raft_http.raft.engine.log import RaftLog, entries_to_evict
from raft_http.types import Entry, Normal


def test_an_empty_log() -> None:
    log = RaftLog()
    assert (log.first_index, log.last_index, log.last_log_id, len(log)) == (0, -1, None, 0)
    assert log.log_id_at(-1) is None
    assert log.matches(None)
    assert not log.matches(lid(1, 0))
    with pytest.raises(KeyError) as info:
        log.log_id_at(0)
    assert info.value.args == (0,)


def test_a_log_after_a_purge_starts_past_it() -> None:
    log = log_of([3, 3], purged=lid(2, 4))
    assert log.last_purged == lid(2, 4)
    assert (log.first_index, log.last_index, len(log)) == (5, 6, 2)
    assert log.log_id_at(4) == lid(2, 4)  # the last purged id is still known
    assert log.log_id_at(6) == lid(3, 6)
    assert log.log_id_at(-1) is None
    assert log.matches(None)
    assert log.matches(lid(2, 4))
    for gone in (3, 7):
        with pytest.raises(KeyError) as info:
            log.log_id_at(gone)
        assert info.value.args == (gone,)
    assert RaftLog(lid(2, 4)).last_log_id == lid(2, 4)  # all purged


def test_entries_must_be_consecutive() -> None:
    with pytest.raises(ValueError, match=r"not consecutive at .*index=2"):
        RaftLog(None, [entry(1, 0), entry(1, 2)])
    with pytest.raises(ValueError, match="not consecutive"):
        RaftLog(lid(1, 4), [entry(1, 4)])


def test_entry_and_slice() -> None:
    log = log_of([1, 1, 2, 2], purged=lid(1, 1))  # entries 2..5
    assert log.entry(2).log_id == lid(1, 2)
    assert log.entry(5).log_id == lid(2, 5)
    for outside in (1, 6):
        with pytest.raises(KeyError) as info:
            log.entry(outside)
        assert info.value.args == (outside,)
    assert [e.log_id.index for e in log.slice(2, 6)] == [2, 3, 4, 5]
    assert [e.log_id.index for e in log.slice(3, 5)] == [3, 4]
    assert [e.log_id.index for e in log.slice(4, 100)] == [4, 5]
    assert log.slice(6, 10) == []
    assert log.slice(3, 3) == []
    assert log.slice(3, 1) == []
    assert log.slice(2, 2) == []
    assert log.slice(2, 1) == []
    with pytest.raises(KeyError) as info:
        log.slice(1, 3)  # purged
    assert info.value.args == (1,)


def test_append_only_at_the_end() -> None:
    log = log_of([1, 1])
    log.append([entry(2, 2), entry(2, 3)])
    assert log.last_log_id == lid(2, 3)
    log.append([])
    assert log.last_index == 3
    for wrong in (3, 5):
        with pytest.raises(ValueError, match=f"append at {wrong}, expected 4"):
            log.append([entry(2, wrong)])
    empty = RaftLog(lid(1, 9))
    empty.append([entry(1, 10)])
    assert empty.last_log_id == lid(1, 10)


@pytest.mark.parametrize(
    ("since", "last"), [(3, lid(1, 2)), (0, None), (7, lid(1, 3)), (4, lid(1, 3)), (1, lid(1, 0))]
)
def test_truncate_drops_from_an_index_on(since: int, last: object) -> None:
    log = log_of([1, 1, 1, 1])
    log.truncate(since)
    assert log.last_log_id == last


def test_truncate_after_a_purge_keeps_the_purged_id() -> None:
    log = log_of([2, 2, 2], purged=lid(1, 4))  # 5..7
    log.truncate(6)
    assert log.last_log_id == lid(2, 5)
    log.truncate(2)  # before the first entry: everything held goes
    assert (log.last_log_id, len(log)) == (lid(1, 4), 0)


def test_purge() -> None:
    log = log_of([1, 1, 2, 2, 2])  # 0..4
    log.purge(lid(1, 1))
    assert (log.last_purged, log.first_index, len(log)) == (lid(1, 1), 2, 3)
    log.purge(lid(1, 0))  # behind the last purge: nothing
    assert (log.last_purged, len(log)) == (lid(1, 1), 3)
    log.purge(lid(1, 1))  # the same: nothing
    assert (log.last_purged, len(log)) == (lid(1, 1), 3)
    log.purge(lid(7, 1))  # the purged prefix is committed: never replaced
    assert (log.last_purged, len(log)) == (lid(1, 1), 3)
    log.purge(lid(2, 3))
    assert (log.last_purged, [e.log_id.index for e in log.slice(4, 5)]) == (lid(2, 3), [4])
    log.purge(lid(3, 9))  # past the end (a snapshot installed ahead): all gone
    assert (log.last_purged, len(log), log.last_log_id, log.first_index) == (
        lid(3, 9),
        0,
        lid(3, 9),
        10,
    )


def sized(term: int, index: int, size: int) -> Entry:
    """An entry with ``size`` bytes of application data (a JSON string)."""
    return Entry(lid(term, index), Normal(msgspec.Raw(b'"' + b"x" * (size - 2) + b'"')))


@pytest.mark.parametrize(
    ("sizes", "evictable", "max_bytes", "evicted"),
    [
        ([10, 10, 10], 3, 30, 0),  # at the bound: nothing to do
        ([10, 10, 10], 3, 29, 1),  # the oldest goes first
        ([10, 10, 10], 3, 15, 2),
        ([10, 10, 10], 3, 0, 3),  # a bound of 0 keeps none that may go
        ([10, 10, 10], 1, 0, 1),  # only applied and durable ones may go
        ([10, 10, 10], 0, 0, 0),
        ([10, 10, 10], -4, 0, 0),  # applied/durable behind what is held
        ([0, 0, 25, 5], 4, 10, 3),  # entries without data go on the way to the next
        ([25, 0, 0, 5], 4, 10, 1),  # ...but do not go once the bound holds
        ([], 5, 0, 0),
    ],
)
def test_what_to_evict(sizes: list[int], evictable: int, max_bytes: int, evicted: int) -> None:
    assert entries_to_evict(sizes, sum(sizes), evictable, max_bytes) == evicted


def test_evict_drops_applied_durable_entries_and_keeps_their_log_ids() -> None:
    log = RaftLog(None, [sized(1, i, 100) for i in range(5)])  # from a store: durable
    log.append([sized(2, i, 100) for i in range(5, 8)])  # not yet durable
    assert (log.held_bytes, log.durable, log.first_held) == (800, 4, 0)
    assert log.evict(applied=6, max_bytes=0) == 5  # stops at the durable end, 4
    assert (log.first_held, log.held_bytes, len(log)) == (5, 300, 8)
    assert [log.log_id_at(i) for i in (0, 4, 5)] == [lid(1, 0), lid(1, 4), lid(2, 5)]
    assert log.matches(lid(1, 3))
    assert not log.matches(lid(2, 3))
    for gone in (0, 4):
        with pytest.raises(KeyError):
            log.entry(gone)
        with pytest.raises(KeyError):
            log.slice(gone, 6)
    assert log.slice(4, 4) == []  # an empty range is no read
    log.mark_durable(7)
    assert log.evict(applied=6, max_bytes=0) == 2  # 7 is not applied
    assert ([e.log_id.index for e in log.slice(7, 8)], log.held_bytes) == ([7], 100)


def test_truncate_and_purge_keep_the_held_bytes_and_the_durable_end() -> None:
    log = RaftLog(None, [sized(1, i, 100) for i in range(6)])
    log.evict(applied=5, max_bytes=300)  # 0..2 on disk only
    log.truncate(5)
    assert (log.last_index, log.first_held, log.held_bytes, log.durable) == (4, 3, 200, 4)
    log.purge(lid(1, 3))
    assert (log.first_index, log.first_held, log.held_bytes) == (4, 4, 100)
    log.truncate(1)  # into the purged/evicted part: nothing is held any more
    assert (log.last_log_id, log.held_bytes, log.first_held) == (lid(1, 3), 0, 4)
    log.append([sized(2, 4, 50)])
    assert (log.held_bytes, log.durable, log.first_held) == (50, 3, 4)
