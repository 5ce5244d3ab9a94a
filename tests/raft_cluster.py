"""An in-process cluster of Raft cores over ``raft_http.testing.MemoryRouter``, for core tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from raft_http.raft import Config, MemoryLogStore, Raft, RaftMetrics, ServerState, SnapshotStore
from raft_http.raft.sqlite_store import SqliteLogStore
from raft_http.raft.storage import LogStore
from raft_http.testing import ListStateMachine, MemoryRouter
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Conflict,
    LeaderId,
    Node,
    Vote,
    VoteRequest,
    VoteResponse,
)

FAST = Config(heartbeat_interval=0.02, election_timeout_min=0.08, election_timeout_max=0.16)


def snapshotting(every: int, keep: int) -> Config:
    """``FAST``, building a snapshot every ``every`` applied logs and keeping ``keep`` behind it."""
    return dataclasses.replace(
        FAST, snapshot_logs_since_last=every, max_in_snapshot_log_to_keep=keep
    )


def cmd(n: int) -> bytes:
    """A command for ``ListStateMachine``: ``{"n": n}``."""
    return json.dumps({"n": n}).encode()


class Cluster:
    """Nodes that keep their stores across ``stop``/``restart``, as a process keeps its disk."""

    def __init__(
        self,
        tmp_path: Path,
        config: Config = FAST,
        machine: Callable[[], ListStateMachine] = ListStateMachine,
    ) -> None:
        self.new_machine = machine
        self.tmp_path = tmp_path
        self.config = config
        self.router = MemoryRouter(backoff_seconds=0.02)
        self.stores: dict[int, LogStore] = {}
        self.machines: dict[int, ListStateMachine] = {}
        self.nodes: dict[int, Raft] = {}

    def node(self, node_id: int) -> Node:
        return Node(f"mem-{node_id}")

    async def start(self, node_id: int, store: LogStore | None = None) -> Raft:
        if store is not None:
            self.stores[node_id] = store
        store = self.stores.setdefault(node_id, MemoryLogStore())
        machine = self.machines[node_id] = self.new_machine()
        snapshots = SnapshotStore(self.tmp_path / f"snapshots-{node_id}")
        raft = await Raft.create(
            node_id, self.config, self.router.factory(node_id), store, machine, snapshots
        )
        self.nodes[node_id] = raft
        self.router.register(node_id, raft)
        return raft

    async def stop(self, node_id: int) -> None:
        self.router.unregister(node_id)
        await self.nodes.pop(node_id).shutdown()

    async def restart(self, node_id: int) -> Raft:
        if node_id in self.nodes:
            await self.stop(node_id)
        return await self.start(node_id)

    async def initialized(self, ids: Sequence[int]) -> Raft:
        """Start ``ids``, initialize the first with all of them, and return the elected leader."""
        for node_id in ids:
            await self.start(node_id)
        await self.nodes[ids[0]].initialize({i: self.node(i) for i in ids})
        return await self.leader()

    async def leader(self, timeout: float = 5.0, among: Sequence[int] | None = None) -> Raft:
        """The one node that leads and whose leadership a quorum has confirmed by committing."""
        ids = list(among if among is not None else self.nodes)
        async with asyncio.timeout(timeout):
            while True:
                for node_id in ids:
                    m = self.nodes[node_id].metrics()
                    if (
                        m.state is ServerState.LEADER
                        and m.committed is not None
                        and m.committed.leader_id.term == m.current_term
                    ):
                        return self.nodes[node_id]
                await asyncio.sleep(0.01)

    async def wait_all(self, predicate: Any, timeout: float = 5.0, msg: str = "") -> None:
        await asyncio.gather(*(n.wait_for(predicate, timeout, msg) for n in self.nodes.values()))

    async def wait_applied(self, index: int, timeout: float = 5.0) -> None:
        def applied(m: RaftMetrics) -> bool:
            return m.last_applied is not None and m.last_applied.index >= index

        await self.wait_all(applied, timeout, f"applied index {index}")

    async def close(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)


@contextlib.asynccontextmanager
async def sqlite_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Nodes 1-3 on ``SqliteLogStore`` files in ``tmp_path``, initialized; stores closed after."""
    c = Cluster(tmp_path)
    try:
        await start_on_sqlite(c, tmp_path)
        await c.nodes[1].initialize({i: c.node(i) for i in (1, 2, 3)})
        yield c
    finally:
        await c.close()
        for store in c.stores.values():
            with contextlib.suppress(Exception):
                await store.close()


async def start_on_sqlite(c: Cluster, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        await c.start(i, await SqliteLogStore.open(tmp_path / f"log-{i}.db"))


async def restart_on_sqlite(c: Cluster, tmp_path: Path) -> Raft:
    """Stop every node and close its store, start them again on the same files; the leader."""
    for i in (1, 2, 3):
        await c.stop(i)
        await c.stores[i].close()
    await start_on_sqlite(c, tmp_path)
    return await c.leader()


class GrantingPeer:
    """A peer that grants every vote and never accepts an entry (so nothing commits)."""

    def current_vote(self) -> Vote:
        return Vote(LeaderId(0, 0))

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        return VoteResponse(rpc.vote, True, None)

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        return Conflict()

    async def install_full_snapshot(self, vote: Vote, snapshot: Any) -> Any:
        raise AssertionError("not expected")
