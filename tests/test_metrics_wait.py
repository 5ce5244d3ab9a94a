"""``Raft.wait_for`` and ``wait_for_server``: who wakes for which change."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from raft_cluster import Cluster, cmd
from raft_http.errors import Fatal
from raft_http.raft import RaftMetrics
from sim.virtual_time import on_virtual_time


class Counted:
    """A predicate that counts its calls and holds once ``done`` says so."""

    def __init__(self, done: object = None) -> None:
        self.calls = 0
        self.done = done

    def __call__(self, m: RaftMetrics) -> bool:
        self.calls += 1
        return callable(self.done) and bool(self.done(m))


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@on_virtual_time
async def test_server_waiters_sleep_through_writes_and_wake_for_a_new_leader(
    cluster: Cluster,
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(n for i, n in cluster.nodes.items() if i != leader.id)
    old = leader.id
    on_server = Counted(lambda m: m.current_leader not in (None, old))
    on_any = Counted()
    server_wait = asyncio.create_task(follower.wait_for_server(on_server, 30.0))
    any_wait = asyncio.create_task(follower.wait_for(on_any, 30.0))
    await _settle()
    for i in range(20):
        await leader.client_write(cmd(i))
    await cluster.wait_applied(leader.metrics().last_log_index)
    await _settle()

    assert on_any.calls > 20, "every write changes the follower's log: wait_for re-checks"
    assert on_server.calls == 1, "no server field changed: wait_for_server did not wake"
    assert not server_wait.done()

    await cluster.stop(old)
    m = await asyncio.wait_for(server_wait, 30.0)
    assert m.current_leader not in (None, old)
    assert m.current_term > leader.metrics().current_term
    any_wait.cancel()
    with contextlib.suppress(asyncio.CancelledError, Fatal):
        await any_wait


@on_virtual_time
async def test_server_waiters_wake_for_a_membership_change(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    await cluster.start(4)
    waiting = asyncio.create_task(
        leader.wait_for_server(lambda m: 4 in m.membership_config.membership.nodes, 30.0)
    )
    await _settle()
    assert not waiting.done()
    await leader.add_learner(4, cluster.node(4))
    m = await asyncio.wait_for(waiting, 30.0)
    assert 4 in m.membership_config.membership.nodes


@on_virtual_time
async def test_server_waiters_wake_when_the_node_fails_or_stops(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(n for i, n in cluster.nodes.items() if i != leader.id)
    fatal = asyncio.create_task(follower.wait_for_server(lambda m: m.fatal is not None, 30.0))
    never = asyncio.create_task(leader.wait_for_server(lambda m: False, 30.0))
    await _settle()

    follower.fail("the disk is gone")
    m = await asyncio.wait_for(fatal, 5.0)
    assert m.fatal == "the disk is gone"
    assert not m.running

    await leader.shutdown()
    with pytest.raises(Fatal, match="shut down"):
        await asyncio.wait_for(never, 5.0)


@on_virtual_time
async def test_a_server_wait_times_out_with_what_it_waited_for(cluster: Cluster) -> None:
    leader = await cluster.initialized([1])
    expected = r"node 1: timed out after 0\.5s waiting for a new leader"
    with pytest.raises(TimeoutError, match=expected):
        await leader.wait_for_server(lambda m: m.current_leader != 1, 0.5, "a new leader")
