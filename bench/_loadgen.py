"""A load generator, run as a process of its own; prints one JSON line with what it measured.

    python bench/_loadgen.py append-http  --url http://127.0.0.1:P --payload 100x100 -c 64
    python bench/_loadgen.py append-bare  --url http://127.0.0.1:P/append --payload 100x100 -c 64
    python bench/_loadgen.py write        --url http://127.0.0.1:P/write -c 64

``append-http`` calls ``HttpNetwork.append_entries``; ``append-bare`` POSTs the same
bytes with a bare ``aiohttp`` session. ``write`` POSTs ``/write`` commands from
``-c`` clients over one keep-alive pool, following 307s. Each run is bounded by
``--calls`` and ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import quantiles

from raft_http.client import HttpNetworkFactory
from raft_http.network import RPCOption
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    AppendEntriesRequest,
    Entry,
    LeaderId,
    LogId,
    Node,
    Normal,
    Vote,
)

OPTION = RPCOption(hard_ttl=30.0)
VOTE = Vote(LeaderId(1, 1), True)
PAYLOADS = {"heartbeat": (0, 0), "100x100": (100, 100), "300x1k": (300, 1024)}


class Refused(Exception):
    """An answer that is not a success (its status and error kind), or a lost connection."""


def command(i: int, size: int) -> bytes:
    """A JSON ``Set`` command of exactly ``size`` bytes (at least its fixed part)."""
    head = b'{"Set":{"key":"key-%08d","value":"' % i
    tail = b'"}}'
    return head + b"v" * max(0, size - len(head) - len(tail)) + tail


def append_request(payload: str) -> AppendEntriesRequest:
    """A heartbeat, or ``n`` entries of ``size``-byte commands after index 1000."""
    n, size = PAYLOADS[payload]
    first = 1001
    entries = [
        Entry(LogId(LeaderId(1, 1), i), Normal(msgspec.Raw(command(i, size))))
        for i in range(first, first + n)
    ]
    prev = LogId(LeaderId(1, 1), first - 1)
    return AppendEntriesRequest(VOTE, prev, entries, prev)


async def measure(
    call: Callable[[int], Awaitable[object]], concurrency: int, calls: int, seconds: float
) -> dict[str, object]:
    for i in range(min(50, calls)):  # warm-up: connections, caches
        await call(-1 - i)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_i = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal next_i
        while next_i < calls and time.perf_counter() < stop_at:
            i = next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                await call(i)
            except Refused as e:  # counted, not timed: a refused write is not a write
                errors[str(e)] = errors.get(str(e), 0) + 1
                await asyncio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "cpu": cpu / elapsed,
        "q_ms": [q * 1e3 for q in quantiles(latencies)],
        "errors": errors,
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    limit = aiohttp.TCPConnector(limit=max(100, args.concurrency))
    async with aiohttp.ClientSession(
        connector=limit, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        if args.mode == "append-http":
            factory = HttpNetworkFactory(session)
            network = factory.new_client(2, Node(args.url))
            rpc = append_request(args.payload)

            async def call(i: int) -> object:
                return await network.append_entries(rpc, OPTION)

        elif args.mode == "append-bare":
            body = APPEND_ENTRIES_REQUEST.encode(append_request(args.payload))
            headers = {"Content-Type": "application/json"}

            async def call(i: int) -> object:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    return APPEND_ENTRIES_RESPONSE.decode(await resp.read())

        else:
            headers = {"Content-Type": "application/json"}
            tag = f"{time.time_ns() % 10**9}"

            async def call(i: int) -> object:
                body = b'{"Set":{"key":"k%s-%d","value":"v"}}' % (tag.encode(), i)
                try:
                    async with session.post(args.url, data=body, headers=headers) as resp:
                        answer = await resp.read()
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise Refused(type(e).__name__) from None
                if resp.status != 200:
                    kind = msgspec.json.decode(answer).get("error", {}).get("kind", "?")
                    raise Refused(f"{resp.status} {kind}")
                return answer

        return await measure(call, args.concurrency, args.calls, args.seconds)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["append-http", "append-bare", "write"])
    p.add_argument("--url", required=True)
    p.add_argument("--payload", choices=list(PAYLOADS), default="heartbeat")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--seconds", type=float, default=3.0)
    return p


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        sys.argv.remove("--uvloop")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if sys.argv[1:] == ["--stdin"]:
        # One run per line of arguments: the process (and its imports) is reused across runs.
        for line in sys.stdin:
            print(json.dumps(asyncio.run(main(parser().parse_args(json.loads(line))))), flush=True)
    else:
        print(json.dumps(asyncio.run(main(parser().parse_args()))))
