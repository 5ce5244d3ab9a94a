"""The ``LogStore`` contract, run against both stores (memory and SQLite), and the memory store.

SQLite-only behaviour (reopen, crash durability, corruption) is in test_sqlite_store.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest

from raft_http.raft.memory_store import MemoryLogStore
from raft_http.raft.sqlite_store import SqliteLogStore
from raft_http.raft.storage import LogState, LogStore, StorageError
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    AppendEntriesRequest,
    Blank,
    Entry,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    Vote,
)

Opener = Callable[[], Awaitable[LogStore]]


def log_id(index: int, term: int = 1, node: int = 1) -> LogId:
    return LogId(LeaderId(term, node), index)


def entry(index: int, term: int = 1, node: int = 1) -> Entry:
    lid = log_id(index, term, node)
    if index % 3 == 1:
        return Entry(lid, Blank())
    if index % 3 == 2:
        membership = Membership(configs=[[1, 2, 3]], nodes={1: Node("a:1"), 2: Node("b:2")})
        return Entry(lid, MembershipChange(membership))
    return Entry(lid, Normal(msgspec.Raw(b'{"set":"k%d","v":[1,2,{"x":null}]}' % index)))


def entries(start: int, stop: int, term: int = 1) -> list[Entry]:
    return [entry(i, term) for i in range(start, stop)]


def log_index_count(state: LogState) -> int:
    """How many entries a state without purges holds."""
    assert state.last_purged_log_id is None
    return 0 if state.last_log_id is None else state.last_log_id.index + 1


@pytest.fixture(params=["memory", "sqlite"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the store under test; for SQLite, the same file each time (a reopen)."""
    stores: list[LogStore] = []

    async def open_() -> LogStore:
        if request.param == "memory":
            stores.append(MemoryLogStore())
        else:
            stores.append(await SqliteLogStore.open(tmp_path / "log.db"))
        return stores[-1]

    yield open_
    for store in stores:
        await store.close()


class TestLogStoreContract:
    """Run against every store by the parametrised ``opener`` fixture."""

    async def test_fresh_store_is_empty(self, opener: Opener) -> None:
        store = await opener()
        assert await store.get_log_state() == LogState(None, None)
        assert await store.read_vote() is None
        assert await store.read_committed() is None
        assert await store.read_entries(0, 100) == []

    async def test_append_and_read_ranges(self, opener: Opener) -> None:
        store = await opener()
        await store.append(entries(0, 5))
        await store.append(entries(5, 10, term=2))
        assert await store.get_log_state() == LogState(None, log_id(9, 2))
        assert await store.read_entries(0, 10) == entries(0, 5) + entries(5, 10, 2)
        assert await store.read_entries(3, 6) == [entry(3), entry(4), entry(5, 2)]
        assert await store.read_entries(8, 100) == entries(8, 10, 2)
        assert await store.read_entries(10, 20) == []
        assert await store.read_entries(5, 5) == []
        assert await store.read_entries(6, 2) == []

    async def test_empty_append_is_a_no_op(self, opener: Opener) -> None:
        store = await opener()
        await store.append([])
        assert await store.get_log_state() == LogState(None, None)

    @pytest.mark.parametrize(
        "batch",
        [
            pytest.param([entry(1)], id="fresh log must start at 0"),
            pytest.param([entry(4), entry(5)], id="gap after the last entry"),
            pytest.param([entry(2)], id="overlap with the last entry"),
            pytest.param([entry(3), entry(5)], id="gap inside the batch"),
            pytest.param([entry(3), entry(3)], id="repeat inside the batch"),
            pytest.param([entry(3, term=0)], id="term goes down"),
        ],
    )
    async def test_inconsistent_append_is_rejected(
        self, opener: Opener, batch: list[Entry]
    ) -> None:
        store = await opener()
        if batch[0].log_id.index != 1:  # all but the first case start from a 3-entry log
            await store.append(entries(0, 3))
        before = await store.get_log_state()
        with pytest.raises(StorageError):
            await store.append(batch)
        assert await store.get_log_state() == before
        assert len(await store.read_entries(0, 100)) == log_index_count(before)

    async def test_truncate(self, opener: Opener) -> None:
        store = await opener()
        await store.append(entries(0, 10))
        await store.truncate(6)
        assert await store.get_log_state() == LogState(None, log_id(5))
        assert await store.read_entries(0, 100) == entries(0, 6)
        await store.truncate(100)  # past the end: nothing to do
        assert await store.get_log_state() == LogState(None, log_id(5))
        # the truncated indexes can be written again, by a newer leader
        await store.append(entries(6, 8, term=3))
        assert await store.read_entries(5, 100) == [entry(5), *entries(6, 8, 3)]
        await store.truncate(0)
        assert await store.get_log_state() == LogState(None, None)
        await store.append(entries(0, 1, term=4))
        assert await store.read_entries(0, 100) == entries(0, 1, 4)

    async def test_purge(self, opener: Opener) -> None:
        store = await opener()
        await store.append(entries(0, 10))
        await store.purge(log_id(3))
        assert await store.get_log_state() == LogState(log_id(3), log_id(9))
        assert await store.read_entries(0, 100) == entries(4, 10)
        await store.purge(log_id(2))  # never moves back
        assert await store.get_log_state() == LogState(log_id(3), log_id(9))
        await store.purge(log_id(9))  # everything
        assert await store.get_log_state() == LogState(log_id(9), log_id(9))
        assert await store.read_entries(0, 100) == []
        with pytest.raises(StorageError):
            await store.append([entry(11)])
        await store.append([entry(10)])
        assert await store.get_log_state() == LogState(log_id(9), log_id(10))

    async def test_purge_past_the_last_entry(self, opener: Opener) -> None:
        """A follower installing a snapshot ahead of its log: the log then ends at the snapshot."""
        store = await opener()
        await store.append(entries(0, 3))
        await store.purge(log_id(50, term=2))
        assert await store.get_log_state() == LogState(log_id(50, 2), log_id(50, 2))
        assert await store.read_entries(0, 100) == []
        await store.append([entry(51, term=2)])
        assert await store.read_entries(0, 100) == [entry(51, term=2)]

    async def test_truncate_into_the_purged_prefix_keeps_the_purged_end(
        self, opener: Opener
    ) -> None:
        store = await opener()
        await store.append(entries(0, 10))
        await store.purge(log_id(4))
        await store.truncate(2)
        assert await store.get_log_state() == LogState(log_id(4), log_id(4))
        await store.append([entry(5, term=2)])
        assert await store.read_entries(0, 100) == [entry(5, term=2)]

    async def test_vote_and_committed(self, opener: Opener) -> None:
        store = await opener()
        vote = Vote(LeaderId(3, 2))
        await store.save_vote(vote)
        assert await store.read_vote() == vote
        await store.save_vote(vote.committed_vote())
        assert await store.read_vote() == Vote(LeaderId(3, 2), committed=True)
        await store.save_committed(log_id(7, 3))
        assert await store.read_committed() == log_id(7, 3)
        await store.save_committed(None)
        assert await store.read_committed() is None

    async def test_closed_store_refuses(self, opener: Opener) -> None:
        store = await opener()
        await store.close()
        with pytest.raises(StorageError):
            await store.append(entries(0, 1))
        with pytest.raises(StorageError):
            await store.get_log_state()
        await store.close()  # twice is fine


async def test_memory_store_does_not_pin_request_buffers() -> None:
    """An entry decoded from a big request is stored with its own copy of the data."""
    batch = APPEND_ENTRIES_REQUEST.decode(
        APPEND_ENTRIES_REQUEST.encode(
            AppendEntriesRequest(Vote(LeaderId(1, 1)), None, entries(0, 30), None)
        )
    )
    store = MemoryLogStore()
    await store.append(batch.entries)
    stored = await store.read_entries(0, 30)
    assert stored == batch.entries
    for original, kept in zip(batch.entries, stored, strict=True):
        if isinstance(original.payload, Normal):
            assert isinstance(kept.payload, Normal)
            assert kept.payload.data.copy() is kept.payload.data  # owns its bytes
            assert original.payload.data.copy() is not original.payload.data  # a view
