"""Servers the benchmarks start as processes of their own.

    python bench/_servers.py raft-null --port P   # raft_app with a handler that answers at once
    python bench/_servers.py bare --port P        # bare aiohttp: reads the body, answers JSON
    python bench/_servers.py kv-stub --port P     # a node's HTTP app over a Raft stub

``bare`` is the ceiling an HTTP/JSON transport is compared with: the same bytes
arrive, nothing is decoded, a fixed answer goes back. ``raft-null`` decodes every
request into its Structs (as a real node must) and encodes the answer. ``kv-stub`` is
the app ``raft-http node`` serves (``KVNode.build_app``: KV API, Raft routes, status
page, connection guard) over a Raft whose ``client_write`` answers at once: what the
node's HTTP stack costs beyond bare aiohttp, without replication or fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from typing import Any

from aiohttp import web

from raft_http.kv.node import KVNode
from raft_http.raft import ClientWriteResponse
from raft_http.server import raft_app
from raft_http.types import (
    APPEND_ENTRIES_RESPONSE,
    AppendEntriesRequest,
    AppendEntriesResponse,
    LeaderId,
    LogId,
    Snapshot,
    SnapshotResponse,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
)

VOTE = Vote(LeaderId(1, 1), True)
SUCCESS_BODY = APPEND_ENTRIES_RESPONSE.encode(Success())
WRITE_ANSWER = b'{"data":{"value":"v"},"log_id":{"leader_id":{"term":1,"node_id":1},"index":1}}'


class NullHandler:
    """A ``RaftHandler`` that accepts everything at once: what is measured is the wire."""

    def current_vote(self) -> Vote:
        return VOTE

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        return Success()

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        return VoteResponse(VOTE, False, None)

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        return SnapshotResponse(VOTE)


class StubRaft:
    """Just enough of ``Raft`` for ``POST /write``: every write is applied at once."""

    def __init__(self) -> None:
        self.index = 0

    async def client_write(self, data: bytes) -> ClientWriteResponse:
        self.index += 1
        return ClientWriteResponse(LogId(LeaderId(1, 1), self.index), None)

    def metrics(self) -> Any:
        return None

    def current_vote(self) -> Vote:
        return VOTE


async def serve_kv_stub(port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="kv-stub-") as data_dir:
        node = KVNode(1, data_dir, port=port)
        app, guard = node.build_app(StubRaft())  # type: ignore[arg-type]
        await node.serve(app, guard)
        await asyncio.Event().wait()


def bare_app() -> web.Application:
    """Reads each body and answers a fixed JSON document: HTTP's own cost, nothing more."""

    async def append(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=SUCCESS_BODY, content_type="application/json")

    async def write(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=WRITE_ANSWER, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/append", append)
    app.router.add_post("/raft/append", append)
    app.router.add_post("/write", write)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["raft-null", "bare", "kv-stub"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.kind == "kv-stub":
        asyncio.run(serve_kv_stub(args.port))
        return
    app = raft_app(NullHandler()) if args.kind == "raft-null" else bare_app()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
