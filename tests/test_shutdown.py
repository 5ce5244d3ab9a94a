"""``Raft.shutdown`` and ``Raft.fail``: what is in flight when a node stops.

Shutdown returns only once every task the node started has ended (incoming RPC
handlers included) and every storage call it made has returned; undecided client
writes get the shutdown error; after ``fail()``, ``shutdown()`` still waits.

The stores here model a worker thread: a held call waits at a gate, and cancelling
the task that awaits it does not stop it (as cancelling ``asyncio.to_thread`` does
not stop the thread). Everything runs on virtual time: no test depends on timing.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgspec
import pytest

from engine_helpers import lid, vote
from raft_cluster import FAST, Cluster, cmd
from raft_http.errors import Fatal
from raft_http.raft import Config, ForwardToLeader, MemoryLogStore, Raft, ServerState
from raft_http.raft.snapshot_store import SnapshotStore
from raft_http.raft.storage_calls import StorageCalls
from raft_http.testing import ListStateMachine, MemoryRouter
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Entry,
    LeaderId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
)
from sim.virtual_time import on_virtual_time

_T = TypeVar("_T")
NODES = {i: Node(f"mem-{i}") for i in (1, 2, 3)}
QUIET = Config(
    heartbeat_interval=0.02,
    election_timeout_min=0.08,
    election_timeout_max=0.16,
    enable_elect=False,
)


def leader_vote(term: int, leader: int) -> Vote:
    return vote(term, leader, committed=True)


def first_entries() -> list[Entry]:
    """Node 1's first two entries of term 1: the membership {1, 2, 3} and a command."""
    membership = MembershipChange(Membership([[1, 2, 3]], dict(NODES)))
    command = Normal(msgspec.Raw(msgspec.json.encode("a")))
    return [Entry(lid(1, 0), membership), Entry(lid(1, 1), command)]


class Worker:
    """Storage calls as a worker thread runs them: held ones wait at ``gate``; a cancelled
    caller does not stop a call; ``busy`` counts the calls not finished."""

    def __init__(self) -> None:
        self.hold: set[str] = set()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.busy = 0
        self.calls: list[str] = []

    async def run(self, name: str, call: Coroutine[Any, Any, _T]) -> _T:
        self.calls.append(name)

        async def work() -> _T:
            self.busy += 1
            try:
                if name in self.hold:
                    self.entered.set()
                    await self.gate.wait()
                return await call
            finally:
                self.busy -= 1

        return await asyncio.shield(asyncio.ensure_future(work()))


class WorkerLogStore(MemoryLogStore):
    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    async def save_vote(self, vote: Vote) -> None:
        await self.worker.run("save_vote", super().save_vote(vote))

    async def append(self, entries: Sequence[Entry]) -> None:
        await self.worker.run("append", super().append(entries))

    async def truncate(self, since: int) -> None:
        await self.worker.run("truncate", super().truncate(since))


class WorkerSnapshotStore(SnapshotStore):
    def __init__(self, directory: Path, worker: Worker) -> None:
        super().__init__(directory)
        self.worker = worker

    async def save_from(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        await self.worker.run("save_from", super().save_from(meta, data))

    async def save(self, meta: SnapshotMeta, write: Any) -> None:
        await self.worker.run("save", super().save(meta, write))


async def follower(tmp_path: Path, worker: Worker) -> tuple[Raft, WorkerLogStore]:
    """Node 2 of {1, 2, 3}, with elections off: only the RPCs a test calls move it."""
    store = WorkerLogStore(worker)
    raft = await Raft.create(
        2,
        QUIET,
        MemoryRouter().factory(2),
        store,
        ListStateMachine(),
        WorkerSnapshotStore(tmp_path / "snapshots-2", worker),
    )
    return raft, store


async def stop_and_count(raft: Raft, worker: Worker) -> int:
    """Shut ``raft`` down; the storage calls still running when shutdown returned."""
    await raft.shutdown()
    return worker.busy


async def shutdown_while_held(raft: Raft, worker: Worker) -> int:
    """Shutdown while a call is held; let the call go a (virtual) second later."""
    stopping = asyncio.create_task(stop_and_count(raft, worker))
    await asyncio.sleep(1.0)
    assert not stopping.done(), "shutdown returned while a storage call was running"
    worker.gate.set()
    return await stopping


async def follower_appending(
    tmp_path: Path, worker: Worker
) -> tuple[Raft, WorkerLogStore, asyncio.Task[AppendEntriesResponse]]:
    """A follower handling an AppendEntries whose log append is held by ``worker``."""
    raft, store = await follower(tmp_path, worker)
    worker.hold.add("append")
    rpc = AppendEntriesRequest(leader_vote(1, 1), None, first_entries(), None)
    handler = asyncio.create_task(raft.append_entries(rpc))
    await worker.entered.wait()
    return raft, store, handler


@on_virtual_time
async def test_shutdown_waits_for_an_append_entries_handler_writing_the_log(
    tmp_path: Path,
) -> None:
    worker = Worker()
    raft, store, handler = await follower_appending(tmp_path, worker)
    assert await shutdown_while_held(raft, worker) == 0
    assert handler.done(), "shutdown returned before the RPC handler ended"
    assert isinstance(handler.result(), Success)  # the write it did is complete
    assert (await store.get_log_state()).last_log_id == lid(1, 1)


@on_virtual_time
async def test_shutdown_waits_for_a_vote_being_saved(tmp_path: Path) -> None:
    worker = Worker()
    raft, store = await follower(tmp_path, worker)
    worker.hold.add("save_vote")
    handler = asyncio.create_task(raft.vote(VoteRequest(Vote(LeaderId(1, 3)), None)))
    await worker.entered.wait()
    assert await shutdown_while_held(raft, worker) == 0
    assert handler.done()
    assert handler.result().vote_granted  # granted only once the vote is durable
    assert await store.read_vote() == Vote(LeaderId(1, 3))


async def follower_saving_a_snapshot(
    tmp_path: Path, worker: Worker
) -> tuple[Raft, SnapshotMeta, io.BytesIO]:
    """A follower with a log, and the meta and data of a snapshot past it; the store's
    ``save_from`` will be held."""
    raft, _ = await follower(tmp_path, worker)
    rpc = AppendEntriesRequest(leader_vote(1, 1), None, first_entries(), None)
    assert isinstance(await raft.append_entries(rpc), Success)
    worker.hold.add("save_from")
    membership = StoredMembership(lid(1, 0), Membership([[1, 2, 3]], NODES))
    meta = SnapshotMeta(lid(1, 5), membership, "leader-5")
    return raft, meta, io.BytesIO(msgspec.json.encode(["a", "b", "c", "d", "e"]))


@on_virtual_time
async def test_shutdown_waits_for_a_snapshot_being_installed(tmp_path: Path) -> None:
    worker = Worker()
    raft, meta, data = await follower_saving_a_snapshot(tmp_path, worker)
    handler = asyncio.create_task(
        raft.install_full_snapshot(leader_vote(1, 1), Snapshot(meta, data))
    )
    await worker.entered.wait()
    assert await shutdown_while_held(raft, worker) == 0
    assert handler.done()
    directory = tmp_path / "snapshots-2"
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]
    assert await SnapshotStore(directory).latest() == meta


@on_virtual_time
async def test_a_cancelled_snapshot_install_returns_only_once_it_no_longer_reads_the_data(
    tmp_path: Path,
) -> None:
    """A server whose request is cancelled closes and deletes the uploaded file once the
    handler returns: the install, which runs to its end, must be done with it by then."""
    worker = Worker()
    raft, meta, data = await follower_saving_a_snapshot(tmp_path, worker)

    async def serve() -> SnapshotResponse:  # what the server's /snapshot route does
        try:
            return await raft.install_full_snapshot(leader_vote(1, 1), Snapshot(meta, data))
        finally:
            data.close()

    request = asyncio.create_task(serve())
    await worker.entered.wait()  # saving the data to the snapshot store
    request.cancel()
    await asyncio.sleep(1.0)
    assert not request.done(), "returned (and the data was closed) while still in use"
    assert not data.closed
    worker.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert data.closed
    assert raft.metrics().fatal is None
    assert raft.metrics().snapshot == lid(1, 5)
    assert await SnapshotStore(tmp_path / "snapshots-2").latest() == meta
    await raft.shutdown()


@on_virtual_time
async def test_shutdown_ends_a_transfer_handler_waiting_for_the_log(tmp_path: Path) -> None:
    worker = Worker()
    raft, _ = await follower(tmp_path, worker)
    rpc = AppendEntriesRequest(leader_vote(1, 1), None, first_entries(), None)
    assert isinstance(await raft.append_entries(rpc), Success)
    # The leader says its log ends at index 5: node 2 waits to hold it before campaigning.
    transfer = TransferLeaderRequest(leader_vote(1, 1), 2, lid(1, 5))
    handler = asyncio.create_task(raft.handle_transfer_leader(transfer))
    await asyncio.sleep(0.01)
    assert not handler.done()
    await raft.shutdown()
    assert handler.done(), "shutdown returned before the transfer handler ended"
    with pytest.raises(Fatal):
        handler.result()
    assert raft.current_vote() == leader_vote(1, 1), "no election after shutdown"


@on_virtual_time
async def test_rpcs_after_shutdown_get_fatal_and_touch_no_storage(tmp_path: Path) -> None:
    worker = Worker()
    raft, _ = await follower(tmp_path, worker)
    await raft.shutdown()
    before = list(worker.calls)
    rpc = AppendEntriesRequest(leader_vote(1, 1), None, first_entries(), None)
    with pytest.raises(Fatal):
        await raft.append_entries(rpc)
    with pytest.raises(Fatal):
        await raft.vote(VoteRequest(Vote(LeaderId(1, 3)), None))
    with pytest.raises(Fatal):
        await raft.handle_transfer_leader(TransferLeaderRequest(leader_vote(1, 1), 2, None))
    assert worker.calls == before
    assert raft.metrics().state is ServerState.SHUTDOWN


@on_virtual_time
async def test_undecided_writes_get_the_shutdown_error(tmp_path: Path) -> None:
    """A write being appended, and writes queued behind it: none hangs, none is told to
    go to another leader; all get ``Fatal`` (the KV API's 503 ``fatal``)."""
    worker = Worker()
    c = Cluster(tmp_path)
    try:
        await c.start(1, WorkerLogStore(worker))
        await c.nodes[1].initialize({1: c.node(1)})
        leader = await c.leader()
        await leader.client_write(cmd(0))
        worker.hold.add("append")
        appending = asyncio.create_task(leader.client_write(cmd(1)))
        await worker.entered.wait()
        queued = [asyncio.create_task(leader.client_write(cmd(i))) for i in (2, 3)]
        await asyncio.sleep(0.01)
        c.router.unregister(1)
        raft = c.nodes.pop(1)
        assert await shutdown_while_held(raft, worker) == 0
        for write in (appending, *queued):
            assert write.done(), "a write still waits after shutdown returned"
            error = write.exception()
            assert isinstance(error, Fatal), repr(error)
            assert not isinstance(error, ForwardToLeader)
        with pytest.raises(Fatal):
            await leader.client_write(cmd(4))
    finally:
        await c.close()


@on_virtual_time
async def test_shutdown_after_fail_still_waits(tmp_path: Path) -> None:
    worker = Worker()
    raft, _, handler = await follower_appending(tmp_path, worker)
    raft.fail("a test said so")
    assert raft.metrics().state is ServerState.SHUTDOWN
    assert await shutdown_while_held(raft, worker) == 0
    assert handler.done()
    assert raft.metrics().fatal == "a test said so"
    await raft.shutdown()  # again: returns at once


@on_virtual_time
async def test_shutdown_lets_a_snapshot_build_finish_and_fail_cancels_it(
    tmp_path: Path,
) -> None:
    """Shutdown waits for the build to save its files; fail() cancels the build, yet its
    save, already started, still ends before shutdown returns."""
    for stop in ("shutdown", "fail"):
        worker = Worker()
        directory = tmp_path / stop
        store = WorkerLogStore(worker)
        snapshots = WorkerSnapshotStore(directory, worker)
        raft = await Raft.create(
            1, FAST, MemoryRouter().factory(1), store, ListStateMachine(), snapshots
        )
        await raft.initialize({1: Node("mem-1")})
        await raft.wait_for(lambda m: m.state is ServerState.LEADER, 5, "leader")
        await raft.client_write(cmd(1))
        worker.hold.add("save")
        await raft.trigger_snapshot()
        await worker.entered.wait()
        if stop == "fail":
            raft.fail("a test said so")
        assert await shutdown_while_held(raft, worker) == 0
        assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]
        latest = await SnapshotStore(directory).latest()
        assert latest is not None  # the save had started: it completed either way
        assert latest.last_log_id == raft.metrics().last_applied


@on_virtual_time
async def test_a_task_in_a_storage_call_is_cancelled_once_the_call_returns() -> None:
    calls = StorageCalls()
    gate = asyncio.Event()
    done: list[str] = []

    async def write() -> str:
        await gate.wait()
        done.append("written")
        return "ok"

    async def caller() -> None:
        assert await calls.run(write()) == "ok"
        done.append("returned")
        await asyncio.sleep(0)
        done.append("went on")  # never: cancelled at its next await

    task = asyncio.create_task(caller())
    idle = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    calls.cancel(task)
    calls.cancel(idle)
    await asyncio.sleep(0)
    assert idle.cancelled()  # in no storage call: at once
    assert not task.done()
    assert calls.running == 1
    draining = asyncio.create_task(calls.drain("stopped"))
    await asyncio.sleep(1.0)
    assert not draining.done()
    gate.set()
    await draining
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["written", "returned"]
    assert calls.running == 0
    with pytest.raises(Fatal, match="stopped"):
        await calls.run(write())
