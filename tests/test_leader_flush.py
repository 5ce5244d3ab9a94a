"""The leader sends entries before its own disk write, and counts itself only once flushed.

etcd-io/raft does the same: a write then waits for max(leader fsync, round trip + follower
fsync) instead of their sum, and it stays safe because the leader's vote toward a quorum
is only ever for entries on its own disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from raft_cluster import Cluster, cmd
from raft_http.raft import MemoryLogStore, Raft
from raft_http.types import Entry, log_index


class GatedStore(MemoryLogStore):
    """A log store whose appends wait while ``gate`` is clear: a disk that is slow to flush."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def append(self, entries: Sequence[Entry]) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        await super().append(entries)


async def gated_cluster(cluster: Cluster) -> tuple[Raft, dict[int, GatedStore]]:
    stores = {i: GatedStore() for i in (1, 2, 3)}
    for node_id, store in stores.items():
        await cluster.start(node_id, store)
    await cluster.nodes[1].initialize({i: cluster.node(i) for i in stores})
    leader = await cluster.leader()
    await leader.client_write(cmd(0))
    return leader, stores


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_followers_receive_and_commit_while_the_leaders_write_is_pending(
    cluster: Cluster,
) -> None:
    leader, stores = await gated_cluster(cluster)
    followers = [n for i, n in cluster.nodes.items() if i != leader.id]
    stores[leader.id].gate.clear()
    write = asyncio.create_task(leader.client_write(cmd(1)))
    index = leader.log.last_index + 1
    await wait_until(lambda: leader.log.last_index >= index, "the leader's in-memory log")
    # Both followers hold the entry and a quorum of them committed it, yet the leader's
    # own append has not finished: the entry went out before the leader's flush.
    await wait_until(
        lambda: all(f.log.last_index >= index for f in followers), "the followers' logs"
    )
    await wait_until(lambda: log_index(leader.metrics().committed) >= index, "the commit")
    # The write is acknowledged on the strength of the followers' disks alone.
    response = await asyncio.wait_for(write, 5.0)
    assert response.log_id.index == index
    assert stores[leader.id].waiting == 1
    stores[leader.id].gate.set()
    await wait_until(lambda: stores[leader.id].waiting == 0, "the leader's flush")


async def test_the_leader_counts_itself_only_once_its_write_is_flushed(
    cluster: Cluster,
) -> None:
    leader, stores = await gated_cluster(cluster)
    follower, down = (i for i in cluster.nodes if i != leader.id)
    await cluster.stop(down)
    stores[leader.id].gate.clear()
    write = asyncio.create_task(leader.client_write(cmd(1)))
    index = leader.log.last_index + 1
    await wait_until(lambda: cluster.nodes[follower].log.last_index >= index, "the follower's log")
    # One follower of three has it on disk, the leader only in memory: no quorum yet.
    for _ in range(20):
        await asyncio.sleep(0.01)
        assert log_index(leader.metrics().committed) < index
        assert not write.done()
    stores[leader.id].gate.set()
    response = await asyncio.wait_for(write, 5.0)
    assert response.log_id.index == index
    assert log_index(leader.metrics().committed) >= index


@pytest.mark.parametrize("size", [1, 3])
async def test_a_cluster_whose_leader_flushes_slowly_loses_nothing(
    cluster: Cluster, size: int
) -> None:
    """Many writes in flight while every leader flush lags: all commit, in order, everywhere."""
    stores = {i: GatedStore() for i in range(1, size + 1)}
    for node_id, store in stores.items():
        await cluster.start(node_id, store)
    await cluster.nodes[1].initialize({i: cluster.node(i) for i in stores})
    leader = await cluster.leader()

    async def flicker() -> None:
        gate = stores[leader.id].gate
        for _ in range(40):
            gate.clear()
            await asyncio.sleep(0.003)
            gate.set()
            await asyncio.sleep(0.002)

    results = await asyncio.gather(flicker(), *(leader.client_write(cmd(n)) for n in range(60)))
    indexes = [r.log_id.index for r in results[1:]]
    assert len(set(indexes)) == 60
    await cluster.wait_applied(max(indexes))
    applied = [cluster.machines[i].applied for i in cluster.nodes]
    assert all(a == applied[0] for a in applied)
    assert sorted(x["n"] for x in applied[0]) == list(range(60))
