"""Leadership transfer (Openraft's ``transfer_leader``, etcd's ``MsgTransferLeader``) in the core.

Most tests run with election timeouts of 1.5-3 s and a 1 s transfer bound: a transfer
that needed an election timeout (a lease running out, a pre-vote round refused)
would fail with ``TransferFailed`` instead of handing over.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from raft_cluster import FAST, Cluster, cmd
from raft_http.errors import Unreachable
from raft_http.network import RaftNetwork, RPCOption
from raft_http.raft import (
    ForwardToLeader,
    NotAllowed,
    Raft,
    ServerState,
    TransferFailed,
)
from raft_http.types import LeaderId, TransferLeaderRequest, Vote, VoteRequest

SLOW_ELECTIONS = dataclasses.replace(
    FAST, election_timeout_min=1.5, election_timeout_max=3.0, transfer_leader_timeout=1.0
)


@pytest.fixture
async def slow(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A cluster whose election timeout is far longer than any transfer may take."""
    c = Cluster(tmp_path, SLOW_ELECTIONS)
    try:
        yield c
    finally:
        await c.close()


async def followers_of(c: Cluster, leader: Raft) -> list[Raft]:
    others = [n for n in c.nodes.values() if n is not leader]
    for node in others:
        await node.wait_for(lambda m: m.current_leader == leader.id, 2, "the leader to be known")
    return others


async def test_transfer_hands_over_without_an_election_timeout(slow: Cluster) -> None:
    leader = await slow.initialized([1, 2, 3])
    acked = [await leader.client_write(cmd(i)) for i in range(10)]
    target = next(i for i in slow.nodes if i != leader.id)
    await followers_of(slow, leader)
    old_term = leader.metrics().current_term

    assert await leader.transfer_leader(target) == target

    new = slow.nodes[target]
    m = new.metrics()
    assert m.state is ServerState.LEADER
    assert m.current_term == old_term + 1
    assert leader.metrics().state is ServerState.FOLLOWER
    assert leader.metrics().current_leader == target
    # Only the target's one election ran: no pre-vote round, no second try.
    assert slow.router.sent[(target, leader.id, "vote")] == 1
    more = await new.client_write(cmd(100))
    await slow.wait_applied(more.log_id.index)
    for node_id in slow.nodes:
        applied = slow.machines[node_id].applied
        assert applied == [{"n": i} for i in range(10)] + [{"n": 100}], node_id
    assert len(acked) == 10


async def test_without_a_target_the_most_up_to_date_voter_is_chosen(slow: Cluster) -> None:
    leader = await slow.initialized([1, 2, 3])
    behind, ahead = (i for i in slow.nodes if i != leader.id)
    await followers_of(slow, leader)
    slow.router.block(leader.id, behind)  # appends to it hang: it falls behind
    await asyncio.sleep(0.1)  # let any append already in flight to it finish first
    write = await leader.client_write(cmd(1))
    assert slow.nodes[behind].metrics().last_log_index < write.log_id.index
    assert await leader.transfer_leader() == ahead
    slow.router.heal()


async def test_writes_during_a_transfer_are_sent_to_the_new_leader(slow: Cluster) -> None:
    leader = await slow.initialized([1, 2, 3])
    target = next(i for i in slow.nodes if i != leader.id)
    await followers_of(slow, leader)
    before = len(slow.machines[leader.id].applied)
    transfer = asyncio.create_task(leader.transfer_leader(target))
    await asyncio.sleep(0)  # the transfer has begun: the leader takes no new writes
    with pytest.raises(ForwardToLeader) as info:
        await leader.client_write(cmd(1))
    assert info.value.leader_id == target
    assert await transfer == target
    await asyncio.sleep(0.1)
    assert len(slow.machines[leader.id].applied) == before  # the held write was not proposed


async def test_a_target_that_cannot_catch_up_fails_and_the_leader_leads_on(
    slow: Cluster,
) -> None:
    leader = await slow.initialized([1, 2, 3])
    target = next(i for i in slow.nodes if i != leader.id)
    await followers_of(slow, leader)
    slow.router.block(leader.id, target)
    await asyncio.sleep(0.1)
    await leader.client_write(cmd(1))  # the target never gets it
    held = asyncio.create_task(leader.client_write(cmd(2)))
    with pytest.raises(TransferFailed, match="leads on"):
        await leader.transfer_leader(target, timeout=0.3)
    assert slow.router.sent[(leader.id, target, "transfer")] == 0
    assert leader.metrics().state is ServerState.LEADER
    assert (await held).data == 2  # the write that waited is proposed after all
    assert (await leader.client_write(cmd(3))).data == 3


async def test_a_network_without_transfer_leader_fails_it_and_the_leader_leads_on(
    slow: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader = await slow.initialized([1, 2, 3])
    await followers_of(slow, leader)

    async def default(self: RaftNetwork, rpc: TransferLeaderRequest, option: RPCOption) -> None:
        await RaftNetwork.transfer_leader(self, rpc, option)  # the contract's default

    monkeypatch.setattr("raft_http.testing.MemoryNetwork.transfer_leader", default)
    with pytest.raises(TransferFailed, match="does not implement transfer_leader"):
        await leader.transfer_leader()
    assert leader.metrics().state is ServerState.LEADER
    assert (await leader.client_write(cmd(1))).data == 1


async def test_the_contract_default_is_unreachable() -> None:
    class Bare(RaftNetwork):
        append_entries = vote = full_snapshot = None  # type: ignore[assignment]

    rpc = TransferLeaderRequest(Vote(LeaderId(1, 1), True), 2, None)
    with pytest.raises(Unreachable):
        await Bare().transfer_leader(rpc, RPCOption(hard_ttl=1))


async def test_refusals(cluster: Cluster) -> None:
    single = await cluster.initialized([1])
    with pytest.raises(NotAllowed, match="no other voter"):
        await single.transfer_leader()
    with pytest.raises(NotAllowed, match="not a voter"):
        await single.transfer_leader(7)
    assert await single.transfer_leader(1) == 1  # to itself: nothing to do
    assert single.metrics().state is ServerState.LEADER


async def test_a_follower_refuses_a_transfer_it_cannot_act_on(slow: Cluster) -> None:
    leader = await slow.initialized([1, 2, 3])
    target, other = (n for n in await followers_of(slow, leader))
    vote = leader.current_vote()
    last = leader.metrics().committed
    with pytest.raises(NotAllowed, match="not node"):
        await target.handle_transfer_leader(TransferLeaderRequest(vote, other.id, last))
    stale = Vote(LeaderId(vote.term - 1, leader.id), True)
    with pytest.raises(NotAllowed, match="follows"):
        await target.handle_transfer_leader(TransferLeaderRequest(stale, target.id, last))
    assert leader.metrics().state is ServerState.LEADER
    assert target.metrics().current_term == vote.term


async def test_the_lease_refuses_votes_unless_they_are_a_transfer(slow: Cluster) -> None:
    leader = await slow.initialized([1, 2, 3])
    follower, _ = await followers_of(slow, leader)
    term = leader.metrics().current_term
    last = follower.log.last_log_id
    candidate = Vote(LeaderId(term + 1, 3 if follower.id != 3 else 2))
    refused = await follower.vote(VoteRequest(candidate, last))
    assert not refused.vote_granted  # the follower heard from its leader lately
    granted = await follower.vote(VoteRequest(candidate, last, transfer=True))
    assert granted.vote_granted


async def test_fast_timers_transfer_back_and_forth(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    for i in range(6):
        await followers_of(cluster, leader)
        target = await leader.transfer_leader()
        assert target != leader.id
        leader = cluster.nodes[target]
        await leader.wait_for(lambda m: m.committed is not None, 2)
        assert (await leader.client_write(cmd(i))).data == i + 1
