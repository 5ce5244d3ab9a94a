"""Servers the benchmarks start as processes of their own.

    python bench/_servers.py raft-null --port P   # raft_app with a handler that answers at once
    python bench/_servers.py bare --port P        # bare aiohttp: reads the body, answers JSON

``bare`` is the ceiling an HTTP/JSON transport is compared with: the same bytes
arrive, nothing is decoded, a fixed answer goes back. ``raft-null`` decodes every
request into its Structs (as a real node must) and encodes the answer.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from raft_http.server import raft_app
from raft_http.types import (
    APPEND_ENTRIES_RESPONSE,
    AppendEntriesRequest,
    AppendEntriesResponse,
    LeaderId,
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
    parser.add_argument("kind", choices=["raft-null", "bare"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = raft_app(NullHandler()) if args.kind == "raft-null" else bare_app()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
