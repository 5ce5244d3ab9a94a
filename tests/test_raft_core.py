"""The Raft core over the in-memory network: the paper's claims, each as a test."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from raft_cluster import (
    FAST,
    Cluster,
    GrantingPeer,
    cmd,
    restart_on_sqlite,
    snapshotting,
    sqlite_cluster,
)
from raft_http.errors import Fatal
from raft_http.raft import (
    Config,
    ForwardToLeader,
    MemoryLogStore,
    NotAllowed,
    QuorumNotEnough,
    ServerState,
    StorageError,
    WriteAborted,
)
from raft_http.types import (
    AppendEntriesRequest,
    Blank,
    Entry,
    LeaderId,
    LogId,
    Success,
    Vote,
)
from sim.virtual_time import on_virtual_time


async def log_ids(c: Cluster, node_id: int) -> list[tuple[int, int]]:
    store = c.stores[node_id]
    state = await store.get_log_state()
    start = -1 if state.last_purged_log_id is None else state.last_purged_log_id.index
    entries = await store.read_entries(start + 1, 1 << 62)
    return [(e.log_id.term, e.log_id.index) for e in entries]


@on_virtual_time
async def test_single_node_elects_itself_and_applies_writes(cluster: Cluster) -> None:
    leader = await cluster.initialized([1])
    first = await leader.client_write(cmd(1))
    second = await leader.client_write(cmd(2))
    assert (first.data, second.data) == (1, 2)
    assert second.log_id.index == first.log_id.index + 1
    assert cluster.machines[1].applied == [{"n": 1}, {"n": 2}]


@on_virtual_time
async def test_three_nodes_elect_one_leader_and_replicate(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    results = await asyncio.gather(*(leader.client_write(cmd(i)) for i in range(50)))
    assert sorted(r.data for r in results) == list(range(1, 51))
    last = max(r.log_id.index for r in results)
    await cluster.wait_applied(last)
    expected = cluster.machines[leader.id].applied
    for node_id in (1, 2, 3):
        assert cluster.machines[node_id].applied == expected
    leaders = [n for n in cluster.nodes.values() if n.metrics().state is ServerState.LEADER]
    assert leaders == [leader]
    for node_id in (1, 2, 3):
        assert cluster.nodes[node_id].metrics().current_leader == leader.id


@on_virtual_time
async def test_concurrent_writes_are_batched_into_few_appends(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(i for i in cluster.nodes if i != leader.id)
    before = cluster.router.sent[(leader.id, follower, "append")]
    await asyncio.gather(*(leader.client_write(cmd(i)) for i in range(200)))
    appends = cluster.router.sent[(leader.id, follower, "append")] - before
    assert appends < 100, f"200 writes took {appends} appends to one follower"


@on_virtual_time
async def test_follower_refuses_writes_and_names_the_leader(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(n for i, n in cluster.nodes.items() if i != leader.id)
    await follower.wait_for(lambda m: m.current_leader == leader.id, 2)
    with pytest.raises(ForwardToLeader) as info:
        await follower.client_write(cmd(1))
    assert info.value.leader_id == leader.id
    assert info.value.leader_node == cluster.node(leader.id)
    with pytest.raises(ForwardToLeader):
        await follower.ensure_linearizable()


@on_virtual_time
async def test_write_must_be_json(cluster: Cluster) -> None:
    leader = await cluster.initialized([1])
    with pytest.raises(ValueError, match="JSON"):
        await leader.client_write(b"{not json")
    assert cluster.machines[1].applied == []


@on_virtual_time
async def test_initialize_twice_is_refused(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    with pytest.raises(NotAllowed):
        await leader.initialize({1: cluster.node(1)})


@on_virtual_time
async def test_failover_keeps_every_acknowledged_write(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    acked = [await leader.client_write(cmd(i)) for i in range(20)]
    old_term = leader.metrics().current_term
    await cluster.stop(leader.id)
    new_leader = await cluster.leader()
    assert new_leader.metrics().current_term > old_term
    more = await new_leader.client_write(cmd(100))
    await new_leader.wait_for(lambda m: m.last_applied == more.log_id, 2)
    applied = cluster.machines[new_leader.id].applied
    assert applied[:20] == [{"n": i} for i in range(20)]
    assert applied[-1] == {"n": 100}
    assert len(acked) == 20


@on_virtual_time
async def test_at_most_one_leader_per_term_under_churn(cluster: Cluster) -> None:
    await cluster.initialized([1, 2, 3, 4, 5])
    seen: dict[int, set[int]] = {}
    rng = random.Random(7)
    stop = asyncio.Event()

    async def observe() -> None:
        while not stop.is_set():
            for node_id, node in cluster.nodes.items():
                m = node.metrics()
                if m.state is ServerState.LEADER:
                    seen.setdefault(m.current_term, set()).add(node_id)
            await asyncio.sleep(0.002)

    observer = asyncio.create_task(observe())
    try:
        for _ in range(12):
            victims = rng.sample(sorted(cluster.nodes), 2)
            cluster.router.partition(set(victims), set(cluster.nodes) - set(victims))
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            cluster.router.heal()
            await asyncio.sleep(rng.uniform(0.05, 0.2))
    finally:
        stop.set()
        await observer
    assert seen, "no leader was ever observed"
    assert all(len(leaders) == 1 for leaders in seen.values()), seen
    await cluster.leader()


async def test_minority_leader_cannot_commit_and_its_entries_are_replaced(
    cluster: Cluster,
) -> None:
    old = await cluster.initialized([1, 2, 3])
    committed = await old.client_write(cmd(1))
    others = [i for i in cluster.nodes if i != old.id]
    cluster.router.partition({old.id}, set(others))
    doomed = asyncio.create_task(old.client_write(cmd(666)))
    new = await cluster.leader(among=others)
    winner = await new.client_write(cmd(2))
    assert not doomed.done()
    cluster.router.heal()
    await cluster.wait_applied(winner.log_id.index)
    with pytest.raises(WriteAborted, match="overwrote"):
        await asyncio.wait_for(doomed, 5)
    logs = [await log_ids(cluster, i) for i in (1, 2, 3)]
    shortest = min(len(x) for x in logs)
    assert logs[0][:shortest] == logs[1][:shortest] == logs[2][:shortest]
    for node_id in (1, 2, 3):
        applied = cluster.machines[node_id].applied
        assert {"n": 666} not in applied
        assert applied[:2] == [{"n": 1}, {"n": 2}]
    assert committed.log_id.index < winner.log_id.index


@on_virtual_time
async def test_rejoining_node_does_not_depose_a_healthy_leader(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    term = leader.metrics().current_term
    loner = next(i for i in cluster.nodes if i != leader.id)
    cluster.router.isolate(loner)
    await asyncio.sleep(FAST.election_timeout_max * 5)  # it would have run several elections
    cluster.router.isolate(loner, on=False)
    write = await leader.client_write(cmd(1))
    await cluster.wait_applied(write.log_id.index)
    assert leader.metrics().state is ServerState.LEADER
    assert leader.metrics().current_term == term
    assert cluster.nodes[loner].metrics().current_term == term


async def test_linearizable_read_needs_a_quorum(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    write = await leader.client_write(cmd(1))
    read_index = await leader.ensure_linearizable()
    assert read_index is not None
    assert read_index.index >= write.log_id.index
    cluster.router.isolate(leader.id)
    with pytest.raises((QuorumNotEnough, ForwardToLeader)):
        await leader.ensure_linearizable()


async def test_lagging_follower_catches_up_by_snapshot(tmp_path: Path) -> None:
    c = Cluster(tmp_path, snapshotting(every=20, keep=5))
    try:
        leader = await c.initialized([1, 2, 3])
        lagging = next(i for i in c.nodes if i != leader.id)
        c.router.isolate(lagging)
        for i in range(80):
            await leader.client_write(cmd(i))
        await leader.wait_for(lambda m: m.purged is not None and m.purged.index > 20, 5)
        c.router.isolate(lagging, on=False)
        last = leader.metrics().last_applied
        assert last is not None
        await c.nodes[lagging].wait_for(lambda m: m.last_applied == last, 5, "catch up")
        assert c.router.sent[(leader.id, lagging, "snapshot")] >= 1
        assert c.machines[lagging].applied == c.machines[leader.id].applied
        assert c.nodes[lagging].metrics().snapshot is not None
        # A restart rebuilds the state from the snapshot plus the log tail.
        await c.restart(lagging)
        await c.nodes[lagging].wait_for(lambda m: m.last_applied == last, 5, "reload")
        assert c.machines[lagging].applied == c.machines[leader.id].applied
    finally:
        await c.close()


@on_virtual_time
async def test_payload_too_large_shrinks_batches(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(i for i in cluster.nodes if i != leader.id)
    cluster.router.set_max_entries(follower, 3)
    results = await asyncio.gather(*(leader.client_write(cmd(i)) for i in range(40)))
    last = max(r.log_id.index for r in results)
    await cluster.nodes[follower].wait_for(
        lambda m: m.last_applied is not None and m.last_applied.index >= last, 5
    )
    assert cluster.machines[follower].applied == cluster.machines[leader.id].applied
    replicator = leader._leader.replicators[follower]  # type: ignore[union-attr]
    assert replicator.entries_limit <= 3, "the core did not shrink its batches"


@on_virtual_time
async def test_restart_keeps_vote_log_and_state(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    writes = [await leader.client_write(cmd(i)) for i in range(10)]
    await cluster.wait_applied(writes[-1].log_id.index)
    votes = {i: n.metrics().vote for i, n in cluster.nodes.items()}
    for node_id in (1, 2, 3):
        await cluster.stop(node_id)
    for node_id in (1, 2, 3):
        node = await cluster.start(node_id)
        assert node.metrics().vote >= votes[node_id]
    new_leader = await cluster.leader()
    write = await new_leader.client_write(cmd(10))
    await cluster.wait_applied(write.log_id.index)
    for node_id in (1, 2, 3):
        assert cluster.machines[node_id].applied == [{"n": i} for i in range(11)]


async def test_restart_from_sqlite(tmp_path: Path) -> None:
    async with sqlite_cluster(tmp_path) as c:
        leader = await c.leader()
        writes = [await leader.client_write(cmd(i)) for i in range(5)]
        await c.wait_applied(writes[-1].log_id.index)
        leader = await restart_on_sqlite(c, tmp_path)
        await leader.ensure_linearizable()
        assert c.machines[leader.id].applied == [{"n": i} for i in range(5)]


async def test_add_learner_then_change_membership_and_remove_the_leader(
    cluster: Cluster,
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    for i in range(5):
        await leader.client_write(cmd(i))
    await cluster.start(4)
    await leader.add_learner(4, cluster.node(4))
    m4 = cluster.nodes[4].metrics()
    assert m4.state is ServerState.LEARNER
    assert cluster.machines[4].applied == cluster.machines[leader.id].applied
    with pytest.raises(NotAllowed):
        await leader.change_membership([1, 2, 9])
    await leader.change_membership([1, 2, 3, 4])
    assert leader.metrics().membership_config.membership.configs == [[1, 2, 3, 4]]
    await cluster.wait_all(lambda m: m.state is not ServerState.LEARNER, 5, "4 is a voter")
    remaining = [i for i in (1, 2, 3, 4) if i != leader.id]
    await leader.change_membership(remaining)
    await leader.wait_for(lambda m: m.state is not ServerState.LEADER, 5, "old leader steps down")
    new = await cluster.leader(among=remaining)
    write = await new.client_write(cmd(99))
    for node_id in remaining:
        await cluster.nodes[node_id].wait_for(lambda m: m.last_applied == write.log_id, 5)
    assert new.metrics().membership_config.membership.configs == [sorted(remaining)]
    assert leader.id not in new.metrics().membership_config.membership.nodes


class FailingStore(MemoryLogStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail_appends = False

    async def append(self, entries: object) -> None:  # type: ignore[override]
        if self.fail_appends:
            raise StorageError("disk on fire")
        await super().append(entries)  # type: ignore[arg-type]


async def test_storage_failure_stops_the_node(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        store = FailingStore()
        await c.start(1, store)
        await c.nodes[1].initialize({1: c.node(1)})
        leader = await c.leader()
        await leader.client_write(cmd(1))
        store.fail_appends = True
        with pytest.raises(Fatal):
            await leader.client_write(cmd(2))
        m = leader.metrics()
        assert m.state is ServerState.SHUTDOWN
        assert m.fatal
        assert "disk on fire" in m.fatal
        with pytest.raises(Fatal):
            await leader.client_write(cmd(3))
        assert c.machines[1].applied == [{"n": 1}]
    finally:
        await c.close()


class OrderRecordingStore(MemoryLogStore):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    async def save_vote(self, vote: Vote) -> None:
        await asyncio.sleep(0.01)
        await super().save_vote(vote)
        self.events.append(f"saved {vote.leader_id.term}:{vote.leader_id.node_id}")


async def test_vote_is_durable_before_it_is_granted(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    events: list[str] = []
    try:
        await c.start(1)
        await c.start(2, OrderRecordingStore(events))
        from raft_http.types import LeaderId, VoteRequest

        response = await c.nodes[2].vote(VoteRequest(Vote(LeaderId(5, 1)), None))
        assert response.vote_granted
        assert events == ["saved 5:1"]
        again = await c.nodes[2].vote(VoteRequest(Vote(LeaderId(5, 3)), None))
        assert not again.vote_granted, "granted two candidates in one term"
    finally:
        await c.close()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="election_timeout"):
        Config(election_timeout_min=0.3, election_timeout_max=0.2)
    with pytest.raises(ValueError, match="heartbeat"):
        Config(heartbeat_interval=0.2)
    with pytest.raises(ValueError, match="max_payload_entries"):
        Config(max_payload_entries=0)


class SlowAppendStore(MemoryLogStore):
    async def append(self, entries: object) -> None:  # type: ignore[override]
        await asyncio.sleep(0.05)
        await super().append(entries)  # type: ignore[arg-type]


async def test_cancelled_append_entries_leaves_memory_and_storage_agreeing(
    tmp_path: Path,
) -> None:
    """A server may cancel a handler whose client went away; the log must stay whole."""
    from raft_http.types import AppendEntriesRequest, Entry, LeaderId, LogId, Normal, Success
    from raft_http.types import Vote as V

    c = Cluster(tmp_path)
    try:
        store = SlowAppendStore()
        follower = await c.start(2, store)
        leader_vote = V(LeaderId(1, 1), committed=True)

        def entry(i: int) -> Entry:
            import msgspec

            return Entry(LogId(LeaderId(1, 1), i), Normal(msgspec.Raw(cmd(i))))

        first = AppendEntriesRequest(leader_vote, None, [entry(0), entry(1)], None)
        call = asyncio.create_task(follower.append_entries(first))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The next request continues after the cancelled one, as a leader's retry would.
        second = AppendEntriesRequest(
            leader_vote, LogId(LeaderId(1, 1), 1), [entry(2)], LogId(LeaderId(1, 1), 2)
        )
        assert await follower.append_entries(second) == Success()
        assert await log_ids(c, 2) == [(1, 0), (1, 1), (1, 2)]
        assert follower.metrics().last_log_index == 2
        await follower.wait_for(lambda m: m.last_applied is not None, 2, "apply")
        assert c.machines[2].applied == [{"n": 0}, {"n": 1}, {"n": 2}]
    finally:
        await c.close()


@on_virtual_time
async def test_leader_cut_off_from_its_quorum_steps_down(cluster: Cluster) -> None:
    """Check-quorum: a minority leader stops taking writes instead of queueing them forever."""
    leader = await cluster.initialized([1, 2, 3])
    assert leader.metrics().since_quorum_ack is not None
    others = [i for i in cluster.nodes if i != leader.id]
    cluster.router.partition({leader.id}, set(others))
    await leader.wait_for(
        lambda m: m.state is not ServerState.LEADER, FAST.election_timeout_max * 10, "step down"
    )
    assert leader.metrics().since_quorum_ack is None
    with pytest.raises(ForwardToLeader):
        await leader.client_write(cmd(1))
    new = await cluster.leader(among=others)
    cluster.router.heal()
    write = await new.client_write(cmd(2))
    await cluster.wait_applied(write.log_id.index)
    assert cluster.machines[leader.id].applied == [{"n": 2}]


@on_virtual_time
async def test_a_crashing_replication_task_stops_the_node(cluster: Cluster) -> None:
    """A bug in a background task must stop the node, not leave a leader that never replicates."""
    leader = await cluster.initialized([1, 2, 3])
    follower = next(i for i in cluster.nodes if i != leader.id)
    cluster.router.fail_next(leader.id, follower, lambda: RuntimeError("boom"))
    m = await leader.wait_for(lambda m: m.state is ServerState.SHUTDOWN, 5, "the node to stop")
    assert m.fatal is not None
    assert "RuntimeError: boom" in m.fatal
    with pytest.raises(Fatal):
        await leader.client_write(cmd(1))


async def test_replication_trouble_is_logged_once_per_kind(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    follower = next(i for i in cluster.nodes if i != leader.id)
    with caplog.at_level("INFO", logger="raft_http.raft.replication"):
        cluster.router.isolate(follower)
        await asyncio.sleep(FAST.heartbeat_interval * 10)
        cluster.router.isolate(follower, on=False)
        write = await leader.client_write(cmd(1))
        await leader.wait_for(
            lambda m: m.replication is not None and m.replication[follower] == write.log_id, 5
        )
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Unreachable" in warnings[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_leader_rebuilds_a_rotten_snapshot_and_the_follower_still_catches_up(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, snapshotting(every=20, keep=0))
    try:
        leader = await c.initialized([1, 2, 3])
        lagging = next(i for i in c.nodes if i != leader.id)
        c.router.isolate(lagging)
        for i in range(30):
            await leader.client_write(cmd(i))
        await leader.wait_for(lambda m: m.purged is not None and m.purged == m.snapshot, 5)
        (data_file,) = (tmp_path / f"snapshots-{leader.id}").glob("*.snap")
        with open(data_file, "r+b") as f:  # bit rot: one byte flipped, same size
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0x01]))
        c.router.isolate(lagging, on=False)
        last = leader.metrics().last_applied
        await c.nodes[lagging].wait_for(lambda m: m.last_applied == last, 10, "catch up")
        assert c.machines[lagging].applied == c.machines[leader.id].applied
        assert c.router.sent[(leader.id, lagging, "snapshot")] >= 2  # refused, then rebuilt
    finally:
        await c.close()


async def test_shutdown_lets_a_snapshot_being_written_finish(tmp_path: Path) -> None:
    """When shutdown returns, no snapshot file is half-written: the owner may close storage."""
    import time

    from raft_http.testing import ListStateMachine

    class SlowWriter(ListStateMachine):
        def begin_snapshot(self) -> Any:
            write = super().begin_snapshot()

            def slow(out: Any) -> None:
                time.sleep(0.3)  # in the worker thread
                write(out)

            return slow

    c = Cluster(tmp_path, machine=SlowWriter)
    try:
        leader = await c.initialized([1])
        await leader.client_write(cmd(1))
        await leader.trigger_snapshot()
        await c.stop(1)  # shutdown while the writer sleeps
        directory = tmp_path / "snapshots-1"
        assert not [p for p in directory.iterdir() if p.name.startswith(".tmp")]
        from raft_http.raft import SnapshotStore

        latest = await SnapshotStore(directory).latest()
        assert latest is not None
        assert latest.last_log_id == leader.metrics().last_applied
    finally:
        await c.close()


async def test_entry_overwritten_on_its_proposer_can_still_commit_and_succeed(
    tmp_path: Path,
) -> None:
    """Five nodes: leader 1 sends entry E to node 2 only; leader 3 overwrites E on node 1;
    node 2 then leads and commits E. Node 1's client must get success, not WriteAborted."""
    c = Cluster(tmp_path)
    try:
        node = await c.start(1)
        for peer in (2, 3, 4, 5):
            c.router.register(peer, GrantingPeer())
        await node.initialize({i: c.node(i) for i in range(1, 6)})
        await node.wait_for(lambda m: m.state is ServerState.LEADER, 5, "leader")
        term = node.metrics().current_term
        proposal = asyncio.create_task(node.client_write(cmd(7)))
        await node.wait_for(lambda m: m.last_log_index == 2, 5, "E appended")
        async with asyncio.timeout(5):  # the leader's own write follows its in-memory log
            while len(await c.stores[1].read_entries(0, 3)) < 3:
                await asyncio.sleep(0.005)
        initial, blank, mine = (await c.stores[1].read_entries(0, 3))[:3]
        assert mine.log_id.index == 2

        # Leader 3 (a later term) overwrites index 1.. on node 1 with its own entry.
        vote3 = Vote(LeaderId(term + 1, 3), committed=True)
        other = Entry(LogId(LeaderId(term + 1, 3), 1), Blank())
        answer = await node.append_entries(
            AppendEntriesRequest(vote3, initial.log_id, [other], initial.log_id)
        )
        assert answer == Success()
        assert not proposal.done(), "the outcome is not decided yet"

        # Leader 2 (later still) held E all along and commits it.
        vote2 = Vote(LeaderId(term + 2, 2), committed=True)
        own = Entry(LogId(LeaderId(term + 2, 2), 3), Blank())
        answer = await node.append_entries(
            AppendEntriesRequest(vote2, initial.log_id, [blank, mine, own], own.log_id)
        )
        assert answer == Success()
        result = await asyncio.wait_for(proposal, 5)
        assert result.log_id == mine.log_id
        assert c.machines[1].applied == [{"n": 7}]
    finally:
        await c.close()
