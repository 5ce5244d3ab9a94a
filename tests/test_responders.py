"""Every outcome a client write can have, decided by ``raft/responders.py``.

First a table over ``Responders`` alone (no node), then the cases a node reaches
only through a change of leader, replayed deterministically on virtual time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from engine_helpers import lid
from raft_cluster import Cluster, GrantingPeer, cmd
from raft_http.errors import Fatal
from raft_http.raft import (
    ClientWriteResponse,
    ForwardToLeader,
    NotAllowed,
    Raft,
    ServerState,
    WriteAborted,
)
from raft_http.raft.responders import Responder, Responders
from raft_http.types import AppendEntriesRequest, Blank, Entry, LeaderId, LogId, Success, Vote
from sim.virtual_time import on_virtual_time

Step = Callable[[Responders, Responder], None]


def outcome(future: Responder) -> str:
    """What the client was told: ``pending``, ``committed <index>`` or the error's class."""
    if not future.done():
        return "pending"
    error = future.exception()
    if error is None:
        response = future.result()
        assert isinstance(response, ClientWriteResponse)
        return f"committed {response.log_id.index} -> {response.data}"
    return type(error).__name__


CASES: dict[str, tuple[list[Step], str]] = {
    "queued, not decided": ([], "pending"),
    "in the log, not decided": ([lambda r, f: r.in_log(lid(1, 5), f)], "pending"),
    "applied at its own log id": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.applied(lid(1, 5), "ok")],
        "committed 5 -> ok",
    ),
    "another leader's entry applied at its index": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.applied(lid(2, 5, 2), "x")],
        "WriteAborted",
    ),
    "other indexes applied": (
        [
            lambda r, f: r.in_log(lid(1, 5), f),
            lambda r, f: r.applied(lid(1, 4), None),
            lambda r, f: r.applied(lid(2, 6, 2), None),
        ],
        "pending",
    ),
    "leader lost while queued": ([lambda r, f: r.leader_lost()], "ForwardToLeader"),
    "leader lost once in the log": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.leader_lost()],
        "pending",
    ),
    "leader lost, then committed by a later leader": (
        [
            lambda r, f: r.in_log(lid(1, 5), f),
            lambda r, f: r.leader_lost(),
            lambda r, f: r.applied(lid(1, 5), 7),
        ],
        "committed 5 -> 7",
    ),
    "leader lost, then overwritten": (
        [
            lambda r, f: r.in_log(lid(1, 5), f),
            lambda r, f: r.leader_lost(),
            lambda r, f: r.applied(lid(3, 5, 3), 7),
        ],
        "WriteAborted",
    ),
    "snapshot installed over it": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.snapshot_installed(lid(2, 9, 2))],
        "WriteOutcomeUnknown",
    ),
    "snapshot installed below it": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.snapshot_installed(lid(1, 4))],
        "pending",
    ),
    "no index left": ([lambda r, f: r.log_full([f], 10)], "NotAllowed"),
    "stopped while queued": ([lambda r, f: r.stop("node shut down")], "Fatal"),
    "stopped once in the log": (
        [lambda r, f: r.in_log(lid(1, 5), f), lambda r, f: r.stop("node shut down")],
        "Fatal",
    ),
    "decided once only": (
        [
            lambda r, f: r.in_log(lid(1, 5), f),
            lambda r, f: r.applied(lid(1, 5), "ok"),
            lambda r, f: r.stop("node shut down"),
            lambda r, f: r.snapshot_installed(lid(2, 9, 2)),
        ],
        "committed 5 -> ok",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_each_outcome_is_decided_once(name: str) -> None:
    steps, expected = CASES[name]
    responders = Responders(asyncio.get_running_loop())
    future = responders.new()
    for step in steps:
        step(responders, future)
    assert outcome(future) == expected
    if expected != "pending":
        assert len(responders) == 0, "a decided write is forgotten"


async def test_stop_decides_every_write_with_its_reason() -> None:
    responders = Responders(asyncio.get_running_loop())
    futures = [responders.new() for _ in range(4)]
    responders.in_log(lid(1, 1), futures[0])
    responders.in_log(lid(1, 2), futures[1])
    responders.stop("node shut down")
    for future in futures:
        error = future.exception()
        assert isinstance(error, Fatal)
        assert error.reason == "node shut down"
    assert len(responders) == 0


async def test_leader_lost_refuses_only_the_queued_writes() -> None:
    responders = Responders(asyncio.get_running_loop())
    in_log, queued = responders.new(), responders.new()
    responders.in_log(lid(1, 1), in_log)
    responders.leader_lost()
    assert isinstance(queued.exception(), ForwardToLeader)
    assert not in_log.done()
    assert [log_id for log_id, _ in responders.waiting()] == [lid(1, 1)]


# --- through a node ---------------------------------------------------------------------


async def lone_leader(c: Cluster) -> Raft:
    """Node 1 leads {1..5}; the others grant votes but accept no entry: nothing commits."""
    node = await c.start(1)
    for peer in (2, 3, 4, 5):
        c.router.register(peer, GrantingPeer())
    await node.initialize({i: c.node(i) for i in range(1, 6)})
    await node.wait_for(lambda m: m.state is ServerState.LEADER, 5, "leader")
    return node


async def proposed(node: Raft, n: int) -> tuple[asyncio.Task[ClientWriteResponse], Entry]:
    """Propose ``cmd(n)``; its task and its entry, once in the node's log."""
    index = node.metrics().last_log_index + 1
    write = asyncio.create_task(node.client_write(cmd(n)))
    await node.wait_for(lambda m: m.last_log_index >= index, 5, "appended")
    return write, node.log.entry(index)


@on_virtual_time
async def test_an_entry_overwritten_by_a_later_leader_is_not_committed(cluster: Cluster) -> None:
    node = await lone_leader(cluster)
    write, mine = await proposed(node, 7)
    before = node.log.log_id_at(mine.log_id.index - 1)
    # A later leader (node 3) replaces the entry at that index with its own and commits it.
    term = node.metrics().current_term + 1
    theirs = Entry(LogId(LeaderId(term, 3), mine.log_id.index), Blank())
    rpc = AppendEntriesRequest(Vote(LeaderId(term, 3), committed=True), before, [theirs], None)
    assert await node.append_entries(rpc) == Success()
    await asyncio.sleep(0.05)  # less than an election timeout: node 3 still leads
    assert not write.done(), "overwritten on its proposer only: not decided yet"
    rpc = AppendEntriesRequest(rpc.vote, theirs.log_id, [], theirs.log_id)
    assert await node.append_entries(rpc) == Success()
    with pytest.raises(WriteAborted, match="overwrote"):
        await write
    assert cluster.machines[1].applied == []


@on_virtual_time
async def test_an_entry_of_a_lost_leadership_that_commits_anyway_succeeds(
    cluster: Cluster,
) -> None:
    node = await lone_leader(cluster)
    write, mine = await proposed(node, 7)
    # Node 2 wins a later term holding the entry, and commits it with its own blank.
    term = node.metrics().current_term + 1
    vote = Vote(LeaderId(term, 2), committed=True)
    own = Entry(LogId(LeaderId(term, 2), mine.log_id.index + 1), Blank())
    rpc = AppendEntriesRequest(vote, None, [], None)
    assert await node.append_entries(rpc) == Success()  # node 1 now follows node 2
    assert node.metrics().state is ServerState.FOLLOWER
    assert not write.done()
    rpc = AppendEntriesRequest(vote, mine.log_id, [own], own.log_id)
    assert await node.append_entries(rpc) == Success()
    response = await write
    assert response.log_id == mine.log_id
    assert cluster.machines[1].applied == [{"n": 7}]


@on_virtual_time
async def test_writes_queued_when_leadership_is_lost_are_sent_on(cluster: Cluster) -> None:
    node = await lone_leader(cluster)
    async with node._lock:  # the proposer cannot take the writes into the log
        queued = [asyncio.create_task(node.client_write(cmd(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        last = node.metrics().last_log_index
        node._stop_leading("a test said so")  # as a higher vote or a lost quorum does
    for write in queued:
        with pytest.raises(ForwardToLeader):
            await write
    assert node.metrics().last_log_index == last, "none was proposed"


@on_virtual_time
async def test_shutdown_decides_every_write_with_the_shutdown_error(cluster: Cluster) -> None:
    node = await lone_leader(cluster)
    in_log, _ = await proposed(node, 1)
    await cluster.stop(1)
    with pytest.raises(Fatal, match="shut down"):
        await in_log


async def test_no_index_left_refuses_the_write() -> None:
    responders = Responders(asyncio.get_running_loop())
    future = responders.new()
    responders.log_full([future], 2**63 - 1)
    with pytest.raises(NotAllowed, match="the log is full"):
        await future
