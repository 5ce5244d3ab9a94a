"""Where does a 300-entry AppendEntries spend its time? cProfile over HTTP, one process.

    python bench/profile_append.py [--calls 2000] [--entries 300]

Prints calls/s and the top functions by own time. Companion to bench_transport.py's
"AppendEntries throughput" table (see bench/RESULTS.md, "Reading").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transport import OPTION, NullHandler, append_request

from raft_http.client import HttpNetworkFactory
from raft_http.server import raft_app
from raft_http.types import Node


async def main(calls: int, entries: int) -> None:
    runner = web.AppRunner(raft_app(NullHandler()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    factory = HttpNetworkFactory()
    try:
        network = factory.new_client(2, Node(f"127.0.0.1:{port}"))
        rpc = append_request(entries)
        for _ in range(50):  # warm-up: the connection, caches
            await network.append_entries(rpc, OPTION)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for _ in range(calls):
            await network.append_entries(rpc, OPTION)
        profile.disable()
        elapsed = time.perf_counter() - start
        print(f"{calls / elapsed:,.0f} calls/s with {entries} entries (profiled)")
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    finally:
        await factory.close()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.entries))
