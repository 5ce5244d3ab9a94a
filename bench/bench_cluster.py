"""Cluster benchmark: client writes and leader failover of three Raft cores in one process.

The measured setup is real HTTP (``raft_app`` servers on 127.0.0.1 + ``HttpNetworkFactory``)
with ``SqliteLogStore`` (fsync per batch); the baseline is the same cores over
``MemoryRouter`` with ``MemoryLogStore``, measured in the same run. All three nodes
share one event loop, so the figures are a lower bound of what separate
processes on separate machines would do. Run ``python bench/bench_cluster.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, emit, free_port, header, median, pct, ratio, table

from raft_http.client import HttpNetworkFactory
from raft_http.network import RaftNetworkFactory
from raft_http.raft import (
    Config,
    MemoryLogStore,
    Raft,
    ServerState,
    SnapshotStore,
    SqliteLogStore,
)
from raft_http.raft.storage import LogStore
from raft_http.server import raft_app
from raft_http.testing import ListStateMachine, MemoryRouter
from raft_http.types import Node

CONFIG = Config()  # the defaults: heartbeat 50 ms, election timeout 150-300 ms
IDS = (1, 2, 3)


class BenchCluster:
    """Three nodes over HTTP+SQLite (``http=True``) or MemoryRouter+memory log."""

    def __init__(self, tmp: Path, http: bool) -> None:
        self.tmp = tmp
        self.http = http
        self.router = MemoryRouter()
        self.nodes: dict[int, Raft] = {}
        self.stores: dict[int, LogStore] = {}
        self.factories: dict[int, RaftNetworkFactory] = {}
        self.runners: dict[int, web.AppRunner] = {}

    async def start(self) -> Raft:
        if self.http:
            addrs = {i: Node(f"{HOST}:{free_port()}") for i in IDS}
        else:
            addrs = {i: Node(f"mem-{i}") for i in IDS}
        for i in IDS:
            store: LogStore
            factory: RaftNetworkFactory
            if self.http:
                store = await SqliteLogStore.open(self.tmp / f"log-{i}.sqlite")
                factory = HttpNetworkFactory()
            else:
                store = MemoryLogStore()
                factory = self.router.factory(i)
            self.stores[i], self.factories[i] = store, factory
            raft = await Raft.create(
                i, CONFIG, factory, store, ListStateMachine(), SnapshotStore(self.tmp / f"snap-{i}")
            )
            self.nodes[i] = raft
            if self.http:
                runner = web.AppRunner(raft_app(raft, spool_dir=self.tmp / f"spool-{i}"))
                await runner.setup()
                self.runners[i] = runner
                port = int(addrs[i].addr.rsplit(":", 1)[1])
                await web.TCPSite(runner, HOST, port).start()
            else:
                self.router.register(i, raft)
        await self.nodes[IDS[0]].initialize(addrs)
        return await self.leader()

    async def leader(self, timeout: float = 10.0) -> Raft:
        """The node that leads with a commit in its own term (a confirmed leader)."""
        async with asyncio.timeout(timeout):
            while True:
                for raft in self.nodes.values():
                    m = raft.metrics()
                    if (
                        m.state is ServerState.LEADER
                        and m.committed is not None
                        and m.committed.leader_id.term == m.current_term
                    ):
                        return raft
                await asyncio.sleep(0.002)

    async def stop(self, node_id: int) -> None:
        """A crash as peers see it: the node stops answering and its port closes."""
        raft = self.nodes.pop(node_id)
        if self.http:
            await self.runners.pop(node_id).cleanup()
        else:
            self.router.unregister(node_id)
        await raft.shutdown()
        await self.factories.pop(node_id).close()
        await self.stores.pop(node_id).close()

    async def close(self) -> None:
        for node_id in list(self.nodes):
            await self.stop(node_id)


async def writes(
    leader: Raft, writers: int, total: int, budget: float
) -> tuple[float, int, list[float]]:
    """Writes/s by ``writers`` concurrent clients; at most ``total`` writes or ``budget`` s."""
    remaining = total
    latencies: list[float] = []
    stop_at = time.perf_counter() + budget

    async def writer(w: int) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            body = msgspec.json.encode({"writer": w, "n": remaining, "value": "x" * 60})
            t0 = time.perf_counter()
            await leader.client_write(body)
            latencies.append(time.perf_counter() - t0)

    for _ in range(10):  # warm-up
        await leader.client_write(b'{"warm": "up"}')
    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, len(latencies), latencies


async def bench_writes(tmp: Path, quick: bool) -> None:
    plan = ((1, 40), (16, 300), (128, 1000)) if quick else ((1, 3000), (16, 20000), (128, 60000))
    budget = 1.5 if quick else 10.0
    results: dict[tuple[bool, int], tuple[float, int, list[float]]] = {}
    for http in (False, True):
        with tempfile.TemporaryDirectory(dir=tmp) as d:
            cluster = BenchCluster(Path(d), http)
            try:
                leader = await cluster.start()
                for writers, total in plan:
                    results[(http, writers)] = await writes(leader, writers, total, budget)
            finally:
                await cluster.close()
    rows = []
    for writers, _ in plan:
        base = results[(False, writers)][0]
        one = results[(True, 1)][0]
        for http in (False, True):
            per_s, n, lat = results[(http, writers)]
            rows.append(
                [
                    writers,
                    "HTTP + SQLite" if http else "memory",
                    n,
                    per_s,
                    pct(lat, 0.5) * 1e3,
                    pct(lat, 0.99) * 1e3,
                    ratio(per_s, base),
                    ratio(per_s, one) if http else float("nan"),
                ]
            )
    emit(
        table(
            "Client writes, 3 nodes in one process",
            [
                "writers",
                "setup",
                "writes",
                "writes/s",
                "p50 ms",
                "p99 ms",
                "x memory",
                "x 1 writer (HTTP)",
            ],
            rows,
        )
    )


async def failover(tmp: Path, http: bool) -> float:
    cluster = BenchCluster(tmp, http)
    try:
        leader = await cluster.start()
        for i in range(5):  # a little traffic, then steady heartbeats
            await leader.client_write(msgspec.json.encode({"n": i}))
        await asyncio.sleep(CONFIG.election_timeout_max)
        t0 = time.perf_counter()
        await cluster.stop(leader.id)
        await cluster.leader()
        return time.perf_counter() - t0
    finally:
        await cluster.close()


async def bench_failover(tmp: Path, quick: bool) -> None:
    runs = 1 if quick else 7
    rows = []
    for http in (False, True):
        times = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory(dir=tmp) as d:
                times.append(await failover(Path(d), http))
        med = median(times)
        rows.append(
            [
                "HTTP + SQLite" if http else "memory",
                runs,
                med * 1e3,
                min(times) * 1e3,
                max(times) * 1e3,
                ratio(med, CONFIG.election_timeout_min),
                ratio(med, CONFIG.election_timeout_max),
            ]
        )
    emit(
        table(
            "Time to a new confirmed leader after stopping the leader "
            f"(election timeout {CONFIG.election_timeout_min * 1e3:.0f}-"
            f"{CONFIG.election_timeout_max * 1e3:.0f} ms, "
            f"heartbeat {CONFIG.heartbeat_interval * 1e3:.0f} ms)",
            ["setup", "runs", "median ms", "min ms", "max ms", "x timeout min", "x timeout max"],
            rows,
        )
    )


async def main(quick: bool) -> None:
    header("bench_cluster", quick)
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="raft-bench-cluster-") as d:
        await bench_writes(Path(d), quick)
        await bench_failover(Path(d), quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    asyncio.run(main(args.quick))
