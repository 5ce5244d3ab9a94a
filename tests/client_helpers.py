"""A small hand-written Raft HTTP server for client tests, plus builders for requests.

It follows docs/protocol.md closely enough for the client, and can misbehave on
demand (drop the connection mid-upload, stall, answer garbage) in ways the real
server never would.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    ERROR_BODY,
    INSTALL_SNAPSHOT_REQUEST,
    SNAPSHOT_META,
    VOTE,
    VOTE_REQUEST,
    AppendEntriesRequest,
    Blank,
    Entry,
    ErrorBody,
    ErrorDetail,
    InstallSnapshotResponse,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
    encode_json,
)

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .wire_helpers import log_id, vote
except ImportError:
    from wire_helpers import log_id, vote  # type: ignore[no-redef]


def append_request(n_entries: int = 0, term: int = 1) -> AppendEntriesRequest:
    entries = [Entry(log_id(term, i), Blank()) for i in range(1, n_entries + 1)]
    prev = log_id(term, 0) if n_entries else None
    return AppendEntriesRequest(vote(term), prev, entries, prev)


def vote_request(term: int = 2) -> VoteRequest:
    return VoteRequest(vote(term, committed=False), log_id(1, 3))


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def error_response(status: int, kind: str, message: str, **extra: Any) -> web.Response:
    body = ERROR_BODY.encode(ErrorBody(ErrorDetail(kind, message, **extra)))
    return web.Response(status=status, body=body, content_type="application/json")


def json_response(value: Any) -> web.Response:
    return web.Response(body=encode_json(value), content_type="application/json")


class ShortFile(io.BytesIO):
    """A file that claims ``extra`` more bytes than it holds (as if truncated under us)."""

    def __init__(self, data: bytes, extra: int) -> None:
        super().__init__(data)
        self.extra = extra

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        got = super().seek(pos, whence)
        return got + self.extra if whence == os.SEEK_END else got


@dataclass
class FakeRaft:
    """Records what arrives and answers per the protocol; knobs make it misbehave."""

    token: str | None = None
    cluster: str | None = None
    current_vote: Vote = field(default_factory=lambda: vote(1))
    spools: dict[str, bytearray] = field(default_factory=dict)
    installed: list[tuple[Vote, SnapshotMeta, bytes]] = field(default_factory=list)
    appends: list[AppendEntriesRequest] = field(default_factory=list)
    votes: list[VoteRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    snapshot_offsets: list[int] = field(default_factory=list)
    drop_after: list[int] = field(default_factory=list)
    """For each coming POST /snapshot: drop the connection once it has read this many bytes."""
    always_drop_after: int | None = None
    snapshot_gate: asyncio.Event | None = None
    """When set, POST /snapshot waits on it after its first chunk (a slow upload)."""
    snapshot_started: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/append", self.append)
        app.router.add_post("/vote", self.vote)
        app.router.add_post("/snapshot", self.snapshot)
        app.router.add_route("HEAD", "/snapshot", self.snapshot_head)
        return app

    def _check(self, request: web.Request) -> web.Response | None:
        self.headers.append(dict(request.headers))
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            return error_response(401, "unauthorized", "missing or wrong token")
        if self.cluster is not None and request.headers.get("Raft-Cluster") != self.cluster:
            return error_response(412, "cluster_mismatch", "wrong cluster")
        return None

    async def append(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        rpc = APPEND_ENTRIES_REQUEST.decode(await request.read())
        self.appends.append(rpc)
        return json_response(Success())

    async def vote(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        rpc = VOTE_REQUEST.decode(await request.read())
        self.votes.append(rpc)
        return json_response(VoteResponse(rpc.vote, True, None))

    async def snapshot_head(self, request: web.Request) -> web.Response:
        if (refused := self._check(request)) is not None:
            return refused
        held = self.spools.get(request.headers.get("Raft-Snapshot-Id", ""), b"")
        return web.Response(headers={"Raft-Snapshot-Offset": str(len(held))})

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._check(request)) is not None:
            return refused
        if request.content_type == "application/json":
            return await self._chunk(request)
        assert request.headers["Raft-Snapshot-Meta"].isascii()
        v = VOTE.decode(request.headers["Raft-Vote"])
        meta = SNAPSHOT_META.decode(request.headers["Raft-Snapshot-Meta"])
        size = int(request.headers["Raft-Snapshot-Size"])
        offset = int(request.headers["Raft-Snapshot-Offset"])
        self.snapshot_offsets.append(offset)
        if not v >= self.current_vote:
            return json_response(SnapshotResponse(self.current_vote))
        if offset == 0 and meta.snapshot_id not in self.spools:
            self.spools = {meta.snapshot_id: bytearray()}
        spool = self.spools.setdefault(meta.snapshot_id, bytearray())
        if offset != len(spool):
            return error_response(
                409, "offset_mismatch", "offset mismatch", expected_offset=len(spool)
            )
        drop = self.drop_after.pop(0) if self.drop_after else self.always_drop_after
        async for chunk in request.content.iter_chunked(64 * 1024):
            spool += chunk
            self.snapshot_started.set()
            if self.snapshot_gate is not None:
                await self.snapshot_gate.wait()
            if drop is not None and len(spool) - offset >= drop:
                assert request.transport is not None
                request.transport.abort()
                raise ConnectionResetError("dropped on purpose")
        if len(spool) != size:
            del self.spools[meta.snapshot_id]
            return error_response(400, "size_mismatch", f"got {len(spool)} of {size} bytes")
        self.installed.append((v, meta, bytes(spool)))
        del self.spools[meta.snapshot_id]
        return json_response(SnapshotResponse(self.current_vote))

    async def _chunk(self, request: web.Request) -> web.Response:
        rpc = INSTALL_SNAPSHOT_REQUEST.decode(await request.read())
        sid = rpc.meta.snapshot_id
        held = self.spools.get(sid)
        if rpc.offset != 0 and (held is None or len(held) != rpc.offset):
            holder = next(iter(self.spools), "")
            return error_response(
                409,
                "snapshot_mismatch",
                "segment mismatch",
                expect={"snapshot_id": holder, "offset": len(self.spools.get(holder, b""))},
                got={"snapshot_id": sid, "offset": rpc.offset},
            )
        if rpc.offset == 0:
            self.spools = {sid: bytearray()}
        self.spools[sid] += rpc.data
        if rpc.done:
            self.installed.append((rpc.vote, rpc.meta, bytes(self.spools.pop(sid))))
        return json_response(InstallSnapshotResponse(self.current_vote))


@dataclass
class Recorder:
    """A RaftHandler for end-to-end tests: records calls, answers like a follower at ``my_vote``."""

    my_vote: Vote = field(default_factory=lambda: vote(1))
    fail_with: BaseException | None = None
    stall: asyncio.Event | None = None
    """When set, append_entries waits on it (a handler slower than the deadline)."""
    appends: list[AppendEntriesRequest] = field(default_factory=list)
    votes: list[VoteRequest] = field(default_factory=list)
    installed: list[tuple[Vote, SnapshotMeta, str]] = field(default_factory=list)
    """(vote, meta, sha256 hex of the data) per installed snapshot."""
    transfers: list[TransferLeaderRequest] = field(default_factory=list)

    def current_vote(self) -> Vote:
        return self.my_vote

    async def append_entries(self, rpc: AppendEntriesRequest) -> Success:
        if self.fail_with is not None:
            raise self.fail_with
        if self.stall is not None:
            await self.stall.wait()
        self.appends.append(rpc)
        return Success()

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        if self.fail_with is not None:
            raise self.fail_with
        self.votes.append(rpc)
        return VoteResponse(self.my_vote, rpc.vote >= self.my_vote, None)

    async def handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.transfers.append(rpc)

    async def install_full_snapshot(self, v: Vote, snapshot: Snapshot) -> SnapshotResponse:
        digest = await asyncio.to_thread(lambda: hashlib.file_digest(snapshot.data, "sha256"))
        self.installed.append((v, snapshot.meta, digest.hexdigest()))
        return SnapshotResponse(self.my_vote)


class GatedFile(io.BytesIO):
    """Reads past ``open_bytes`` block (in the reading thread) until ``gate`` is set."""

    def __init__(self, data: bytes, open_bytes: int) -> None:
        super().__init__(data)
        self.open_bytes = open_bytes
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def read(self, n: int | None = -1) -> bytes:
        if self.tell() >= self.open_bytes:
            self.blocked.set()
            self.gate.wait(30)
        return super().read(n)


class DroppingProxy:
    """A TCP proxy to ``port``; cuts the first ``drops`` connections that send > ``after`` bytes."""

    def __init__(self, port: int, *, after: int, drops: int) -> None:
        self.port = port
        self.after = after
        self.drops = drops
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        sr, sw = await asyncio.open_connection("127.0.0.1", self.port)
        sent = 0

        async def upstream() -> None:
            nonlocal sent
            while data := await cr.read(65536):
                sent += len(data)
                if sent > self.after and self.dropped < self.drops:
                    self.dropped += 1
                    sw.write(data[: len(data) - (sent - self.after)])
                    await sw.drain()
                    raise ConnectionResetError("proxy drop")
                sw.write(data)
                await sw.drain()

        async def downstream() -> None:
            while data := await sr.read(65536):
                cw.write(data)
                await cw.drain()

        try:
            up = asyncio.ensure_future(upstream())
            down = asyncio.ensure_future(downstream())
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for w in (cw, sw):
                transport = w.transport
                transport.abort()
            self.tasks.discard(task)
