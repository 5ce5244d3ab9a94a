"""Transport benchmark: the HTTP transport against bare aiohttp, in-memory codecs, a disk copy.

Everything runs in one process on 127.0.0.1 (client and server share one event
loop and, on a 2-core machine, compete for the same CPU); every loop is bounded
in count and in time. Run ``python bench/bench_transport.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import aiohttp
import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RssPeak,
    emit,
    header,
    median,
    pct,
    ratio,
    serve,
    table,
)

from raft_http.client import HttpNetworkFactory
from raft_http.network import RaftNetwork, RPCOption
from raft_http.server import raft_app
from raft_http.testing import MemoryRouter
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    AppendEntriesRequest,
    AppendEntriesResponse,
    Entry,
    LeaderId,
    LogId,
    Membership,
    Node,
    Normal,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
)

MiB = 1024 * 1024
VOTE = Vote(LeaderId(1, 1), True)
OPTION = RPCOption(hard_ttl=30.0)
SNAPSHOT_OPTION = RPCOption(hard_ttl=60.0)
SUCCESS_BODY = APPEND_ENTRIES_RESPONSE.encode(Success())


class NullHandler:
    """A ``RaftHandler`` that accepts everything at once: the benchmark measures the wire only."""

    def __init__(self) -> None:
        self.snapshot_bytes = 0

    def current_vote(self) -> Vote:
        return VOTE

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        return Success()

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        return VoteResponse(VOTE, False, None)

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        # The server has already spooled the body to disk; only note its size.
        self.snapshot_bytes = await asyncio.to_thread(snapshot.data.seek, 0, os.SEEK_END)
        return SnapshotResponse(VOTE)


def log_id(index: int) -> LogId:
    return LogId(LeaderId(1, 1), index)


def append_request(n: int, first: int = 1) -> AppendEntriesRequest:
    """``n`` entries of ~100-byte JSON commands (0: a heartbeat)."""
    entries = []
    for i in range(first, first + n):
        command = msgspec.json.encode({"op": "set", "key": f"key-{i:08d}", "value": "v" * 56})
        entries.append(Entry(log_id(i), Normal(msgspec.Raw(command))))
    prev = log_id(first - 1) if first > 0 else None
    return AppendEntriesRequest(VOTE, prev, entries, prev)


def snapshot_meta(size: int) -> SnapshotMeta:
    members = Membership([[1, 2]], {1: Node("127.0.0.1:1"), 2: Node("127.0.0.1:2")})
    return SnapshotMeta(log_id(10), StoredMembership(log_id(1), members), f"bench-{size}")


async def raw_app() -> web.Application:
    """A trivial aiohttp app: reads the body, answers the same bytes a real append would."""

    async def append(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=SUCCESS_BODY, content_type="application/json")

    app = web.Application(client_max_size=256 * MiB)
    app.router.add_post("/append", append)
    return app


# --- measuring loops ----------------------------------------------------------------


async def rate(
    call: Callable[[], Awaitable[object]], calls: int, concurrency: int, budget: float
) -> tuple[float, int, list[float]]:
    """Calls per second of ``call`` run by ``concurrency`` workers; bounded by count and time."""
    for _ in range(min(20, calls)):  # warm-up: open connections, fill caches
        await call()
    latencies: list[float] = []
    remaining = calls
    stop_at = time.perf_counter() + budget

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, len(latencies), latencies


class Targets:
    """The three ways to deliver the same request: MemoryRouter, HTTP transport, raw aiohttp."""

    def __init__(self, memory: RaftNetwork, http: RaftNetwork, raw_url: str) -> None:
        self.memory = memory
        self.http = http
        self.raw_url = raw_url
        self.session = aiohttp.ClientSession()

    def calls(self, rpc: AppendEntriesRequest) -> dict[str, Callable[[], Awaitable[object]]]:
        body = APPEND_ENTRIES_REQUEST.encode(rpc)
        headers = {"Content-Type": "application/json"}

        async def raw() -> object:
            async with self.session.post(self.raw_url, data=body, headers=headers) as resp:
                return APPEND_ENTRIES_RESPONSE.decode(await resp.read())

        return {
            "memory": lambda: self.memory.append_entries(rpc, OPTION),
            "http": lambda: self.http.append_entries(rpc, OPTION),
            "raw aiohttp": raw,
        }


async def bench_heartbeats(t: Targets, quick: bool) -> None:
    calls = 200 if quick else 4000
    budget = 1.0 if quick else 6.0
    rows = []
    for conc in (1, 16):
        results = {}
        for name, call in t.calls(append_request(0)).items():
            per_s, n, lat = await rate(call, calls, conc, budget)
            results[name] = (per_s, n, lat)
        raw = results["raw aiohttp"][0]
        for name, (per_s, n, lat) in results.items():
            rows.append(
                [
                    conc,
                    name,
                    n,
                    per_s,
                    pct(lat, 0.5) * 1e3,
                    pct(lat, 0.99) * 1e3,
                    ratio(per_s, raw),
                ]
            )
    emit(
        table(
            "Heartbeats (empty AppendEntries)",
            ["concurrent", "path", "calls", "calls/s", "p50 ms", "p99 ms", "x raw aiohttp"],
            rows,
        )
    )


async def bench_append(t: Targets, quick: bool) -> None:
    rows = []
    for n_entries, calls in ((1, 1500), (100, 400), (300, 150)):
        if quick:
            calls = max(10, calls // 30)
        rpc = append_request(n_entries)
        size = len(APPEND_ENTRIES_REQUEST.encode(rpc))
        results = {}
        for name, call in t.calls(rpc).items():
            per_s, _, _ = await rate(call, calls, 1, 1.0 if quick else 5.0)
            results[name] = per_s
        for name, per_s in results.items():
            rows.append(
                [
                    n_entries,
                    size,
                    name,
                    per_s,
                    per_s * n_entries,
                    per_s * size / MiB,
                    ratio(per_s, results["raw aiohttp"]),
                ]
            )
    emit(
        table(
            "AppendEntries throughput (~100-byte commands, 1 sender)",
            [
                "entries",
                "body bytes",
                "path",
                "calls/s",
                "entries/s",
                "MiB/s",
                "x raw aiohttp",
            ],
            rows,
        )
    )


# --- snapshots -------------------------------------------------------------------------


def write_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
        f.write(block[: size % MiB])


def chunked_copy(src: Path, dst: Path, chunk: int) -> None:
    """A user-space copy in the upload's chunk size: read, write, no fsync."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        while data := f.read(chunk):
            out.write(data)


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)


async def upload(net: RaftNetwork, path: Path, size: int) -> None:
    never: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    with open(path, "rb") as f:
        data: BinaryIO = f
        await net.full_snapshot(
            VOTE,
            Snapshot(snapshot_meta(size), data),
            never,  # type: ignore[arg-type]
            SNAPSHOT_OPTION,
        )


async def bench_snapshots(
    net: RaftNetwork, handler: NullHandler, tmp: Path, sizes: list[int], runs: int
) -> None:
    """Median of ``runs`` uploads and copies; then one upload under tracemalloc."""
    rows = []
    for size in sizes:
        src = tmp / f"snap-{size}"
        await asyncio.to_thread(write_file, src, size)
        copy = tmp / f"copy-{size}"
        copy_times, chunked_times, http_times = [], [], []
        growth = 0
        for _ in range(runs):  # alternate, so both see the same page-cache weather
            t0 = time.perf_counter()
            # No fsync on either side: the server's spool does not fsync either.
            await asyncio.to_thread(shutil.copyfile, src, copy)
            copy_times.append(time.perf_counter() - t0)
            await asyncio.to_thread(drop_file, copy)
            t0 = time.perf_counter()
            await asyncio.to_thread(chunked_copy, src, copy, SNAPSHOT_OPTION.chunk_size)
            chunked_times.append(time.perf_counter() - t0)
            await asyncio.to_thread(drop_file, copy)
            with RssPeak() as rss:
                t0 = time.perf_counter()
                await upload(net, src, size)
                http_times.append(time.perf_counter() - t0)
            growth = max(growth, rss.growth)
            assert handler.snapshot_bytes == size, (handler.snapshot_bytes, size)
        copy_s, http_s = median(copy_times), median(http_times)
        chunked_rate = size / MiB / median(chunked_times)

        tracemalloc.start()
        try:
            await upload(net, src, size)
            _, traced_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await asyncio.to_thread(drop_file, src)
        http_rate = size / MiB / http_s
        copy_rate = size / MiB / copy_s
        rows.append(
            [
                size // MiB,
                http_rate,
                copy_rate,
                ratio(http_rate, copy_rate),
                chunked_rate,
                ratio(http_rate, chunked_rate),
                growth / MiB,
                traced_peak / MiB,
            ]
        )
    emit(
        table(
            "full_snapshot upload (HTTP, 3 MiB chunks) vs a file copy on the same disk (medians)",
            [
                "MiB",
                "HTTP MiB/s",
                "copyfile MiB/s",
                "x copyfile",
                "3 MiB read/write MiB/s",
                "x read/write",
                "peak RSS growth MiB",
                "tracemalloc peak MiB",
            ],
            rows,
        )
    )


async def heartbeat_latencies(
    net: RaftNetwork, count: int, gap: float, until: asyncio.Future[None] | None
) -> list[float]:
    """Heartbeats ``gap`` apart: ``count`` of them, or while ``until`` is pending."""
    rpc = append_request(0)
    out: list[float] = []
    for _ in range(count):
        if until is not None and until.done():
            break
        t0 = time.perf_counter()
        await net.append_entries(rpc, OPTION)
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(gap)
    return out


async def bench_heartbeat_under_snapshot(net: RaftNetwork, tmp: Path, size: int) -> None:
    src = tmp / "busy-snap"
    await asyncio.to_thread(write_file, src, size)
    try:
        idle = await heartbeat_latencies(net, 200, 0.005, None)
        t0 = time.perf_counter()
        uploading = asyncio.ensure_future(upload(net, src, size))
        busy = await heartbeat_latencies(net, 5000, 0.005, uploading)
        await uploading
        upload_s = time.perf_counter() - t0
    finally:
        await asyncio.to_thread(drop_file, src)
    rows = [
        ["idle", len(idle), pct(idle, 0.5) * 1e3, pct(idle, 0.99) * 1e3, max(idle) * 1e3, 1.0, 1.0],
        [
            f"during {size // MiB} MiB upload ({upload_s:.1f} s)",
            len(busy),
            pct(busy, 0.5) * 1e3,
            pct(busy, 0.99) * 1e3,
            max(busy) * 1e3 if busy else float("nan"),
            ratio(pct(busy, 0.5), pct(idle, 0.5)),
            ratio(pct(busy, 0.99), pct(idle, 0.99)),
        ],
    ]
    emit(
        table(
            "Heartbeat latency to the node receiving a snapshot (one every 5 ms)",
            ["while", "heartbeats", "p50 ms", "p99 ms", "max ms", "p50 x idle", "p99 x idle"],
            rows,
        )
    )
    if busy:
        emit(f"median heartbeat during upload: {median(busy) * 1e3:.2f} ms\n")


async def main(quick: bool) -> None:
    header("bench_transport", quick)
    handler = NullHandler()
    router = MemoryRouter()
    router.register(2, handler)
    memory = router.factory(1).new_client(2, Node("mem-2"))
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        app = raft_app(handler, spool_dir=tmp / "spool")
        async with (
            serve(app) as addr,
            serve(await raw_app()) as raw_addr,
            HttpNetworkFactory() as factory,
        ):
            http = factory.new_client(2, Node(addr))
            targets = Targets(memory, http, f"http://{raw_addr}/append")
            try:
                await bench_heartbeats(targets, quick)
                await bench_append(targets, quick)
            finally:
                await targets.session.close()
            sizes = [4 * MiB] if quick else [64 * MiB, 256 * MiB]
            await bench_snapshots(http, handler, tmp, sizes, 1 if quick else 3)
            await bench_heartbeat_under_snapshot(http, tmp, 8 * MiB if quick else 256 * MiB)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    asyncio.run(main(args.quick))
