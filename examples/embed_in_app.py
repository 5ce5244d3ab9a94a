"""Mount the Raft routes into an aiohttp app that has routes of its own.

    python examples/embed_in_app.py [--port 8080] [--token secret] [--cluster demo]

The app answers ``GET /`` and ``GET /health`` itself and serves the Raft wire
protocol under ``/raft`` (``POST /raft/vote``, ``/raft/append``, ``/raft/snapshot``,
``HEAD /raft/snapshot``) with a toy in-memory handler: it acts like a follower
whose vote is term 1, node 1, committed, and remembers what it was sent. See
docs/curl.md for requests to try.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from typing import BinaryIO

from aiohttp import web

from raft_http.errors import APIError
from raft_http.server import raft_app
from raft_http.serving import runner_options
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Conflict,
    HigherVote,
    LeaderId,
    LogId,
    Snapshot,
    SnapshotResponse,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
    log_id_key,
)


class ToyHandler:
    """A follower in memory: a vote, a log of entry ids, and the digest of the last snapshot."""

    def __init__(self) -> None:
        self.vote_ = Vote(LeaderId(term=1, node_id=1), committed=True)
        self.log: list[LogId] = []
        self.snapshot: tuple[str, int, str] | None = None  # id, size, sha256
        self.calls: list[str] = []

    def current_vote(self) -> Vote:
        return self.vote_

    def last_log_id(self) -> LogId | None:
        return self.log[-1] if self.log else None

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        self.calls.append("vote")
        up_to_date = log_id_key(rpc.last_log_id) >= log_id_key(self.last_log_id())
        granted = rpc.vote >= self.vote_ and up_to_date
        if granted:
            self.vote_ = rpc.vote
        return VoteResponse(vote=self.vote_, vote_granted=granted, last_log_id=self.last_log_id())

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        self.calls.append("append")
        if not rpc.vote >= self.vote_:
            return HigherVote(self.vote_)
        self.vote_ = rpc.vote
        if rpc.prev_log_id is not None and rpc.prev_log_id not in self.log:
            return Conflict()
        keep = 0 if rpc.prev_log_id is None else self.log.index(rpc.prev_log_id) + 1
        del self.log[keep:]
        self.log.extend(entry.log_id for entry in rpc.entries)
        return Success()

    async def handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        """A real core would campaign at once; the toy only checks who sent it."""
        self.calls.append("transfer")
        if rpc.from_leader != self.vote_:
            raise APIError("not_allowed", f"this node follows {self.vote_}, not the sender")

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        self.calls.append("snapshot")
        if vote >= self.vote_:
            self.vote_ = vote
            digest, size = await asyncio.to_thread(_digest, snapshot.data)
            self.snapshot = (snapshot.meta.snapshot_id, size, digest)
            print(
                f"installed snapshot {snapshot.meta.snapshot_id!r}: {size} bytes, sha256 {digest}"
            )
        return SnapshotResponse(self.vote_)


def _digest(data: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while piece := data.read(1 << 20):
        h.update(piece)
        size += len(piece)
    return h.hexdigest(), size


def build_app(token: str | None = None, cluster: str | None = None) -> web.Application:
    handler = ToyHandler()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="an app with a Raft node mounted at /raft\n")

    async def health(request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "raft_calls": len(handler.calls), "snapshot": handler.snapshot}
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.add_subapp("/raft", raft_app(handler, token=token, cluster=cluster))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", default="secret", help="bearer token ('' for none)")
    parser.add_argument("--cluster", default=None, help="require this Raft-Cluster header")
    args = parser.parse_args()

    def announce(_: object) -> None:
        print(
            f"listening on http://{args.host}:{args.port} (Raft routes under /raft)",
            flush=True,
        )

    web.run_app(
        build_app(args.token or None, args.cluster),
        host=args.host,
        port=args.port,
        print=announce,
        **runner_options(),  # compressed or malformed requests: cheap JSON refusals
    )


if __name__ == "__main__":
    main()
