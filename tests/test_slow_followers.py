"""Followers whose storage is slower than an election timeout keep their leader (issue #9, 8).

The leader keeps one AppendEntries in flight per follower. A follower that takes 0.4 s
to make a batch durable (election timeouts are 0.08-0.16 s here) hears nothing else
while it does; it must still count its leader as alive, neither campaigning nor
granting another node's (pre-)vote, because it is handling that leader's request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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
