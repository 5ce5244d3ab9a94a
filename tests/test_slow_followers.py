"""Busy or slow followers keep their live leader (issue #9, item 8: load caused elections).

The leader keeps one AppendEntries in flight per follower. A follower whose storage takes
longer than an election timeout to make a batch durable hears nothing else meanwhile; it
must still count its leader as alive, and not grant another node's (pre-)vote, because it
is handling that leader's request. And a follower whose timer fired on a busy loop, but
which hears from its leader while it pre-votes, must not go on to depose that leader.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from raft_cluster import Cluster
from raft_http.raft import ServerState
from raft_http.testing import ListStateMachine
from raft_http.types import AppendEntriesRequest, LeaderId, Success, Vote, VoteRequest
from test_raft_review import (
    SlowAppendStore,
    initial_entry,
    leader_vote,
    lid,
    lone_follower,
    normal,
)


async def test_a_follower_busy_with_its_leaders_append_refuses_other_candidates(
    tmp_path: Path,
) -> None:
    store = SlowAppendStore(0.5)  # far past the 0.08 s lease of QUIET
    raft = await lone_follower(tmp_path, ListStateMachine(), store)
    try:
        leader = leader_vote(1, 1)
        first = AppendEntriesRequest(leader, None, [initial_entry()], None)
        assert isinstance(await raft.append_entries(first), Success)
        slow = asyncio.create_task(
            raft.append_entries(AppendEntriesRequest(leader, lid(1, 0), [normal(1, 1, "a")], None))
        )
        await store.appending.wait()
        await asyncio.sleep(0.2)  # the lease since the append arrived has run out
        other = VoteRequest(Vote(LeaderId(2, 3)), lid(1, 1), pre_vote=True)
        answer = await raft.vote(other)  # waits for the append, which proves node 1 alive
        assert isinstance(await slow, Success)
        assert not answer.vote_granted
        assert raft.metrics().current_leader == 1
    finally:
        await raft.shutdown()


async def test_a_follower_that_hears_its_leader_during_the_pre_vote_does_not_campaign(
    cluster: Cluster,
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower, other = (n for n in cluster.nodes.values() if n is not leader)
    await follower.wait_for(lambda m: m.current_leader == leader.id, 2)
    term = leader.metrics().current_term
    # ``other`` stops hearing from the leader, so its lease lapses and it grants pre-votes;
    # the follower's pre-vote to it takes 0.1 s, during which the leader's appends arrive.
    cluster.router.block(leader.id, other.id)
    await asyncio.sleep(0.3)
    cluster.router.set_delay(follower.id, other.id, 0.1)
    await follower._elect()  # what its election timer does once it fires (a busy loop)
    assert follower.metrics().current_term == term
    assert leader.metrics().state is ServerState.LEADER
    assert leader.metrics().current_term == term
