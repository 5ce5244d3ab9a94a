"""Back-pressure (uncommitted entries and bytes are bounded); kept entries own their data."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sys
from pathlib import Path

import msgspec
import pytest

from raft_cluster import FAST, Cluster, cmd
from raft_http.raft import Config, Overloaded, Raft
from raft_http.testing import ListStateMachine
from raft_http.types import APPEND_ENTRIES_REQUEST, AppendEntriesRequest, Entry, Normal, Success
from test_raft_review import initial_entry, leader_vote, lid, lone_follower


async def stalled_leader(tmp_path: Path, **bounds: int) -> tuple[Cluster, Raft]:
    """A leader of three whose followers get nothing more: no write can commit.

    Election timeouts of 1.5-3 s keep the followers from electing another leader
    (and the leader from stepping down) during the second or so a test stalls it.
    """
    config = dataclasses.replace(FAST, election_timeout_min=1.5, election_timeout_max=3.0, **bounds)
    c = Cluster(tmp_path, config)
    leader = await c.initialized([1, 2, 3])
    await leader.client_write(cmd(0))
    for target in c.nodes:
        if target != leader.id:
            c.router.block(leader.id, target)
    await asyncio.sleep(0.1)  # appends already in flight finish
    return c, leader


async def test_writes_past_the_entry_bound_fail_at_once_and_pass_again_after_commit(
    tmp_path: Path,
) -> None:
    c, leader = await stalled_leader(tmp_path, max_uncommitted_entries=5)
    try:
        held = [asyncio.create_task(leader.client_write(cmd(i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in held)
        with pytest.raises(Overloaded, match="limit 5") as info:
            await leader.client_write(cmd(99))
        assert info.value.kind == "overloaded"
        c.router.heal()
        assert [(await t).data for t in held] == [2, 3, 4, 5, 6]
        assert (await leader.client_write(cmd(6))).data == 7
        assert {"n": 99} not in c.machines[leader.id].applied  # refused means not proposed
    finally:
        await c.close()


async def test_writes_past_the_byte_bound_fail_but_one_big_write_alone_passes(
    tmp_path: Path,
) -> None:
    c, leader = await stalled_leader(tmp_path, max_uncommitted_bytes=100)
    try:
        big = json.dumps({"pad": "x" * 200}).encode()
        first = asyncio.create_task(leader.client_write(big))  # nothing held: it may pass
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="bytes"):
            await leader.client_write(cmd(1))
        c.router.heal()
        assert (await first).data == 2
        small = [await leader.client_write(cmd(i)) for i in range(3)]  # room again
        assert [r.data for r in small] == [3, 4, 5]
    finally:
        await c.close()


async def test_membership_changes_are_not_refused_by_back_pressure(tmp_path: Path) -> None:
    c, leader = await stalled_leader(tmp_path, max_uncommitted_entries=1)
    try:
        held = asyncio.create_task(leader.client_write(cmd(1)))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await leader.client_write(cmd(2))
        change = asyncio.create_task(leader.change_membership([1, 2, 3], retain=True))
        c.router.heal()
        await held
        await change  # proposed (here: nothing to change) despite the bound
    finally:
        await c.close()


def test_config_refuses_bounds_below_one() -> None:
    with pytest.raises(ValueError, match="max_uncommitted"):
        Config(max_uncommitted_entries=0)
    with pytest.raises(ValueError, match="max_uncommitted"):
        Config(max_uncommitted_bytes=0)
    with pytest.raises(ValueError, match="transfer_leader_timeout"):
        Config(transfer_leader_timeout=0)


async def test_a_follower_keeps_no_reference_to_the_request_body(tmp_path: Path) -> None:
    raft = await lone_follower(tmp_path, ListStateMachine())
    try:
        entries = [initial_entry()] + [
            Entry(lid(1, i), Normal(msgspec.Raw(json.dumps({"pad": "x" * 1000}).encode())))
            for i in range(1, 51)
        ]
        body = APPEND_ENTRIES_REQUEST.encode(
            AppendEntriesRequest(leader_vote(1, 1), None, entries, lid(1, 50))
        )
        baseline = sys.getrefcount(body)
        rpc = APPEND_ENTRIES_REQUEST.decode(body)
        assert sys.getrefcount(body) > baseline  # each decoded Raw is a view into the body
        assert isinstance(await raft.append_entries(rpc), Success)
        await raft.wait_for(lambda m: m.last_applied == lid(1, 50), 2)
        del rpc
        gc.collect()
        assert sys.getrefcount(body) == baseline, "a kept entry still pins the request body"
        assert len(raft.log) == 51
        assert raft.log.entry(50).payload == entries[50].payload
    finally:
        await raft.shutdown()


async def test_a_leader_keeps_no_reference_to_the_client_buffer(cluster: Cluster) -> None:
    leader = await cluster.initialized([1])
    buffer = bytearray(json.dumps({"pad": "y" * 1000}).encode())
    view = memoryview(buffer)
    await leader.client_write(view)  # type: ignore[arg-type]
    gc.collect()
    view.release()  # raises BufferError if anything still exports the buffer
    buffer.extend(b" ")  # likewise: a resize needs no live exports
    assert cluster.machines[1].applied[-1] == {"pad": "y" * 1000}
