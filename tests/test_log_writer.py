"""The ordered log writer (group commit) and the follower/leader paths that use it.

A follower decides each AppendEntries under the core's lock but waits for its fsync
outside it, so requests that arrive while a write is in progress are written together
in one store call, and each is answered ``Success`` only once its entries are durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from raft_cluster import cmd, restart_on_sqlite, sqlite_cluster
from raft_http.errors import Fatal
from raft_http.raft import MemoryLogStore, Raft, SnapshotStore
from raft_http.raft.log_writer import LogWriter
from raft_http.raft.storage import StorageError
from raft_http.testing import ListStateMachine
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Entry,
    LogId,
    Success,
    Vote,
    VoteRequest,
)
from test_leader_flush import wait_until
from test_raft_review import initial_entry, leader_vote, lid, lone_follower, normal


class GatedStore(MemoryLogStore):
    """A memory store whose writes wait while ``gate`` is clear, and that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[tuple[str, object]] = []
        self.waiting = 0
        self.fail_next: str | None = None

    async def _wait(self, call: str, arg: object) -> None:
        self.calls.append((call, arg))
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.fail_next is not None and call == self.fail_next:
            self.fail_next = None
            raise StorageError("the disk is gone")

    async def append(self, entries: Sequence[Entry]) -> None:
        await self._wait("append", [e.log_id.index for e in entries])
        await super().append(entries)

    async def truncate(self, since: int) -> None:
        await self._wait("truncate", since)
        await super().truncate(since)

    async def purge(self, upto: LogId) -> None:
        await self._wait("purge", upto.index)
        await super().purge(upto)

    async def save_vote(self, vote: Vote) -> None:
        await self._wait("vote", vote.term)
        await super().save_vote(vote)

    async def save_committed(self, committed: LogId | None) -> None:
        self.calls.append(("committed", committed))  # not gated: no fsync (see storage.py)
        await super().save_committed(committed)

    def saved_committed(self) -> list[object]:
        return [arg for call, arg in self.calls if call == "committed"]

    def appends(self) -> list[object]:
        return [arg for call, arg in self.calls if call == "append"]


def entries(term: int, first: int, stop: int) -> list[Entry]:
    return [normal(term, i, i) for i in range(first, stop)]


class Writer:
    """A LogWriter over a GatedStore with its task running, and what it reported."""

    def __init__(self) -> None:
        self.store = GatedStore()
        self.errors: list[str] = []
        self.flushes = 0

        def flushed() -> None:
            self.flushes += 1

        self.writer = LogWriter(self.store, None, flushed, self.errors.append)
        self.task = asyncio.create_task(self.writer.run())

    async def close(self) -> None:
        self.store.gate.set()
        await self.writer.stop()
        await asyncio.wait_for(self.task, 5)


async def test_appends_queued_during_a_write_go_to_disk_in_one_call() -> None:
    w = Writer()
    try:
        w.store.gate.clear()
        first = w.writer.append(entries(1, 0, 2))
        await wait_until(lambda: w.store.waiting == 1, "the first write")
        rest = [w.writer.append(entries(1, i, i + 2)) for i in (2, 4, 6)]
        barrier = w.writer.sync()
        assert not barrier.done()
        w.store.gate.set()
        await asyncio.gather(first, *rest, barrier)
        assert w.store.appends() == [[0, 1], [2, 3, 4, 5, 6, 7]]
        assert w.writer.batches == 2
        assert w.writer.flushed == lid(1, 7)
        assert [e.log_id.index for e in await w.store.read_entries(0, 10)] == list(range(8))
        assert w.writer.sync().done()  # nothing queued: durable already
    finally:
        await w.close()


async def test_a_truncate_is_never_merged_with_or_overtaken_by_appends() -> None:
    w = Writer()
    try:
        w.store.gate.clear()
        w.writer.append(entries(1, 0, 4))
        await wait_until(lambda: w.store.waiting == 1, "the first write")
        w.writer.append(entries(1, 4, 6))
        w.writer.truncate(3, lid(1, 2))
        w.writer.append(entries(2, 3, 5))
        w.writer.append(entries(2, 5, 6))
        w.store.gate.set()
        await w.writer.sync()
        assert w.store.calls == [
            ("append", [0, 1, 2, 3]),
            ("append", [4, 5]),
            ("truncate", 3),
            ("append", [3, 4, 5]),
        ]
        stored = await w.store.read_entries(0, 10)
        assert [e.log_id for e in stored] == [lid(1, 0), lid(1, 1), lid(1, 2)] + [
            lid(2, i) for i in (3, 4, 5)
        ]
        assert w.writer.flushed == lid(2, 5)
    finally:
        await w.close()


async def test_flushed_follows_truncate_and_purge() -> None:
    w = Writer()
    try:
        await w.writer.append(entries(1, 0, 5))
        await w.writer.truncate(3, lid(1, 2))
        assert w.writer.flushed == lid(1, 2)
        await w.writer.purge(lid(1, 1))
        assert w.writer.flushed == lid(1, 2)
        await w.writer.purge(lid(3, 9))  # past the end: the purged id is the last one
        assert w.writer.flushed == lid(3, 9)
        assert w.flushes == 4
    finally:
        await w.close()


async def test_a_storage_error_fails_the_batch_and_everything_after_it() -> None:
    w = Writer()
    try:
        w.store.gate.clear()
        w.store.fail_next = "append"
        first = w.writer.append(entries(1, 0, 2))
        await wait_until(lambda: w.store.waiting == 1, "the first write")
        second = w.writer.append(entries(1, 2, 3))
        vote = w.writer.save_vote(leader_vote(2, 1))
        w.store.gate.set()
        for future in (first, second, vote):
            with pytest.raises(Fatal, match="the disk is gone"):
                await future
        assert w.errors == ["writing the log failed: the disk is gone"]
        with pytest.raises(Fatal):
            await w.writer.append(entries(1, 0, 1))  # no write after a failure
        with pytest.raises(Fatal):
            await w.writer.sync()
        assert await w.store.read_entries(0, 5) == []
        await asyncio.wait_for(w.task, 5)  # the task ended
    finally:
        await w.close()


async def test_stop_waits_for_the_write_in_progress_and_fails_the_queue() -> None:
    w = Writer()
    w.store.gate.clear()
    first = w.writer.append(entries(1, 0, 2))
    await wait_until(lambda: w.store.waiting == 1, "the first write")
    queued = w.writer.append(entries(1, 2, 3))
    stopping = asyncio.create_task(w.writer.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()  # the write in progress is not abandoned
    w.store.gate.set()
    await asyncio.wait_for(stopping, 5)
    await first
    with pytest.raises(Fatal, match="shut down"):
        await queued
    assert [e.log_id.index for e in await w.store.read_entries(0, 5)] == [0, 1]
    await asyncio.wait_for(w.task, 5)


async def test_a_writer_cancelled_mid_write_fails_that_write_and_all_after_it() -> None:
    """The node never cancels its writer; whatever else does (an event loop torn down
    without ``shutdown``) must leave no future hanging, nor a later write accepted."""
    w = Writer()
    w.store.gate.clear()
    first = w.writer.append(entries(1, 0, 2))
    await wait_until(lambda: w.store.waiting == 1, "the first write")
    queued = w.writer.append(entries(1, 2, 3))
    w.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w.task
    for future in (first, queued):
        with pytest.raises(Fatal, match="the node stopped"):
            await future
    with pytest.raises(Fatal, match="the node stopped"):
        await w.writer.append(entries(1, 3, 4))
    with pytest.raises(Fatal, match="the node stopped"):
        await w.writer.sync()
    await asyncio.wait_for(w.writer.stop(), 5)  # returns: nothing is left to wait for
    assert w.errors == []  # a cancellation is not a storage error


# --- the follower's side ---------------------------------------------------------------


def append_rpc(prev: LogId | None, new: list[Entry], commit: LogId | None) -> AppendEntriesRequest:
    return AppendEntriesRequest(leader_vote(1, 1), prev, new, commit)


async def gated_follower(tmp_path: Path) -> tuple[Raft, GatedStore, ListStateMachine]:
    store = GatedStore()
    machine = ListStateMachine()
    raft = await lone_follower(tmp_path, machine, store)
    first = append_rpc(None, [initial_entry(), *entries(1, 1, 3)], None)
    assert isinstance(await raft.append_entries(first), Success)
    store.calls.clear()
    return raft, store, machine


async def write_held(raft: Raft, store: GatedStore) -> asyncio.Task[AppendEntriesResponse]:
    """The AppendEntries of entries 3 and 4, started with the store's gate closed: its
    task, once its write waits at the gate."""
    store.gate.clear()
    task = asyncio.create_task(raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 5), None)))
    await wait_until(lambda: store.waiting == 1, "the write")
    return task


async def test_a_follower_writes_requests_that_arrive_during_a_write_in_one_fsync(
    tmp_path: Path,
) -> None:
    raft, store, _ = await gated_follower(tmp_path)
    try:
        answers = [await write_held(raft, store)]
        answers += [
            asyncio.create_task(
                raft.append_entries(append_rpc(lid(1, i - 1), entries(1, i, i + 2), None))
            )
            for i in (5, 7, 9)
        ]
        # Every request was decided (the in-memory log holds them all) while the first
        # write waits, and none is answered before its entries are on disk.
        await wait_until(lambda: raft.log.last_index == 10, "the in-memory log")
        await asyncio.sleep(0.02)
        assert not any(a.done() for a in answers)
        store.gate.set()
        assert all(isinstance(a, Success) for a in await asyncio.gather(*answers))
        assert store.appends() == [[3, 4], [5, 6, 7, 8, 9, 10]]
    finally:
        await raft.shutdown()


async def test_the_followed_leaders_append_survives_its_callers_cancellation(
    tmp_path: Path,
) -> None:
    """From the leader it follows, a follower decides an AppendEntries in the caller's own
    task (no task, no lock: ``Raft._append_steady``). A caller cancelled while the write
    is on its way must leave the write, and the node, as they were."""
    raft, store, _ = await gated_follower(tmp_path)
    try:
        call = await write_held(raft, store)
        assert raft.log.last_index == 4
        assert not raft._rpc_tasks  # decided in the caller's task
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        store.gate.set()
        # The write went on: a request vouching for index 4 is answered Success.
        after = append_rpc(lid(1, 4), entries(1, 5, 6), None)
        assert isinstance(await raft.append_entries(after), Success)
        assert store.appends() == [[3, 4], [5]]
        assert raft.metrics().running
    finally:
        await raft.shutdown()


async def test_a_request_waiting_for_the_lock_is_not_overtaken(tmp_path: Path) -> None:
    """A request that must wait for the core's lock is decided before the ones after it,
    though those could be decided at once (as ``_append_steady`` does once the lock is
    free): a pipelined stream's requests follow each other, and the later one's
    ``prev_log_id`` is the earlier one's last entry."""
    raft, store, _ = await gated_follower(tmp_path)
    try:
        await raft._lock.acquire()  # another handler deciding (a vote being saved, say)
        first = asyncio.create_task(
            raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 5), None))
        )
        for _ in range(3):  # it takes the locked path and waits for the lock
            await asyncio.sleep(0)
        second = asyncio.create_task(
            raft.append_entries(append_rpc(lid(1, 4), entries(1, 5, 7), None))
        )
        raft._lock.release()  # ``second`` runs before ``first`` wakes up
        answers = await asyncio.gather(first, second)
        assert [type(a) for a in answers] == [Success, Success]
        assert raft.log.last_index == 6
        assert store.appends() in ([[3, 4, 5, 6]], [[3, 4], [5, 6]])  # in order, once each
    finally:
        await raft.shutdown()


async def test_a_heartbeat_is_answered_only_once_the_log_it_vouches_for_is_durable(
    tmp_path: Path,
) -> None:
    raft, store, _ = await gated_follower(tmp_path)
    try:
        write = await write_held(raft, store)
        # Success for this empty request tells the leader that index 4 matches: not yet true.
        heartbeat = asyncio.create_task(raft.append_entries(append_rpc(lid(1, 4), [], None)))
        await asyncio.sleep(0.02)
        assert not heartbeat.done()
        store.gate.set()
        assert isinstance(await heartbeat, Success)
        assert isinstance(await write, Success)
    finally:
        await raft.shutdown()


async def test_a_conflicting_tail_is_truncated_in_order_with_the_queued_appends(
    tmp_path: Path,
) -> None:
    raft, store, _ = await gated_follower(tmp_path)
    try:
        store.gate.clear()
        old = asyncio.create_task(
            raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 6), None))
        )
        await wait_until(lambda: store.waiting == 1, "the first write")
        queued = asyncio.create_task(
            raft.append_entries(append_rpc(lid(1, 5), entries(1, 6, 7), None))
        )
        # A new leader replaces everything after index 3.
        newer = AppendEntriesRequest(leader_vote(2, 3), lid(1, 3), [normal(2, 4, "x", 3)], None)
        replaced = asyncio.create_task(raft.append_entries(newer))
        # The new vote is saved behind the queued appends (under the lock: nothing is
        # decided for the new leader before its vote is durable).
        await asyncio.sleep(0.02)
        assert raft.log.last_index == 6
        store.gate.set()
        results = await asyncio.gather(old, queued, replaced)
        assert all(isinstance(r, Success) for r in results)
        assert [c for c, _ in store.calls] == ["append", "append", "vote", "truncate", "append"]
        stored = [e.log_id for e in await store.read_entries(0, 10)]
        assert stored == [lid(1, i) for i in range(4)] + [lid(2, 4, 3)]
        assert (await store.read_vote()) == leader_vote(2, 3)
    finally:
        await raft.shutdown()


async def test_a_vote_is_granted_only_once_it_is_on_disk(tmp_path: Path) -> None:
    store = GatedStore()
    raft = await lone_follower(tmp_path, ListStateMachine(), store)  # no leader heard: no lease
    try:
        store.gate.clear()
        candidate = Vote(lid(5, 3).leader_id)
        rpc = VoteRequest(candidate, lid(1, 2), pre_vote=False)
        answer = asyncio.create_task(raft.vote(rpc))
        await wait_until(lambda: store.waiting == 1, "the vote's write")
        await asyncio.sleep(0.02)
        assert not answer.done()
        assert raft.current_vote() != candidate  # not adopted before it is durable
        store.gate.set()
        assert (await answer).vote_granted
        assert await store.read_vote() == candidate
    finally:
        await raft.shutdown()


async def test_a_follower_applies_committed_entries_it_has_not_flushed_and_restarts_consistent(
    tmp_path: Path,
) -> None:
    """The documented choice (raft/node.py): committed means durable on a quorum, so a
    follower may apply entries whose local write is still pending. If it then crashes
    and the write is lost, it restarts from what its disk holds, applies no entry
    differently, and is sent the lost tail again."""
    raft, store, machine = await gated_follower(tmp_path)
    store.gate.clear()
    answer = asyncio.create_task(
        raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 6), lid(1, 5)))
    )
    await raft.wait_for(lambda m: m.last_applied == lid(1, 5), 5, "apply")
    assert not answer.done()  # applied, but not acknowledged: not durable here
    # Committed up to 5, but the disk holds only up to 2: that is what is saved.
    await wait_until(lambda: lid(1, 2) in store.saved_committed(), "the commit index saved")
    assert store.saved_committed() == [lid(1, 2)]
    applied = list(machine.applied)
    # A crash loses the pending write: a new incarnation over what the disk holds.
    again, again_machine = await restart(raft, store, tmp_path)
    try:
        assert again.log.last_index == 2
        assert again.metrics().committed == lid(1, 2)
        assert again_machine.applied == applied[: len(again_machine.applied)]
        resend = append_rpc(lid(1, 2), entries(1, 3, 6), lid(1, 5))
        assert isinstance(await again.append_entries(resend), Success)
        await again.wait_for(lambda m: m.last_applied == lid(1, 5), 5, "apply again")
        assert again_machine.applied == applied
    finally:
        store.gate.set()
        await again.shutdown()
        await raft.shutdown()


async def restart(raft: Raft, store: GatedStore, tmp_path: Path) -> tuple[Raft, ListStateMachine]:
    """``raft`` crashes: a new incarnation over what ``store`` holds (gated writes are lost)."""
    disk = MemoryLogStore()
    vote = await store.read_vote()
    assert vote is not None
    await disk.save_vote(vote)
    await disk.append(await store.read_entries(0, 10))
    await disk.save_committed(await store.read_committed())
    raft.fail("crashed")
    machine = ListStateMachine()
    again = await Raft.create(
        2, raft.config, raft.network, disk, machine, SnapshotStore(tmp_path / "again")
    )
    return again, machine


async def test_the_saved_commit_index_names_an_entry_the_disk_holds(tmp_path: Path) -> None:
    """A new leader's entries replace an uncommitted tail and commit while the truncate
    and the append are still queued: the follower applies them from memory, but the
    commit index it saves must not name them. Its disk still holds the old entries at
    those indexes, and a crash would restart it applying those."""
    raft, store, machine = await gated_follower(tmp_path)  # 0..2 of term 1, on disk
    new_leader = leader_vote(2, 3)
    again: Raft | None = None
    try:
        tail = append_rpc(lid(1, 2), entries(1, 3, 6), None)  # 3..5 of term 1, uncommitted
        assert isinstance(await raft.append_entries(tail), Success)
        hello = AppendEntriesRequest(new_leader, lid(1, 5), [], None)
        assert isinstance(await raft.append_entries(hello), Success)  # its vote, on disk
        store.gate.clear()
        replace = AppendEntriesRequest(new_leader, lid(1, 2), entries(2, 3, 6), lid(2, 4))
        answer = asyncio.create_task(raft.append_entries(replace))
        await raft.wait_for(lambda m: m.last_applied == lid(2, 4), 5, "apply")
        await asyncio.sleep(0.2)  # several save intervals
        assert not answer.done()
        on_disk = {e.log_id for e in await store.read_entries(0, 10)}
        assert lid(1, 4) in on_disk  # the truncate is still queued
        assert all(c in on_disk for c in store.saved_committed() if c is not None)
        applied = list(machine.applied)
        again, again_machine = await restart(raft, store, tmp_path)
        assert again_machine.applied == applied[: len(again_machine.applied)]
    finally:
        store.gate.set()
        if again is not None:
            await again.shutdown()
        await raft.shutdown()


async def test_a_saved_commit_index_the_log_does_not_hold_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stores written by earlier versions may hold a commit index naming an entry their
    log does not hold (replaced in memory, the truncate lost in a crash): the node then
    applies nothing beyond its snapshot until a leader says what is committed."""
    raft, store, _ = await gated_follower(tmp_path)  # 0..2 of term 1, on disk
    await store.save_committed(lid(2, 2))  # committed at index 2, but a term-2 entry
    again, again_machine = await restart(raft, store, tmp_path)
    try:
        assert again.metrics().committed is None
        assert again_machine.applied == []
        assert "is not in the log" in caplog.text
        told = append_rpc(lid(1, 2), [], lid(1, 2))
        assert isinstance(await again.append_entries(told), Success)
        await again.wait_for(lambda m: m.last_applied == lid(1, 2), 5, "apply once told")
    finally:
        await again.shutdown()
        await raft.shutdown()


async def test_a_follower_storage_error_fails_the_request_and_the_node(tmp_path: Path) -> None:
    raft, store, _ = await gated_follower(tmp_path)
    try:
        store.fail_next = "append"
        with pytest.raises(Fatal, match="the disk is gone"):
            await raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 5), None))
        assert raft.metrics().fatal is not None
        with pytest.raises(Fatal):
            await raft.append_entries(append_rpc(lid(1, 2), [], None))
    finally:
        await raft.shutdown()


async def test_shutdown_waits_for_the_log_write_in_progress(tmp_path: Path) -> None:
    raft, store, _ = await gated_follower(tmp_path)
    answer = await write_held(raft, store)
    stopping = asyncio.create_task(raft.shutdown())
    await asyncio.sleep(0.02)
    assert not stopping.done()
    store.gate.set()
    await asyncio.wait_for(stopping, 5)
    # Decided without a task of its own (``_append_steady``), the request still ended first.
    assert answer.done(), "shutdown returned before the AppendEntries handler ended"
    assert [e.log_id.index for e in await store.read_entries(0, 10)] == list(range(5))
    assert isinstance(await answer, Success)


# --- inline appends: a follower's append on the loop's thread, when the store takes it -------


class InlineStore(MemoryLogStore):
    """A memory store with ``append_inline``, which takes a batch while ``take`` says so."""

    def __init__(self) -> None:
        super().__init__()
        self.take = True
        self.fail: str | None = None
        self.calls: list[tuple[str, list[int]]] = []

    def append_inline(self, entries: Sequence[Entry]) -> bool:
        self.calls.append(
            ("inline" if self.take else "declined", [e.log_id.index for e in entries])
        )
        if self.fail is not None:
            raise StorageError(self.fail)
        if not self.take:
            return False
        self._append_now(entries)
        return True

    def _append_now(self, entries: Sequence[Entry]) -> None:
        coro = super().append(entries)  # MemoryLogStore.append never awaits
        with pytest.raises(StopIteration):
            coro.send(None)

    async def append(self, entries: Sequence[Entry]) -> None:
        self.calls.append(("thread", [e.log_id.index for e in entries]))
        await super().append(entries)


async def test_inline_appends_are_written_inline_and_the_rest_as_before() -> None:
    store = InlineStore()
    errors: list[str] = []
    writer = LogWriter(store, None, lambda: None, errors.append)
    task = asyncio.create_task(writer.run())
    try:
        await writer.append(entries(1, 0, 2), inline=True)
        await writer.append(entries(1, 2, 3))  # a leader's: never inline
        store.take = False
        await writer.append(entries(1, 3, 4), inline=True)  # declined: the usual call
        store.take = True
        # Queued in one loop turn they merge; one of them not inline, the batch is not.
        await asyncio.gather(
            writer.append(entries(1, 4, 5), inline=True), writer.append(entries(1, 5, 6))
        )
        await asyncio.gather(
            writer.append(entries(1, 6, 7), inline=True),
            writer.append(entries(1, 7, 8), inline=True),
        )
        assert store.calls == [
            ("inline", [0, 1]),
            ("thread", [2]),
            ("declined", [3]),
            ("thread", [3]),
            ("thread", [4, 5]),
            ("inline", [6, 7]),
        ]
        assert (writer.batches, writer.inline_batches) == (5, 2)  # a declined batch counts once
        assert writer.flushed == lid(1, 7)
        assert [e.log_id.index for e in await store.read_entries(0, 10)] == list(range(8))
        assert not errors
    finally:
        await writer.stop()
        await asyncio.wait_for(task, 5)


async def test_an_inline_append_that_fails_stops_the_writer_like_any_other() -> None:
    store = InlineStore()
    store.fail = "the disk is gone"
    errors: list[str] = []
    writer = LogWriter(store, None, lambda: None, errors.append)
    task = asyncio.create_task(writer.run())
    failed = writer.append(entries(1, 0, 2), inline=True)
    with pytest.raises(Fatal, match="the disk is gone"):
        await failed
    await asyncio.wait_for(task, 5)
    assert errors
    assert "the disk is gone" in errors[0]
    with pytest.raises(Fatal):
        await writer.append(entries(1, 0, 1), inline=True)
    assert writer.flushed is None


async def test_a_follower_whose_inline_append_fails_refuses_and_stops(tmp_path: Path) -> None:
    store = InlineStore()
    raft = await lone_follower(tmp_path, ListStateMachine(), store)
    try:
        first = append_rpc(None, [initial_entry(), *entries(1, 1, 3)], None)
        assert isinstance(await raft.append_entries(first), Success)
        assert store.calls[-1] == ("inline", [0, 1, 2])
        store.fail = "the disk is gone"
        with pytest.raises(Fatal, match="the disk is gone"):
            await raft.append_entries(append_rpc(lid(1, 2), entries(1, 3, 5), None))
        assert raft.metrics().fatal is not None
        assert [e.log_id.index for e in await store.read_entries(0, 10)] == [0, 1, 2]
    finally:
        await raft.shutdown()


async def test_over_sqlite_followers_append_inline_and_the_leader_does_not(
    tmp_path: Path,
) -> None:
    async with sqlite_cluster(tmp_path) as c:
        leader = await c.leader()
        writes = [await leader.client_write(cmd(i)) for i in range(20)]
        await c.wait_applied(writes[-1].log_id.index)
        followers = [n for n in c.nodes.values() if n is not leader]
        assert leader._writer.inline_batches == 0
        assert leader._writer.batches >= 20
        for follower in followers:
            assert follower._writer.inline_batches >= 15, follower._writer.inline_batches
        leader = await restart_on_sqlite(c, tmp_path)  # and every acknowledged write is on disk
        await leader.ensure_linearizable()
        assert c.machines[leader.id].applied == [{"n": i} for i in range(20)]
