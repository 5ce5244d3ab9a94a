"""Membership changes as a user meets them: removing learners, a learner that does not
catch up, and a node removed from the membership (issue 8, section 5)."""

from __future__ import annotations

import asyncio

import pytest

from raft_cluster import FAST, Cluster, cmd
from raft_http.raft import (
    LearnerNotCaughtUp,
    NodeRemoved,
    NotAllowed,
    ServerState,
)
from raft_http.types import Node


async def test_a_learner_nobody_listens_for_is_reported_unreachable_then_removed(
    cluster: Cluster,
) -> None:
    """Nothing at node 9's address: add_learner says so, remove_learner takes it out."""
    leader = await cluster.initialized([1, 2, 3])
    with pytest.raises(LearnerNotCaughtUp) as info:
        await leader.add_learner(9, Node("mem-9"), timeout=0.3)
    error = info.value
    assert error.unreachable
    assert error.node_id == 9
    assert error.matched is None
    assert "unreachable" in error.message
    assert "Unreachable" in (error.problem or "")
    membership = leader.metrics().membership_config
    assert membership.log_id == error.log_id
    assert 9 in membership.membership.nodes  # added all the same
    assert error.kind == "learner_not_caught_up"

    response = await leader.remove_learner([9])
    assert response.log_id.index > error.log_id.index
    await cluster.wait_all(
        lambda m: 9 not in m.membership_config.membership.nodes, 5.0, "9 to be removed"
    )
    await leader.wait_for(
        lambda m: m.replication is not None and 9 not in m.replication, 5.0, "the stream to 9 ends"
    )
    sent = cluster.router.sent[(leader.id, 9, "append")]
    await asyncio.sleep(FAST.election_timeout_max * 3)
    assert cluster.router.sent[(leader.id, 9, "append")] == sent, "still retrying node 9"
    # Membership changes work again, and the voters are as they were.
    await leader.change_membership([1, 2, 3])
    assert leader.metrics().membership_config.membership.configs == [[1, 2, 3]]


async def test_a_slow_learner_is_reported_as_catching_up(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    for i in range(3):
        await leader.client_write(cmd(i))
    await cluster.start(4)
    cluster.router.set_delay(leader.id, 4, 0.5)
    with pytest.raises(LearnerNotCaughtUp) as info:
        await leader.add_learner(4, cluster.node(4), timeout=0.2)
    assert not info.value.unreachable
    assert "still catching up" in info.value.message
    cluster.router.set_delay(leader.id, 4, 0)
    await cluster.nodes[4].wait_for(
        lambda m: m.last_applied is not None and m.last_applied.index >= info.value.log_id.index,
        5.0,
        "the learner to catch up after all",
    )
    assert cluster.nodes[4].metrics().state is ServerState.LEARNER
    # Asking again for the same learner at the same address is answered at once.
    again = await leader.add_learner(4, cluster.node(4), timeout=5.0)
    assert again.log_id == info.value.log_id


async def test_remove_learner_refuses_voters_and_ignores_strangers(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    before = leader.metrics().membership_config
    with pytest.raises(NotAllowed, match="are voters"):
        await leader.remove_learner([2])
    unchanged = await leader.remove_learner([42])
    assert unchanged.log_id == before.log_id
    follower = next(n for i, n in cluster.nodes.items() if i != leader.id)
    with pytest.raises(Exception, match="not the leader"):
        await follower.remove_learner([42])


async def test_a_removed_voter_knows_it_refuses_reads_and_writes_and_stops_campaigning(
    cluster: Cluster,
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(1))
    victim_id = next(i for i in cluster.nodes if i != leader.id)
    victim = cluster.nodes[victim_id]
    remaining = [i for i in (1, 2, 3) if i != victim_id]
    await leader.change_membership(remaining)
    m = await victim.wait_for(lambda m: m.state is ServerState.REMOVED, 5.0, "the victim to know")
    # It holds the membership that removed it, not the joint config on the way.
    assert m.membership_config.membership.configs == [remaining]
    assert m.current_leader is None
    with pytest.raises(NodeRemoved):
        await victim.client_write(cmd(2))
    with pytest.raises(NodeRemoved):
        await victim.ensure_linearizable()
    await leader.wait_for(
        lambda m: m.replication is not None and victim_id not in m.replication,
        5.0,
        "the leader to stop replicating to the removed node",
    )
    votes = sum(
        n
        for (src, _, kind), n in cluster.router.sent.items()
        if src == victim_id and kind == "vote"
    )
    await asyncio.sleep(FAST.election_timeout_max * 4)
    after = sum(
        n
        for (src, _, kind), n in cluster.router.sent.items()
        if src == victim_id and kind == "vote"
    )
    assert after == votes, "a removed node campaigns"
    assert victim.metrics().state is ServerState.REMOVED
    # After a restart it still knows, also when it restarts from a snapshot of its own.
    await cluster.restart(victim_id)
    assert cluster.nodes[victim_id].metrics().state is ServerState.REMOVED
    await cluster.nodes[victim_id].trigger_snapshot()
    await cluster.nodes[victim_id].wait_for(lambda m: m.snapshot is not None, 5.0, "a snapshot")
    await cluster.restart(victim_id)
    restarted = cluster.nodes[victim_id].metrics()
    assert restarted.snapshot is not None
    assert restarted.state is ServerState.REMOVED


async def test_a_removed_leader_knows_it(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    remaining = [i for i in (1, 2, 3) if i != leader.id]
    await leader.change_membership(remaining)
    await leader.wait_for(lambda m: m.state is ServerState.REMOVED, 5.0, "the old leader to know")
    with pytest.raises(NodeRemoved):
        await leader.client_write(cmd(1))
    new = await cluster.leader(among=remaining)
    await new.client_write(cmd(2))


async def test_a_new_learner_catching_up_is_not_removed(cluster: Cluster) -> None:
    """Its log starts with memberships it is not in: that is not being removed."""
    leader = await cluster.initialized([1, 2, 3])
    await cluster.start(4)
    # In no cluster yet, and hearing no leader: not a learner of anything (issue #7).
    assert cluster.nodes[4].metrics().state is ServerState.UNINITIALIZED
    cluster.router.set_delay(leader.id, 4, 0.05)
    task = asyncio.create_task(leader.add_learner(4, cluster.node(4)))
    states = set()
    while not task.done():
        states.add(cluster.nodes[4].metrics().state)
        await asyncio.sleep(0.005)
    await task
    assert ServerState.REMOVED not in states
