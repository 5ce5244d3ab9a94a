"""Scripted runs on the simulator: exact interleavings, staged with partitions and crashes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from raft_http.errors import RaftHttpError
from raft_http.raft import Config, Raft
from raft_http.types import log_id_key, log_index

from .cluster import Simulation

FIGURE_8_CONFIG = Config(
    heartbeat_interval=0.05,
    election_timeout_min=0.15,
    election_timeout_max=0.3,
    max_payload_entries=1,  # an old entry travels alone, ahead of the new leader's blank
    snapshot_logs_since_last=10_000,
)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} virtual seconds waiting for {what}")
        await asyncio.sleep(0.001)


def _leader_in(sim: Simulation, ids: set[int]) -> Raft | None:
    leaders = [r for n, r in sorted(sim.nodes.items()) if n in ids and r._leader is not None]
    return leaders[0] if leaders else None


async def figure_8(sim: Simulation) -> None:
    """The Raft paper's Figure 8, on five voters.

    (a) Leader A's entry e at index i reaches one follower F only.
    (b) A crashes; B, elected by the other three, appends its own entry at i, alone.
    (c) A restarts; A or F leads in a later term and copies e to a third node: e is
        now on a majority. The leader crashes the moment it commits index i.
    (d) B restarts and, with the votes of the nodes whose log does not pass its own,
        wins. If (c) committed e by counting replicas, B now overwrites a committed
        entry; a correct leader commits i only with an entry of its own term, which
        B's voters would then hold, so B cannot win.
    """
    ids = set(sim.options.node_ids)
    await until(lambda: sim._leader() is not None, "a first leader")
    a = sim._leader()
    assert a is not None
    await a.client_write(b'{"op": "set", "key": "k", "value": "first"}')
    await until(
        lambda: all(log_index(r.committed) == log_index(a.committed) for r in sim.nodes.values()),
        "every node to commit the first write",
    )
    # (a)
    f = min(ids - {a.id})
    sim.router.partition({a.id, f}, ids - {a.id, f})
    i = a.log.last_index + 1
    write = asyncio.ensure_future(a.client_write(b'{"op": "set", "key": "k", "value": "e"}'))
    write.add_done_callback(lambda t: t.cancelled() or t.exception())
    await until(lambda: sim.nodes[f].log.last_index >= i, "F to hold e")
    # (b)
    sim.crash(a.id)
    others = ids - {a.id, f}
    sim.router.partition({f}, others)

    def isolate_a_new_leader() -> None:
        leader = _leader_in(sim, others)
        if leader is not None:
            sim.router.isolate(leader.id)

    sim.on_step.append(isolate_a_new_leader)
    await until(lambda: _leader_in(sim, others) is not None, "B to be elected")
    b = _leader_in(sim, others)
    assert b is not None
    # On B's disk, not only in its memory: B is about to crash.
    await until(lambda: log_index(sim.disks[b.id].log._state.last_log_id) >= i, "B's entry at i")
    sim.on_step.remove(isolate_a_new_leader)
    b_last = b.log.last_log_id
    sim.crash(b.id)
    # (c)
    sim.router.heal()
    sim.router.isolate(b.id)
    await sim.start(a.id)
    crashed: list[int] = []

    def crash_on_commit() -> None:
        leader = _leader_in(sim, ids - {b.id})
        if leader is not None and log_index(leader.committed) >= i and not crashed:
            crashed.append(leader.id)
            sim.crash(leader.id)

    sim.on_step.append(crash_on_commit)
    await until(lambda: bool(crashed), "a leader to commit index i")
    sim.on_step.remove(crash_on_commit)
    # (d)
    sim.router.heal()
    await sim.start(b.id)
    sim.router.isolate(crashed[0])
    for n, raft in sim.nodes.items():
        if n != b.id and log_id_key(raft.log.last_log_id) > log_id_key(b_last):
            sim.router.isolate(n)
    await asyncio.sleep(3.0)
    sim.router.heal()


async def removed_before_the_change_commits(sim: Simulation) -> None:
    """Voters removed by a change that is not committed yet, holding its last entry.

    Leader L of voters {L, R, S} with learners 4 and 5 changes the voters to {S, 4, 5}.
    Once the joint config commits, L is cut off from S, 4 and 5: the final config
    reaches only R. L steps down. Then the network heals: L and R hold the final config,
    which leaves them out, so they do not campaign; S, 4 and 5 still hold the joint
    config, whose old half needs L's or R's vote, which neither grants to a log shorter
    than its own. Raft thesis §4.2.2: a server not in its latest configuration still
    starts elections until that configuration is committed.
    """
    await until(lambda: sim._leader() is not None, "a first leader")
    leader = sim._leader()
    assert leader is not None
    for n in (4, 5):
        await leader.add_learner(n, sim.addr(n), blocking=True, timeout=5.0)
    staying = max(n for n in (1, 2, 3) if n != leader.id)
    removed = {1, 2, 3} - {staying}
    new_voters = {staying, 4, 5}
    joint_index: list[int] = []

    def cut_off_once_joint_commits() -> None:
        stored = leader.membership
        if not joint_index and stored.membership.is_joint():
            joint_index.append(log_index(stored.log_id))
        if joint_index and log_index(leader.committed) >= joint_index[0]:
            sim.router.partition(removed, new_voters)
            sim.on_step.remove(cut_off_once_joint_commits)

    sim.on_step.append(cut_off_once_joint_commits)
    change = asyncio.ensure_future(leader.change_membership(new_voters))
    other = sim.nodes[min(removed - {leader.id})]
    await until(
        lambda: other.membership.membership.configs == [sorted(new_voters)],
        "the final config to reach the other removed voter",
    )
    with contextlib.suppress(RaftHttpError, TimeoutError):
        async with asyncio.timeout(5.0):
            await change
    sim.router.heal()
