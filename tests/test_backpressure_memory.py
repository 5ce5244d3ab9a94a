"""Back-pressure (uncommitted entries and bytes are bounded); kept entries own their data;
the in-memory log is bounded by bytes."""

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
from raft_http.raft import Config, Overloaded, Raft, SqliteLogStore, heap
from raft_http.testing import ListStateMachine
from raft_http.types import APPEND_ENTRIES_REQUEST, AppendEntriesRequest, Entry, Normal, Success
from test_leader_flush import wait_until
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


async def test_a_follower_far_behind_catches_up_from_the_store_with_memory_bounded(
    tmp_path: Path,
) -> None:
    bound = 16 * 1024
    # 20 entries per AppendEntries: the catch-up takes several reads from the store. Slow
    # elections: one leader throughout, also on a busy machine.
    config = dataclasses.replace(
        FAST,
        election_timeout_min=1.5,
        election_timeout_max=3.0,
        max_in_memory_log_bytes=bound,
        max_payload_entries=20,
    )
    c = Cluster(tmp_path, config)
    for i in (1, 2, 3):  # entries serialized on disk: an evicted one is really gone
        c.stores[i] = await SqliteLogStore.open(tmp_path / f"log-{i}.db")
    try:
        leader = await c.initialized([1, 2, 3])
        lagging = max(n for n in c.nodes if n != leader.id)
        await c.stop(lagging)
        pad = "x" * 1000
        first = (await leader.client_write(json.dumps({"n": 0, "pad": pad}).encode())).log_id
        data = leader.log.entry(first.index).payload.data
        for n in range(1, 200):  # 200 KB, 12 times the bound
            await leader.client_write(json.dumps({"n": n, "pad": pad}).encode())
            # Each write is applied and on the leader's disk when it returns.
            assert leader.log.held_bytes <= bound
        assert leader.log.last_purged is None  # nothing purged: no snapshot will do it
        assert leader.log.first_held > first.index + 150
        gc.collect()
        assert sys.getrefcount(data) == 2, "an evicted entry's data is still referenced"

        held = [leader.log.held_bytes]

        async def sample() -> None:
            while True:
                held.append(leader.log.held_bytes)
                await asyncio.sleep(0.001)

        sampler = asyncio.create_task(sample())
        try:
            await c.start(lagging)
            await c.wait_applied(leader.log.last_index, timeout=30)
        finally:
            sampler.cancel()
        assert max(held) <= bound
        assert leader._leader is not None
        assert leader._leader.replicators[lagging].stored_reads >= 150 // 20
        assert c.machines[lagging].applied == c.machines[leader.id].applied
        assert [m["n"] for m in c.machines[lagging].applied] == list(range(200))
        await c.wait_all(lambda m: True)
        for node in c.nodes.values():
            assert node.log.held_bytes <= bound, node.id
    finally:
        await c.close()


async def test_metrics_show_the_in_memory_log_grow_with_writes_and_shrink_after_eviction(
    tmp_path: Path,
) -> None:
    bound = 4 * 1024
    c, leader = await stalled_leader(tmp_path, max_in_memory_log_bytes=bound)
    try:
        start = leader.metrics()
        assert 0 < start.in_memory_log_bytes <= bound
        data = json.dumps({"pad": "x" * 1000}).encode()
        writes, held = [], [start]
        for k in range(1, 13):  # not committed, so not applied: none of them may leave memory
            writes.append(asyncio.create_task(leader.client_write(data)))
            index = start.last_log_index + k
            await wait_until(lambda i=index: leader.metrics().last_log_index == i, "proposed")
            m = leader.metrics()
            # Every write is held; of what was held before, only applied entries may go.
            assert (
                k * len(data) <= m.in_memory_log_bytes <= k * len(data) + start.in_memory_log_bytes
            )
            assert m.in_memory_log_bytes > held[-1].in_memory_log_bytes
            held.append(m)
        peak = held[-1]
        assert peak.in_memory_log_bytes > 2 * bound
        assert peak.in_memory_log_entries >= 12
        c.router.heal()
        async with asyncio.timeout(10):
            await asyncio.gather(*writes)  # applied, and on the leader's disk: evictable
        after = leader.metrics()
        assert after.in_memory_log_bytes <= bound < peak.in_memory_log_bytes
        assert after.in_memory_log_entries <= bound // len(data) < peak.in_memory_log_entries
        assert after.in_memory_log_bytes == leader.log.held_bytes
        assert after.in_memory_log_entries == leader.log.last_index + 1 - leader.log.first_held
    finally:
        await c.close()


def test_config_refuses_a_negative_in_memory_log_bound() -> None:
    assert Config(max_in_memory_log_bytes=0).max_in_memory_log_bytes == 0
    with pytest.raises(ValueError, match="max_in_memory_log_bytes must be >= 0"):
        Config(max_in_memory_log_bytes=-1)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not heap._MALLOC_TRIM, reason="glibc's malloc_trim only")
def test_release_free_memory_gives_freed_values_back_to_the_os() -> None:
    # 4 KiB values, as a KV node holds them: freed, glibc keeps their pages in its heap,
    # since every tenth value still lives above them.
    values = [bytes([i % 251]) * 4096 for i in range(20_000)]
    kept = values[::10]
    del values
    gc.collect()
    before = rss_kib()
    assert heap.release_free_memory()
    after = rss_kib()
    assert before - after > 30 * 1024, (before, after)  # of the 72 MiB freed
    assert len(kept) == 2000
