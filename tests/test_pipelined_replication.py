"""Pipelined replication in the core: a window of AppendEntries per follower, learnt in order.

The in-memory network's default stream is serial (one request at a time); here a delay
line gives it an ordered, pipelined stream, as the HTTP WebSocket is, so the leader keeps
several requests in flight. Whatever the window does, no entry is lost or duplicated.
The in-memory tests run on virtual time: a busy machine cannot stretch their timers.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestServer

from raft_cluster import FAST, Cluster, cmd
from raft_http.client import HttpNetworkFactory
from raft_http.errors import NetworkError, RaftHttpError
from raft_http.network import AppendStream, RPCOption, reset_error
from raft_http.raft import ClientWriteResponse, MemoryLogStore, Raft, ServerState, SnapshotStore
from raft_http.raft.engine.progress import Progress, ProgressState
from raft_http.server import raft_app
from raft_http.testing import ListStateMachine, MemoryNetwork
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Node,
    Snapshot,
    SnapshotResponse,
    Vote,
    VoteRequest,
    VoteResponse,
)
from sim.virtual_time import on_virtual_time
from wire_helpers import log_id

LATENCY = 0.01


class DelayLine(AppendStream):
    """An ordered, pipelined stream: each request reaches the target ``LATENCY`` after its send.

    Requests are delivered one by one in send order (as the HTTP stream's server does);
    a failure fails what is behind it, per the contract.
    """

    in_flight: ClassVar[Counter[tuple[int, int]]] = Counter()
    most: ClassVar[Counter[tuple[int, int]]] = Counter()

    def __init__(self, network: MemoryNetwork, option: RPCOption) -> None:
        self.network = network
        self.option = option
        self.key = (network.source, network.target)
        self.queue: deque[tuple[float, AppendEntriesRequest, asyncio.Future[AppendEntriesResponse]]]
        self.queue = deque()
        self.ready = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None

    @property
    def pipelined(self) -> bool:
        return True

    def send(self, rpc: AppendEntriesRequest) -> asyncio.Future[AppendEntriesResponse]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AppendEntriesResponse] = loop.create_future()
        self.queue.append((loop.time() + LATENCY, rpc, future))
        self.in_flight[self.key] += 1
        self.most[self.key] = max(self.most[self.key], self.in_flight[self.key])
        future.add_done_callback(lambda _: self.in_flight.subtract([self.key]))
        self.ready.set()
        if self.worker is None:
            self.worker = asyncio.create_task(self._work())
        return future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.queue:
                due, rpc, future = self.queue[0]
                await asyncio.sleep(max(0.0, due - loop.time()))
                try:
                    answer = await self.network.append_entries(rpc, self.option)
                except Exception as e:  # the contract's kinds, or a bug: fail what is behind
                    failed = list(self.queue)
                    self.queue.clear()
                    for i, (_, _, f) in enumerate(failed):
                        if not f.done():
                            f.set_exception(e if i == 0 else reset_error(e))
                    continue
                self.queue.popleft()
                if not future.done():
                    future.set_result(answer)

    async def aclose(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while self.queue:
            self.queue.popleft()[2].cancel()


@pytest.fixture
def delay_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory network's stream becomes a ``DelayLine`` for this test."""

    def stream_append(self: MemoryNetwork, option: RPCOption) -> AppendStream:
        return DelayLine(self, option)

    monkeypatch.setattr(MemoryNetwork, "stream_append", stream_append)
    DelayLine.in_flight.clear()
    DelayLine.most.clear()


async def trickle(leader: Raft, ns: range) -> list[ClientWriteResponse]:
    """Writes a few at a time, 2 ms apart: each few is a batch sent while earlier ones fly."""
    writes = []
    for n in ns:
        writes.append(asyncio.create_task(leader.client_write(cmd(n))))
        if n % 5 == 4:
            await asyncio.sleep(0.002)
    return await asyncio.gather(*writes)


def assert_same_logs(cluster: Cluster, writes: int) -> None:
    """Every node applied each of the ``writes`` commands exactly once, in the same order."""
    applied = {i: list(m.applied) for i, m in cluster.machines.items()}
    first = next(iter(applied.values()))
    for node_id, entries in applied.items():
        assert entries == first, f"node {node_id} applied another sequence"
    counts = Counter(repr(e) for e in first)
    assert all(n == 1 for n in counts.values()), "an entry was applied twice"
    assert len(first) == writes


@on_virtual_time
async def test_leader_keeps_several_appends_in_flight_and_loses_nothing(
    cluster: Cluster, delay_line: None
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    n = 400
    results = await trickle(leader, range(n))
    indexes = [r.log_id.index for r in results]
    assert len(set(indexes)) == n
    await cluster.wait_applied(max(indexes))
    assert_same_logs(cluster, n)
    followers = [i for i in cluster.nodes if i != leader.id]
    most = {t: DelayLine.most[(leader.id, t)] for t in followers}
    assert all(m > 1 for m in most.values()), f"one request at a time only: {most}"
    assert all(m <= FAST.max_inflight_appends for m in most.values()), most
    for t in followers:
        replicator = leader._leader.replicators[t]  # type: ignore[union-attr]
        assert 1 < replicator.most_in_flight <= FAST.max_inflight_appends


@on_virtual_time
async def test_window_survives_a_partitioned_and_returning_follower(
    cluster: Cluster, delay_line: None
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    lagging = next(i for i in cluster.nodes if i != leader.id)
    acked = [await leader.client_write(cmd(i)) for i in range(20)]
    cluster.router.isolate(lagging)
    acked += await asyncio.gather(*(leader.client_write(cmd(20 + i)) for i in range(200)))
    other = next(i for i in cluster.nodes if i not in (leader.id, lagging))
    cluster.router.fail_next(leader.id, other, lambda: NetworkError("dropped", target=other), 2)
    acked += await asyncio.gather(*(leader.client_write(cmd(220 + i)) for i in range(100)))
    cluster.router.isolate(lagging, False)
    acked += await asyncio.gather(*(leader.client_write(cmd(320 + i)) for i in range(80)))
    await cluster.wait_applied(max(r.log_id.index for r in acked), timeout=10)
    assert_same_logs(cluster, 400)


@on_virtual_time
async def test_a_batch_proposed_a_loop_turn_later_joins_the_request_being_built(
    cluster: Cluster, delay_line: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Woken to send, the replicator lets the proposer's next batch join its request.

    A follower pays per request more than per entry, so two batches proposed one loop
    turn apart, with a request already in flight, travel to each follower as one.
    """
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(-1))  # every follower replicating, not probing
    sent: list[tuple[int | None, list[int]]] = []
    original = DelayLine.send

    def recording(
        self: DelayLine, rpc: AppendEntriesRequest
    ) -> asyncio.Future[AppendEntriesResponse]:
        if rpc.entries:
            sent.append((self.network.target, [e.log_id.index for e in rpc.entries]))
        return original(self, rpc)

    monkeypatch.setattr(DelayLine, "send", recording)
    batches: list[int] = []
    append_as_leader = leader._append_as_leader

    def counted(batch: list[Any]) -> None:
        batches.append(len(batch))
        append_as_leader(batch)

    monkeypatch.setattr(leader, "_append_as_leader", counted)
    first = asyncio.create_task(leader.client_write(cmd(0)))
    await asyncio.sleep(0.001)  # its request is in flight (the line takes LATENCY)
    second = asyncio.create_task(leader.client_write(cmd(1)))
    await asyncio.sleep(0)
    third = asyncio.create_task(leader.client_write(cmd(2)))
    done = await asyncio.gather(first, second, third)
    a, b, c = (r.log_id.index for r in done)
    assert batches == [1, 1, 1], f"proposer batches {batches}: the test proves nothing"
    followers = sorted(i for i in cluster.nodes if i != leader.id)
    for target in followers:
        requests = [indexes for t, indexes in sent if t == target]
        assert requests[0] == [a], requests
        assert [b, c] in requests, f"to node {target}: {requests}"


@on_virtual_time
async def test_a_replicator_cancelled_in_its_wait_leaves_no_waiter_behind(
    cluster: Cluster, delay_line: None
) -> None:
    """Shutdown cancels replicators waiting on an answer and a wake-up: each wait's future
    is unhooked from the wake flag, and a later ``set`` finds nothing to complete."""
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(-1))
    assert leader._leader is not None
    replicators = list(leader._leader.replicators.values())
    write = asyncio.create_task(leader.client_write(cmd(0)))
    await asyncio.sleep(0.001)  # its request is in flight; each replicator waits for it
    assert all(r.wake.waiter is not None for r in replicators)
    await leader.shutdown()
    assert all(r.task.done() for r in replicators)
    assert all(r.wake.waiter is None for r in replicators)
    for r in replicators:
        r.wake.set()  # no waiter: nothing to complete, nothing raised
    outcome = (await asyncio.gather(write, return_exceptions=True))[0]
    assert isinstance(outcome, (ClientWriteResponse, RaftHttpError)), outcome


# --- over HTTP: the WebSocket stream ------------------------------------------------------


class SlowFollower:
    """The server's handler for a Raft node built after its server; appends take 5 ms more."""

    def __init__(self) -> None:
        self.raft: Raft | None = None

    def _node(self) -> Raft:
        assert self.raft is not None
        return self.raft

    def current_vote(self) -> Vote:
        return self._node().current_vote()

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        await asyncio.sleep(0.005)
        return await self._node().append_entries(rpc)

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        return await self._node().vote(rpc)

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        return await self._node().install_full_snapshot(vote, snapshot)


async def test_http_cluster_pipelines_over_the_append_stream(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> None:
    ids = (1, 2, 3)
    handlers = {i: SlowFollower() for i in ids}
    servers = {i: await aiohttp_server(raft_app(handlers[i], token="t")) for i in ids}
    nodes = {i: Node(f"127.0.0.1:{servers[i].port}") for i in ids}
    factories = {i: HttpNetworkFactory(token="t") for i in ids}
    machines = {i: ListStateMachine() for i in ids}
    rafts: dict[int, Raft] = {}
    try:
        for i in ids:
            snapshots = SnapshotStore(tmp_path / f"snapshots-{i}")
            rafts[i] = await Raft.create(
                i, FAST, factories[i], MemoryLogStore(), machines[i], snapshots
            )
            handlers[i].raft = rafts[i]
        await rafts[1].initialize(nodes)
        await rafts[1].wait_for(lambda m: m.current_leader is not None, 5, "a leader")
        leader = next(r for r in rafts.values() if r.metrics().state is ServerState.LEADER)
        results = await trickle(leader, range(240))
        last = max(r.log_id.index for r in results)
        for r in rafts.values():
            await r.wait_for(
                lambda m: m.last_applied is not None and m.last_applied.index >= last, 10, "apply"
            )
        first = machines[leader.id].applied
        assert len(first) == 240
        assert all(m.applied == first for m in machines.values())
        for t, replicator in leader._leader.replicators.items():  # type: ignore[union-attr]
            assert replicator.most_in_flight > 1, f"one request at a time to node {t}"
            assert replicator._stream is not None
            assert replicator._stream.pipelined  # the WebSocket, not the POST fallback
    finally:
        for r in rafts.values():
            await r.shutdown()
        for f in factories.values():
            await f.close()


# --- the progress rules behind it ------------------------------------------------------


def test_window_is_one_while_probing_none_during_a_snapshot() -> None:
    p = Progress(10, 300)
    assert p.window(8) == 1
    p.matched(log_id(1, 9), 0.0)
    assert (p.state, p.window(8), p.window(0)) == (ProgressState.REPLICATE, 8, 1)
    p.sending_snapshot()
    assert p.window(8) == 0


def test_replicating_sends_past_what_is_in_flight_and_answers_keep_it() -> None:
    p = Progress(10, 300)
    p.sent(14)  # a probe does not move next: its answer decides
    assert p.next_index == 10
    p.matched(log_id(1, 14), 0.0)
    for last in (20, 26, 30):
        p.sent(last)
    assert p.next_index == 31
    assert not p.matched(log_id(1, 14), 1.0)  # an older answer: next stays ahead
    assert p.matched(log_id(1, 20), 2.0)
    assert (p.next_index, p.matching) == (31, log_id(1, 20))


@pytest.mark.parametrize("fail", ["failed", "too_large", "conflict"])
def test_a_failure_in_the_window_resends_from_the_match_probing(fail: str) -> None:
    p = Progress(10, 300)
    p.matched(log_id(1, 9), 0.0)
    p.sent(20)
    p.sent(30)
    if fail == "failed":
        p.failed()
        assert p.next_index == 10
    elif fail == "too_large":
        p.too_large(5)
        assert (p.next_index, p.entries_limit) == (10, 5)
    else:
        p.conflict(20)  # the follower lacked entry 20: search between the match and it
        assert p.next_index == 15
    assert p.state is ProgressState.PROBE
    assert p.window(8) == 1
    assert p.matching == log_id(1, 9)
