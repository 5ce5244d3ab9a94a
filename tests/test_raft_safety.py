"""The paper's safety claims, reproduced on in-process clusters with prepared logs.

Each test builds the exact logs and votes of a scenario in the nodes' stores, lets
only the nodes the scenario names campaign, and checks the claim. They kill mutants
of the core that the rest of the suite let survive: a leader committing an entry of
an older term by counting replicas (Figure 8), a voter granting a vote without the
Election Restriction, and a candidate or leader ignoring a higher vote.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from raft_cluster import FAST, Cluster, cmd
from raft_http.raft import (
    MemoryLogStore,
    QuorumNotEnough,
    ServerState,
    StorageError,
)
from raft_http.testing import ListStateMachine
from raft_http.types import (
    Entry,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    Vote,
)

QUIET = dataclasses.replace(FAST, enable_elect=False)


def lid(term: int, index: int, leader: int) -> LogId:
    return LogId(LeaderId(term, leader), index)


def value(term: int, index: int, leader: int, n: int) -> Entry:
    return Entry(lid(term, index, leader), Normal(msgspec.Raw(cmd(n))))


def first_entry(ids: Sequence[int]) -> Entry:
    nodes = {i: Node(f"mem-{i}") for i in ids}
    return Entry(lid(0, 0, 0), MembershipChange(Membership([sorted(ids)], nodes)))


class RefusingStore(MemoryLogStore):
    """Fails (as a broken disk does) on any entry of term ``refuse_term`` while it is set."""

    def __init__(self, refuse_term: int | None = None) -> None:
        super().__init__()
        self.refuse_term = refuse_term

    async def append(self, entries: Sequence[Entry]) -> None:
        if any(e.log_id.term == self.refuse_term for e in entries):
            raise StorageError(f"refusing entries of term {self.refuse_term}")
        await super().append(entries)


async def prepared(
    store: MemoryLogStore, entries: Sequence[Entry], vote: Vote, committed: LogId | None = None
) -> MemoryLogStore:
    await store.append(list(entries))
    await store.save_vote(vote)
    if committed is not None:
        await store.save_committed(committed)
    return store


async def start(c: Cluster, node_id: int, *, elect: bool) -> None:
    c.config = FAST if elect else QUIET
    await c.start(node_id)


async def store_log(c: Cluster, node_id: int) -> list[LogId]:
    store = c.stores[node_id]
    state = await store.get_log_state()
    stop = (state.last_log_id.index + 1) if state.last_log_id else 0
    return [e.log_id for e in await store.read_entries(0, stop)]


async def test_figure_8_an_older_terms_entry_on_a_majority_is_not_committed(
    cluster: Cluster,
) -> None:
    """Raft paper, Figure 8: counting replicas must not commit an entry of an older term.

    (a)-(b) happened before the test: S1 led term 2 and wrote A at index 1; S5 led
    term 3 (votes of S3, S4) and wrote B at index 1. (c) S1 leads term 4 and copies A
    to S2 and S3, a majority, but its own term-4 entry reaches nobody (S2 and S3 crash
    on it). (d) S5 leads again and overwrites A with B everywhere. Had S1 committed
    A in (c), it would have applied A where the cluster applies B.
    """
    ids = [1, 2, 3, 4, 5]
    init = first_entry(ids)
    s5_vote = Vote(LeaderId(3, 5), True)
    cluster.stores[1] = await prepared(
        MemoryLogStore(), [init, value(2, 1, 1, 100)], Vote(LeaderId(2, 1), True)
    )
    for follower in (2, 3):
        cluster.stores[follower] = await prepared(RefusingStore(refuse_term=4), [init], s5_vote)
    cluster.stores[4] = await prepared(MemoryLogStore(), [init], s5_vote)
    cluster.stores[5] = await prepared(MemoryLogStore(), [init, value(3, 1, 5, 200)], s5_vote)

    # (c): S1 campaigns; S2 and S3 take one entry per request, so A arrives alone.
    cluster.router.set_max_entries(2, 1)
    cluster.router.set_max_entries(3, 1)
    await start(cluster, 1, elect=True)
    for follower in (2, 3):
        await start(cluster, follower, elect=False)
    s1 = cluster.nodes[1]
    await s1.wait_for(lambda m: m.state is ServerState.LEADER, 5.0, "S1 to lead")
    assert s1.metrics().current_term == 4
    for follower in (2, 3):
        await cluster.nodes[follower].wait_for(
            lambda m: m.fatal is not None, 5.0, "the follower to crash on the term-4 entry"
        )
        assert [i.index for i in await store_log(cluster, follower)] == [0, 1]
    m = s1.metrics()
    assert m.replication is not None
    assert m.replication[2] == m.replication[3] == lid(2, 1, 1)
    assert m.committed is None or m.committed.index == 0, "committed an older term's entry"
    applied_by_s1 = list(cluster.machines[1].applied)

    # (d): S1 crashes; S5 leads term 5 with S2, S3 (restarted, healthy) and S4.
    for node_id in (1, 2, 3):
        await cluster.stop(node_id)
    cluster.router.heal()
    for follower in (2, 3):
        store = cluster.stores[follower]
        assert isinstance(store, RefusingStore)
        store.refuse_term = None
    for node_id in (2, 3, 4):
        await start(cluster, node_id, elect=False)
    await start(cluster, 5, elect=True)
    s5 = await cluster.leader(among=[5])
    assert s5.metrics().current_term == 5
    await cluster.wait_applied(2)
    for node_id in (2, 3, 4, 5):
        assert cluster.machines[node_id].applied == [{"n": 200}]
    assert applied_by_s1 == [], "S1 applied an entry the cluster overwrote"


async def test_voter_refuses_a_candidate_whose_log_is_behind(cluster: Cluster) -> None:
    """Election Restriction (5.4.1): a committed entry keeps every later leader's log.

    A at index 1 is committed on S1 and S2 of {1, 2, 3}; S1 is down. S3, which lacks
    A, campaigns again and again, but S2 refuses it each time; S3 cannot become leader
    and overwrite A. Once S1 is back, a node with A leads and A stays at index 1.
    """
    ids = [1, 2, 3]
    init = first_entry(ids)
    a = value(1, 1, 1, 7)
    leader_vote = Vote(LeaderId(1, 1), True)
    cluster.stores[1] = await prepared(MemoryLogStore(), [init, a], leader_vote, a.log_id)
    cluster.stores[2] = await prepared(MemoryLogStore(), [init, a], leader_vote, a.log_id)
    cluster.stores[3] = await prepared(MemoryLogStore(), [init], leader_vote)
    await start(cluster, 2, elect=False)
    await start(cluster, 3, elect=True)

    async def campaigns(n: int) -> None:
        while cluster.router.sent[(3, 2, "vote")] < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(campaigns(4), 10.0)
    assert cluster.nodes[3].metrics().state is not ServerState.LEADER
    assert cluster.nodes[2].metrics().current_leader != 3
    assert await store_log(cluster, 2) == [init.log_id, a.log_id]

    await start(cluster, 1, elect=False)
    cluster.config = FAST
    await cluster.restart(2)  # now S2 may campaign too: it has A
    leader = await cluster.leader(among=[1, 2])
    await leader.client_write(cmd(8))
    await cluster.wait_applied(3)
    for node_id in ids:
        assert cluster.machines[node_id].applied == [{"n": 7}, {"n": 8}]


async def test_candidate_steps_down_on_a_voters_higher_vote(cluster: Cluster) -> None:
    """A candidate told of a greater vote adopts it and stops campaigning (5.1).

    S3 voted in term 10. S1 campaigns in term 2: S2 grants (slowly), S3 refuses with
    its term-10 vote and answers first. S1 must adopt term 10 rather than lead term 2.
    """
    ids = [1, 2, 3]
    init = first_entry(ids)
    start_vote = Vote(LeaderId(1, 1), True)
    cluster.stores[1] = await prepared(MemoryLogStore(), [init], start_vote, init.log_id)
    cluster.stores[2] = await prepared(MemoryLogStore(), [init], start_vote, init.log_id)
    cluster.stores[3] = await prepared(MemoryLogStore(), [init], Vote(LeaderId(10, 3)))
    cluster.router.set_delay(1, 2, FAST.election_timeout_max / 2)
    await start(cluster, 2, elect=False)
    await start(cluster, 3, elect=False)
    await start(cluster, 1, elect=True)
    s1 = cluster.nodes[1]
    await s1.wait_for(lambda m: m.current_term >= 10, 5.0, "S1 to adopt term 10")
    cluster.router.heal()
    leader = await cluster.leader()
    assert leader.metrics().current_term > 10
    terms = {i.term for i in await store_log(cluster, leader.id)}
    assert 2 not in terms, "S1 led term 2 despite a voter's higher vote"


async def test_leader_steps_down_on_a_followers_higher_vote(cluster: Cluster) -> None:
    """A leader whose AppendEntries meets a greater vote stops leading (5.1).

    Its writes in flight fail with ``ForwardToLeader`` instead of hanging.
    """
    leader = await cluster.initialized([1, 2, 3])
    term = leader.metrics().current_term
    follower = next(i for i in cluster.nodes if i != leader.id)
    await cluster.stop(follower)
    await cluster.stores[follower].save_vote(Vote(LeaderId(term + 5, follower)))
    cluster.config = QUIET
    await cluster.start(follower)
    await leader.wait_for(
        lambda m: m.current_term >= term + 5 and m.state is not ServerState.LEADER,
        5.0,
        "the leader to adopt the higher vote",
    )
    cluster.config = FAST
    new = await cluster.leader()
    assert new.metrics().current_term > term + 5


class BlockingMachine(ListStateMachine):
    """Applies commands at once, except ``{"n": block}``, which waits for ``release``."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block
        self.release = asyncio.Event()

    async def apply(self, entries: Sequence[Entry]) -> list[Any]:
        for e in entries:
            if isinstance(e.payload, Normal) and msgspec.json.decode(e.payload.data) == {
                "n": self.block
            }:
                await self.release.wait()
        return await super().apply(entries)


class StalledStore(MemoryLogStore):
    """Appends wait for ``release`` (a disk that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = True
        self.release = asyncio.Event()

    async def append(self, entries: Sequence[Entry]) -> None:
        if self.stalled:
            await self.release.wait()
        await super().append(entries)


async def test_linearizable_read_before_the_leaders_first_entry_commits(cluster: Cluster) -> None:
    """A new leader knows the commit index only once an entry of its term commits."""
    ids = [1, 2, 3]
    init = first_entry(ids)
    vote = Vote(LeaderId(1, 1), True)
    cluster.stores[1] = await prepared(MemoryLogStore(), [init], vote, init.log_id)
    stalled = []
    for follower in (2, 3):
        store = StalledStore()
        await store.save_vote(vote)
        store.stalled = False
        await store.append([init])
        store.stalled = True
        cluster.stores[follower] = store
        stalled.append(store)
        await start(cluster, follower, elect=False)
    await start(cluster, 1, elect=True)
    s1 = cluster.nodes[1]
    await s1.wait_for(lambda m: m.state is ServerState.LEADER, 5.0, "S1 to lead")
    try:
        with pytest.raises(QuorumNotEnough, match="first entry did not commit"):
            await s1.ensure_linearizable()
    finally:
        for store in stalled:
            store.stalled = False
            store.release.set()


async def test_linearizable_read_waits_for_the_read_index_to_be_applied(tmp_path: Any) -> None:
    machine = BlockingMachine(block=5)
    c = Cluster(tmp_path, machine=lambda: machine)
    try:
        leader = await c.initialized([1])
        write = asyncio.ensure_future(leader.client_write(cmd(5)))
        await leader.wait_for(
            lambda m: m.committed is not None and m.committed.index >= 2, 5.0, "commit"
        )
        with pytest.raises(QuorumNotEnough, match="read index was not applied"):
            await leader.ensure_linearizable()
        machine.release.set()
        assert (await write).data == 1
        assert await leader.ensure_linearizable() is not None
    finally:
        machine.release.set()
        await c.close()


async def test_membership_change_waits_for_the_previous_one_to_commit(cluster: Cluster) -> None:
    """One membership change at a time: the next waits until the last one is committed.

    Two voters; the leader's own disk stalls, so its entries reach the follower (which
    acknowledges them, keeping the leader in office) but cannot commit without the
    leader's flush. A second change then gives up with ``QuorumNotEnough``.
    """
    ids = [1, 2]
    init = first_entry(ids)
    vote = Vote(LeaderId(1, 1), True)
    for node_id in ids:
        store = StalledStore()
        store.stalled = False
        await prepared(store, [init], vote, init.log_id)
        cluster.stores[node_id] = store
    await start(cluster, 2, elect=False)
    await start(cluster, 1, elect=True)
    leader = await cluster.leader(among=[1])
    stalled = cluster.stores[1]
    assert isinstance(stalled, StalledStore)
    stalled.stalled = True
    try:
        current = leader.membership.membership
        learner = Membership(current.configs, {**current.nodes, 3: Node("mem-3")})
        first = asyncio.ensure_future(leader._propose(MembershipChange(learner)))
        await cluster.nodes[2].wait_for(
            lambda m: 3 in m.membership_config.membership.nodes, 5.0, "the follower holds it"
        )
        with pytest.raises(QuorumNotEnough, match="current membership did not commit"):
            await leader.change_membership([1, 2])
        assert leader.metrics().state is ServerState.LEADER
    finally:
        stalled.stalled = False
        stalled.release.set()
    await first
    await leader.change_membership([1, 2])
