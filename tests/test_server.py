"""The HTTP server against real requests: every route, every error kind, snapshot streaming."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import raft_http.spool
from raft_http.errors import APIError, Fatal, SnapshotMismatch
from raft_http.server import SNAPSHOT_SPOOL, raft_app
from raft_http.spool import SpoolLimits, spool_files
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    TRANSFER_LEADER_REQUEST,
    VOTE_REQUEST,
    AppendEntriesRequest,
    Entry,
    Normal,
    SnapshotMeta,
    VoteRequest,
)

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .server_helpers import (
        CountedBody,
        RecordingHandler,
        body_stream,
        sha256_of_stream_sync,
        snapshot_bytes,
    )
    from .wire_helpers import log_id, snapshot_headers, snapshot_meta, vote
except ImportError:
    from server_helpers import (  # type: ignore[no-redef]
        CountedBody,
        RecordingHandler,
        body_stream,
        sha256_of_stream_sync,
        snapshot_bytes,
    )
    from wire_helpers import (  # type: ignore[no-redef]
        log_id,
        snapshot_headers,
        snapshot_meta,
        vote,
    )

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(my_vote=vote(2))


@pytest.fixture
async def make(
    aiohttp_client: Callable[..., Awaitable[Client]], handler: RecordingHandler, tmp_path: Path
) -> MakeClient:
    async def build(**options: Any) -> Client:
        options.setdefault("spool_dir", tmp_path / "spool")
        return await aiohttp_client(raft_app(handler, **options))

    return build


@pytest.fixture
async def client(make: MakeClient) -> Client:
    return await make()


def vote_body(term: int = 3) -> bytes:
    return VOTE_REQUEST.encode(VoteRequest(vote(term, 2, False), log_id(1, 5)))


def append_body(term: int = 2) -> bytes:
    rpc = AppendEntriesRequest(
        vote=vote(term),
        prev_log_id=log_id(1, 4),
        entries=[Entry(log_id(term, 5), Normal(data=msgspec.Raw(b'{"set":["k","v"]}')))],
        leader_commit=log_id(1, 4),
    )
    return APPEND_ENTRIES_REQUEST.encode(rpc)


async def error_of(resp: aiohttp.ClientResponse, status: int, kind: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["kind"] == kind, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


async def held(client: Client, snapshot_id: str = "snap-1") -> int:
    async with client.head("/snapshot", headers={"Raft-Snapshot-Id": snapshot_id}) as resp:
        assert resp.status == 200
        return int(resp.headers["Raft-Snapshot-Offset"])


async def assert_nothing_kept(client: Client, handler: RecordingHandler, tmp_path: Path) -> None:
    """A refused upload reached no handler, and left no bytes held and no spool file."""
    assert handler.calls == []
    assert await held(client) == 0
    assert spool_files(tmp_path / "spool") == []


# --- /vote and /append ---------------------------------------------------------------


async def test_vote_is_handed_to_the_handler_and_answered(
    client: Client, handler: RecordingHandler
) -> None:
    resp = await client.post("/vote", data=vote_body(3), headers=JSON)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {
        "vote": {"leader_id": {"term": 3, "node_id": 2}, "committed": False},
        "vote_granted": True,
        "last_log_id": None,
    }
    assert handler.calls == [("vote", VOTE_REQUEST.decode(vote_body(3)))]


async def test_transfer_leader_is_handed_to_the_handler(
    client: Client, handler: RecordingHandler
) -> None:
    body = b'{"from_leader":{"leader_id":{"term":3,"node_id":1},"committed":true},'
    body += b'"to_node_id":2,"last_log_id":{"leader_id":{"term":3,"node_id":1},"index":9}}'
    resp = await client.post("/transfer-leader", data=body, headers=JSON)
    assert resp.status == 200
    assert await resp.json() == {}
    assert handler.calls == [("handle_transfer_leader", TRANSFER_LEADER_REQUEST.decode(body))]
    bad = await client.post("/transfer-leader", data=b'{"to_node_id":-1}', headers=JSON)
    assert bad.status == 400
    assert (await bad.json())["error"]["kind"] == "bad_request"
    handler.fail_with = Fatal("stopped")
    resp = await client.post("/transfer-leader", data=body, headers=JSON)
    assert resp.status == 503
    assert (await resp.json())["error"]["kind"] == "fatal"
    assert len(handler.calls) == 2


async def test_append_passes_entries_through_and_answers_tagged(
    client: Client, handler: RecordingHandler
) -> None:
    resp = await client.post("/append", data=append_body(), headers=JSON)
    assert resp.status == 200
    assert await resp.json() == {"type": "success"}
    [(name, rpc)] = handler.calls
    assert name == "append_entries"
    assert rpc == APPEND_ENTRIES_REQUEST.decode(append_body())
    assert bytes(rpc.entries[0].payload.data) == b'{"set":["k","v"]}'

    stale = await client.post("/append", data=append_body(term=1), headers=JSON)
    assert await stale.json() == {
        "type": "higher_vote",
        "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True},
    }


async def test_json_content_type_with_charset_is_accepted(client: Client) -> None:
    resp = await client.post(
        "/vote", data=vote_body(), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert resp.status == 200


async def test_malformed_json_is_400(client: Client, handler: RecordingHandler) -> None:
    for path in ("/vote", "/append"):
        resp = await client.post(path, data=b'{"vote": ', headers=JSON)
        err = await error_of(resp, 400, "bad_request")
        assert "malformed" in err["message"] or "truncated" in err["message"]
    assert handler.calls == []


async def test_invalid_field_is_400_naming_the_path(
    client: Client, handler: RecordingHandler
) -> None:
    body = json.loads(vote_body())
    body["vote"]["leader_id"]["term"] = -1
    resp = await client.post("/vote", json=body)
    err = await error_of(resp, 400, "bad_request")
    assert "$.vote.leader_id.term" in err["message"]

    body = json.loads(append_body())
    body["entries"][0]["payload"]["type"] = "nonsense"
    resp = await client.post("/append", json=body)
    err = await error_of(resp, 400, "bad_request")
    assert "$.entries[0].payload" in err["message"]
    assert handler.calls == []


async def test_wrong_content_type_is_415(client: Client, handler: RecordingHandler) -> None:
    resp = await client.post("/vote", data=vote_body(), headers={"Content-Type": "text/plain"})
    err = await error_of(resp, 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    resp = await client.post("/append", data=append_body())  # no content type at all
    await error_of(resp, 415, "unsupported_media_type")
    resp = await client.post("/snapshot", data=b"x", headers={"Content-Type": "text/plain"})
    await error_of(resp, 415, "unsupported_media_type")
    assert handler.calls == []


async def test_body_over_max_body_size_is_413_json(
    make: MakeClient, handler: RecordingHandler
) -> None:
    client = await make(max_body_size=1000)
    big = b'{"vote": "' + b"x" * 2000 + b'"}'
    resp = await client.post("/vote", data=big, headers=JSON)  # Content-Length known
    err = await error_of(resp, 413, "payload_too_large")
    assert err["limit"] == 1000

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 300

    resp = await client.post("/append", data=chunked(), headers=JSON)  # no Content-Length
    err = await error_of(resp, 413, "payload_too_large")
    assert err["limit"] == 1000
    assert handler.calls == []
    # a body just at the limit passes the size check
    resp = await client.post("/vote", data=vote_body().ljust(1000), headers=JSON)
    assert resp.status == 200


# --- auth, cluster, routing, handler failures ------------------------------------------


async def test_token_is_required_and_compared(make: MakeClient, handler: RecordingHandler) -> None:
    client = await make(token="s3cret")
    resp = await client.post("/vote", data=vote_body(), headers=JSON)
    err = await error_of(resp, 401, "unauthorized")
    assert "s3cret" not in err["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in ("Bearer nope", "s3cret", "Bearer s3cret2", "Basic s3cret"):
        resp = await client.post(
            "/vote", data=vote_body(), headers={**JSON, "Authorization": wrong}
        )
        await error_of(resp, 401, "unauthorized")
    head = await client.head("/snapshot", headers={"Raft-Snapshot-Id": "x"})
    assert head.status == 401
    assert handler.calls == []
    resp = await client.post(
        "/vote", data=vote_body(), headers={**JSON, "Authorization": "Bearer s3cret"}
    )
    assert resp.status == 200


async def test_cluster_name_is_required_and_auth_comes_first(
    make: MakeClient, handler: RecordingHandler
) -> None:
    client = await make(token="t", cluster="prod")
    auth = {"Authorization": "Bearer t"}
    resp = await client.post("/vote", data=vote_body(), headers={**JSON, **auth})
    err = await error_of(resp, 412, "cluster_mismatch")
    assert "prod" in err["message"]
    resp = await client.post(
        "/vote", data=vote_body(), headers={**JSON, **auth, "Raft-Cluster": "staging"}
    )
    await error_of(resp, 412, "cluster_mismatch")
    resp = await client.post(
        "/vote",
        data=vote_body(),
        headers={**JSON, "Authorization": "Bearer x", "Raft-Cluster": "x"},
    )
    await error_of(resp, 401, "unauthorized")
    assert handler.calls == []
    resp = await client.post(
        "/vote", data=vote_body(), headers={**JSON, **auth, "Raft-Cluster": "prod"}
    )
    assert resp.status == 200


async def test_unknown_route_and_wrong_method_are_json(make: MakeClient) -> None:
    client = await make(token="t")
    resp = await client.get("/nope", headers={"Authorization": "Bearer t"})
    await error_of(resp, 404, "not_found")
    resp = await client.get("/vote", headers={"Authorization": "Bearer t"})
    await error_of(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"
    resp = await client.get("/nope")  # auth before routing: do not reveal routes
    await error_of(resp, 401, "unauthorized")


async def test_handler_failures_map_to_503_and_500(
    client: Client, handler: RecordingHandler, caplog: pytest.LogCaptureFixture
) -> None:
    handler.fail_with = Fatal("storage is gone")
    err = await error_of(await client.post("/vote", data=vote_body(), headers=JSON), 503, "fatal")
    assert err["message"] == "storage is gone"

    handler.fail_with = APIError("not_leader", "ask node 3")
    resp = await client.post("/append", data=append_body(), headers=JSON)
    err = await error_of(resp, 503, "raft_error")
    assert "not_leader" in err["message"]
    assert "ask node 3" in err["message"]

    handler.fail_with = ZeroDivisionError("secret detail")
    err = await error_of(
        await client.post("/vote", data=vote_body(), headers=JSON), 500, "internal"
    )
    assert "secret" not in err["message"]
    assert "Traceback" not in err["message"]
    assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)


# --- streamed snapshots ----------------------------------------------------------------


async def test_full_snapshot_is_streamed_installed_and_spool_deleted(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(read_chunk_size=64 * 1024)
    total = 3 * 1024 * 1024 + 12345
    meta = snapshot_meta("snap-full")
    resp = await client.post(
        "/snapshot", data=body_stream(total, 50_000), headers=snapshot_headers(vote(2), meta, total)
    )
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {
        "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True}
    }
    [installed] = handler.installed
    assert installed.meta == meta
    assert installed.vote == vote(2)
    assert installed.size == total
    assert installed.position_at_start == 0
    assert installed.sha256 == sha256_of_stream_sync(total)
    assert spool_files(tmp_path / "spool") == []
    assert await held(client, "snap-full") == 0


async def test_snapshot_with_content_length_and_empty_snapshot(
    client: Client, handler: RecordingHandler
) -> None:
    data = snapshot_bytes(100_000)
    meta = snapshot_meta("cl")
    resp = await client.post(
        "/snapshot", data=data, headers=snapshot_headers(vote(2), meta, len(data))
    )
    assert resp.status == 200, await resp.text()
    empty = snapshot_meta("empty")
    resp = await client.post("/snapshot", data=b"", headers=snapshot_headers(vote(2), empty, 0))
    assert resp.status == 200, await resp.text()
    assert [(i.meta.snapshot_id, i.size) for i in handler.installed] == [
        ("cl", 100_000),
        ("empty", 0),
    ]


async def test_stale_snapshot_is_answered_without_reading_the_body(
    client: Client, handler: RecordingHandler, tmp_path: Path
) -> None:
    total = 1024 * 1024 * 1024
    # vote(1) < vote(2); an incomparable vote (same term, other candidate) is refused too
    for stale in (vote(1), vote(2, node_id=3, committed=False)):
        body = CountedBody(total)
        headers = snapshot_headers(stale, snapshot_meta(), total)
        async with client.post("/snapshot", data=body.stream(), headers=headers) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True}
            }
        assert body.sent < 64 * 1024 * 1024
    assert handler.calls == []
    assert spool_files(tmp_path / "spool") == []


@pytest.mark.parametrize(
    ("drop", "fragment"),
    [
        ("Raft-Vote", "missing header Raft-Vote"),
        ("Raft-Snapshot-Meta", "missing header Raft-Snapshot-Meta"),
        ("Raft-Snapshot-Size", "missing header Raft-Snapshot-Size"),
        ("Raft-Snapshot-Offset", "missing header Raft-Snapshot-Offset"),
    ],
)
async def test_missing_snapshot_header_is_400(
    client: Client, handler: RecordingHandler, drop: str, fragment: str
) -> None:
    headers = snapshot_headers(vote(2), snapshot_meta(), 3)
    del headers[drop]
    err = await error_of(
        await client.post("/snapshot", data=b"abc", headers=headers), 400, "bad_request"
    )
    assert fragment in err["message"]
    assert handler.calls == []


@pytest.mark.parametrize(
    ("header", "value", "fragment"),
    [
        ("Raft-Vote", "{not json", "Raft-Vote"),
        ("Raft-Vote", '{"leader_id": {"term": "x", "node_id": 1}}', "$.leader_id.term"),
        ("Raft-Snapshot-Meta", '{"snapshot_id": 5}', "Raft-Snapshot-Meta"),
        ("Raft-Snapshot-Size", "abc", "Raft-Snapshot-Size"),
        ("Raft-Snapshot-Size", "-3", "Raft-Snapshot-Size"),
        ("Raft-Snapshot-Offset", "1.5", "Raft-Snapshot-Offset"),
        ("Raft-Snapshot-Offset", "4", "past Raft-Snapshot-Size"),
    ],
)
async def test_garbled_snapshot_header_is_400(
    client: Client, handler: RecordingHandler, header: str, value: str, fragment: str
) -> None:
    headers = snapshot_headers(vote(2), snapshot_meta(), 3)
    headers[header] = value
    err = await error_of(
        await client.post("/snapshot", data=b"abc", headers=headers), 400, "bad_request"
    )
    assert fragment in err["message"]
    assert handler.calls == []


async def test_snapshot_meta_header_with_non_ascii_escapes(
    client: Client, handler: RecordingHandler
) -> None:
    meta = snapshot_meta("snap-é-✓")
    headers = snapshot_headers(vote(2), meta, 3)
    assert headers["Raft-Snapshot-Meta"].isascii()
    resp = await client.post("/snapshot", data=b"abc", headers=headers)
    assert resp.status == 200, await resp.text()
    assert handler.installed[0].meta.snapshot_id == "snap-é-✓"


async def test_truncated_body_is_size_mismatch_and_spool_deleted(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(read_chunk_size=64 * 1024)
    total = 1_000_000
    headers = snapshot_headers(vote(2), snapshot_meta(), total)
    resp = await client.post("/snapshot", data=body_stream(total, stop=700_000), headers=headers)
    err = await error_of(resp, 400, "size_mismatch")
    assert "1000000" in err["message"]
    await assert_nothing_kept(client, handler, tmp_path)


async def test_overlong_body_is_size_mismatch_and_spool_deleted(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(read_chunk_size=64 * 1024)
    total = 500_000
    headers = snapshot_headers(vote(2), snapshot_meta(), total)
    resp = await client.post("/snapshot", data=body_stream(total + 1), headers=headers)
    await error_of(resp, 400, "size_mismatch")
    # a Content-Length that disagrees with the declared size is refused before reading
    resp = await client.post(
        "/snapshot", data=b"x" * 10, headers=snapshot_headers(vote(2), snapshot_meta(), 9)
    )
    await error_of(resp, 400, "size_mismatch")
    await assert_nothing_kept(client, handler, tmp_path)


async def test_offset_mismatch_is_409_with_expected_offset(
    client: Client, handler: RecordingHandler
) -> None:
    total = 1000
    headers = snapshot_headers(vote(2), snapshot_meta(), total, offset=400)
    resp = await client.post("/snapshot", data=b"x" * 600, headers=headers)
    err = await error_of(resp, 409, "offset_mismatch")
    assert err["expected_offset"] == 0
    assert resp.headers["Raft-Snapshot-Offset"] == "0"
    assert handler.calls == []


async def test_head_without_snapshot_id_is_400(client: Client) -> None:
    resp = await client.head("/snapshot")
    assert resp.status == 400
    assert resp.content_type == "application/json"


class RequestsDone:
    """A host-app middleware that tells when each POST /raft/snapshot is over, server side."""

    def __init__(self) -> None:
        self.finished = asyncio.Queue[int]()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        status = 0
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        finally:
            if request.method == "POST":
                self.finished.put_nowait(status)


@contextlib.asynccontextmanager
async def serve_mounted(
    app: web.Application, *, handler_cancellation: bool = True
) -> AsyncIterator[tuple[str, RequestsDone]]:
    """Serve ``app`` under ``/raft`` of a host app; yields the base URL.

    ``handler_cancellation``: aiohttp's test server cancels a handler whose client went
    away; ``web.run_app`` does not (the handler sees ConnectionResetError): test both.
    """
    done = RequestsDone()
    host = web.Application(middlewares=[done.middleware])
    host.add_subapp("/raft", app)
    runner = web.AppRunner(host, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/raft", done
    finally:
        await runner.cleanup()


async def hang_after(pieces: AsyncIterator[bytes], sent: asyncio.Event) -> AsyncIterator[bytes]:
    """Yield ``pieces``, set ``sent``, then never finish (a sender that stalls mid-body)."""
    async for piece in pieces:
        yield piece
    sent.set()
    await asyncio.sleep(3600)


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def start_stalled_upload(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: AsyncIterator[bytes]
) -> asyncio.Task[aiohttp.ClientResponse]:
    """POST ``body`` and return once all of it is sent; the upload then stalls, unfinished."""
    sent = asyncio.Event()
    upload = asyncio.create_task(session.post(url, data=hang_after(body, sent), headers=headers))
    await asyncio.wait_for(sent.wait(), 30)
    return upload


async def drop_upload(upload: asyncio.Task[aiohttp.ClientResponse], done: RequestsDone) -> None:
    """Cancel a stalled upload (drops the connection mid-body); wait until the server noticed."""
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    await asyncio.wait_for(done.finished.get(), 30)


async def poll(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait until ``check()`` holds, at most 500 tries 10 ms apart; the caller asserts after."""
    for _ in range(500):
        if await check():
            break
        await asyncio.sleep(0.01)


async def held_at(session: aiohttp.ClientSession, url: str, snapshot_id: str) -> int:
    """The Raft-Snapshot-Offset a HEAD /snapshot answers for ``snapshot_id``."""
    async with session.head(url, headers={"Raft-Snapshot-Id": snapshot_id}) as resp:
        assert resp.status == 200
        return int(resp.headers["Raft-Snapshot-Offset"])


async def drop_mid_upload(
    session: aiohttp.ClientSession,
    url: str,
    done: RequestsDone,
    meta: SnapshotMeta,
    total: int,
    stop: int,
    **extra: str,
) -> int:
    """Upload bytes [0, stop) of the test snapshot, drop the connection; returns bytes held.

    ``extra``: more headers for the upload (a Raft-Snapshot-Sha256).
    """
    sid = meta.snapshot_id
    headers = snapshot_headers(vote(2), meta, total, **extra)

    async def server_wrote_some() -> bool:
        return await held_at(session, url, sid) > 0

    while not done.finished.empty():  # forget the requests that finished before
        done.finished.get_nowait()
    upload = await start_stalled_upload(session, url, headers, body_stream(total, stop=stop))
    await poll(server_wrote_some)  # wait until the server has written something
    await drop_upload(upload, done)
    resume_at = await held_at(session, url, sid)
    assert 0 < resume_at <= stop
    return resume_at


@contextlib.asynccontextmanager
async def mounted_session(
    handler: RecordingHandler, tmp_path: Path
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, RequestsDone]]:
    """A mounted raft_app spooling to ``tmp_path``, a session, and its /snapshot URL."""
    app = raft_app(handler, spool_dir=tmp_path, read_chunk_size=64 * 1024)
    async with serve_mounted(app) as (base, done), aiohttp.ClientSession() as session:
        yield session, f"{base}/snapshot", done


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_resume_after_a_dropped_connection(
    handler: RecordingHandler, tmp_path: Path, handler_cancellation: bool
) -> None:
    app = raft_app(handler, spool_dir=tmp_path, read_chunk_size=64 * 1024)
    async with serve_mounted(app, handler_cancellation=handler_cancellation) as (base, done):
        url = f"{base}/snapshot"
        total = 4_000_000
        meta = snapshot_meta("resumable")
        async with aiohttp.ClientSession() as session:
            resume_at = await drop_mid_upload(session, url, done, meta, total, 2_500_000)
            assert len(spool_files(tmp_path)) == 1
            assert handler.installed == []

            headers = snapshot_headers(vote(2), meta, total, offset=resume_at)
            async with session.post(
                url, data=body_stream(total, start=resume_at), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
        [installed] = handler.installed
        assert installed.size == total
        assert installed.sha256 == sha256_of_stream_sync(total)
        assert spool_files(tmp_path) == []


async def test_fresh_upload_supersedes_other_partial_spools(
    handler: RecordingHandler, tmp_path: Path
) -> None:
    # a partial spool for "old" is left by a dropped connection, then "new" starts at 0
    app = raft_app(handler, spool_dir=tmp_path)
    async with serve_mounted(app) as (base, done):
        url = f"{base}/snapshot"
        async with aiohttp.ClientSession() as session:
            headers = snapshot_headers(vote(2), snapshot_meta("old"), 10**6)
            upload = await start_stalled_upload(session, url, headers, once(b"x" * 300_000))
            await asyncio.sleep(0.05)
            await drop_upload(upload, done)
            assert app[SNAPSHOT_SPOOL].snapshot_ids() == ["old"]
            headers = snapshot_headers(vote(2), snapshot_meta("new"), 5)
            async with session.post(url, data=b"12345", headers=headers) as resp:
                assert resp.status == 200
            assert await held_at(session, url, "old") == 0
        assert spool_files(tmp_path) == []


async def test_idle_partial_spool_expires(handler: RecordingHandler, tmp_path: Path) -> None:
    app = raft_app(handler, spool_dir=tmp_path, spool_idle_timeout=0.2, read_chunk_size=1024)
    async with serve_mounted(app) as (base, done):
        url = f"{base}/snapshot"

        async def spooled() -> bool:
            return bool(spool_files(tmp_path))

        async def spool_gone() -> bool:
            return not spool_files(tmp_path)

        async with aiohttp.ClientSession() as session:
            headers = snapshot_headers(vote(2), snapshot_meta(), 10**6)
            upload = await start_stalled_upload(session, url, headers, once(b"x" * 10_000))
            await poll(spooled)
            await drop_upload(upload, done)
            await poll(spool_gone)  # bounded: 5 s for a 0.2 s timeout
            assert spool_files(tmp_path) == []
            assert await held_at(session, url, "snap-1") == 0


# --- the deprecated per-chunk protocol -------------------------------------------------


def chunk_body(
    snapshot_id: str, offset: int, data: bytes, done: bool, term: int = 2
) -> dict[str, Any]:
    meta = json.loads(msgspec.json.encode(snapshot_meta(snapshot_id)))
    return {
        "vote": {"leader_id": {"term": term, "node_id": 1}, "committed": True},
        "meta": meta,
        "offset": offset,
        "data": base64.b64encode(data).decode(),
        "done": done,
    }


async def test_per_chunk_protocol_three_chunks_then_done(
    client: Client, handler: RecordingHandler, tmp_path: Path
) -> None:
    data = snapshot_bytes(300_000)
    pieces = [data[:100_000], data[100_000:200_000], data[200_000:]]
    offset = 0
    my_vote = {"vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True}}
    for piece in pieces:
        resp = await client.post("/snapshot", json=chunk_body("chunked", offset, piece, False))
        assert resp.status == 200, await resp.text()
        assert await resp.json() == my_vote
        offset += len(piece)
    assert handler.installed == []
    assert await held(client, "chunked") == 300_000
    resp = await client.post("/snapshot", json=chunk_body("chunked", offset, b"", True))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == my_vote
    [installed] = handler.installed
    assert installed.size == 300_000
    assert installed.sha256 == sha256_of_stream_sync(300_000)
    assert spool_files(tmp_path / "spool") == []


async def test_per_chunk_protocol_mismatch_is_409(
    client: Client, handler: RecordingHandler
) -> None:
    resp = await client.post("/snapshot", json=chunk_body("a", 0, b"x" * 10, False))
    assert resp.status == 200
    # wrong offset for the same id
    err = await error_of(
        await client.post("/snapshot", json=chunk_body("a", 7, b"y", False)),
        409,
        "snapshot_mismatch",
    )
    assert err["expect"] == {"snapshot_id": "a", "offset": 10}
    assert err["got"] == {"snapshot_id": "a", "offset": 7}
    # a continuation of an id the server does not hold
    err = await error_of(
        await client.post("/snapshot", json=chunk_body("b", 10, b"y", True)),
        409,
        "snapshot_mismatch",
    )
    assert err["expect"] == {"snapshot_id": "a", "offset": 10}
    assert err["got"] == {"snapshot_id": "b", "offset": 10}
    assert handler.installed == []
    assert await held(client, "a") == 10


async def test_per_chunk_protocol_stale_vote_stores_nothing(
    client: Client, handler: RecordingHandler, tmp_path: Path
) -> None:
    resp = await client.post("/snapshot", json=chunk_body("s", 0, b"abc", True, term=1))
    assert resp.status == 200
    assert await resp.json() == {
        "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True}
    }
    assert handler.calls == []
    assert spool_files(tmp_path / "spool") == []


async def test_per_chunk_body_limit_and_handler_mismatch(
    make: MakeClient, handler: RecordingHandler
) -> None:
    client = await make(max_body_size=2000)
    resp = await client.post("/snapshot", json=chunk_body("s", 0, b"x" * 3000, False))
    err = await error_of(resp, 413, "payload_too_large")
    assert err["limit"] == 2000
    # a SnapshotMismatch raised by the handler itself maps to the same 409
    handler.fail_with = SnapshotMismatch(("s", 5), ("s", 3))
    resp = await client.post("/snapshot", json=chunk_body("s", 0, b"abc", True))
    err = await error_of(resp, 409, "snapshot_mismatch")
    assert err["expect"] == {"snapshot_id": "s", "offset": 5}


# --- memory ------------------------------------------------------------------------


async def test_64_mib_snapshot_streams_with_bounded_memory(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    handler: RecordingHandler,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    total = 64 * 1024 * 1024 + 777
    server = await aiohttp_server(raft_app(handler, spool_dir=tmp_path))
    url = server.make_url("/snapshot")
    headers = snapshot_headers(vote(2), snapshot_meta("big"), total)
    async with aiohttp.ClientSession() as session:
        gc.collect()
        tracemalloc.start()
        try:
            async with session.post(
                url, data=body_stream(total, 256 * 1024), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    with capsys.disabled():
        print(f"\n64 MiB snapshot upload: tracemalloc peak {peak / 2**20:.2f} MiB")
    assert peak < 16 * 1024 * 1024
    [installed] = handler.installed
    assert installed.size == total
    assert installed.sha256 == sha256_of_stream_sync(total)


async def test_the_body_reaches_the_spool_in_batches_not_per_chunk(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    handler: RecordingHandler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One append (one thread hop) per ~2 MiB, whatever the sender's chunks or the read unit."""
    total = 9 * 1024 * 1024 + 5
    app = raft_app(handler, spool_dir=tmp_path, read_chunk_size=64 * 1024)
    spool = app[SNAPSHOT_SPOOL]
    batches: list[int] = []
    append = spool.append

    async def counting(lease: Any, data: Any) -> int:
        batches.append(sum(len(piece) for piece in data))
        return await append(lease, data)

    monkeypatch.setattr(spool, "append", counting)
    server = await aiohttp_server(app)
    headers = snapshot_headers(vote(2), snapshot_meta("batched"), total)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/snapshot"), data=body_stream(total, 16 * 1024), headers=headers
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert sum(batches) == total
    assert len(batches) <= 6, batches  # 144 read chunks of 64 KiB, 576 sent chunks of 16 KiB
    assert max(batches) <= 2 * 1024 * 1024 + 64 * 1024
    [installed] = handler.installed
    assert installed.sha256 == sha256_of_stream_sync(total)


# --- mounting and running alone ------------------------------------------------------


async def test_mounts_under_a_prefix_beside_host_routes(
    aiohttp_server: Callable[..., Awaitable[TestServer]], handler: RecordingHandler
) -> None:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    host = web.Application()
    host.router.add_get("/health", health)
    sub = raft_app(handler, token="t")
    host.add_subapp("/raft", sub)
    server = await aiohttp_server(host)
    auth = {"Authorization": "Bearer t"}
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/health")) as resp:
            assert await resp.json() == {"ok": True}  # host routes are not behind the token
        async with session.post(
            server.make_url("/raft/vote"), data=vote_body(), headers={**JSON, **auth}
        ) as resp:
            assert resp.status == 200
        async with session.post(server.make_url("/raft/nope"), headers=auth) as resp:
            await error_of(resp, 404, "not_found")
        total = 2 * 1024 * 1024  # over the host's 1 MiB client_max_size: not applied to streams
        async with session.post(
            server.make_url("/raft/snapshot"),
            data=body_stream(total),
            headers={**auth, **snapshot_headers(vote(2), snapshot_meta(), total)},
        ) as resp:
            assert resp.status == 200, await resp.text()
    spool_dir = sub[SNAPSHOT_SPOOL].directory
    assert spool_dir.is_dir()
    await server.close()
    assert not spool_dir.exists()  # the temp spool dir is removed at cleanup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_runs_alone_with_run_app(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from aiohttp import web\n"
        "from raft_http.server import raft_app\n"
        "from server_helpers import RecordingHandler\n"
        "web.run_app(raft_app(RecordingHandler()), host='127.0.0.1', port=int(sys.argv[1]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port), str(Path(__file__).parent)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/vote", data=vote_body(), headers=JSON
                    ) as resp:
                        assert resp.status == 200
                        assert (await resp.json())["vote_granted"] is True
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the standalone server did not come up")
    finally:
        proc.kill()
        proc.wait(10)


async def test_body_shorter_than_its_content_length_reaches_no_handler(
    client: Client, handler: RecordingHandler
) -> None:
    """A sender that declares more than it sends, then half-closes: nothing is handed on.

    aiohttp treats the half-close as a lost connection, so there is nobody to answer;
    what matters is that the handler never sees a partial body and the server goes on.
    """
    body = append_body()
    head = (
        f"POST /append HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) + 50}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + body)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer == b"" or b" 400 " in answer.partition(b"\r\n")[0], answer
    assert handler.names() == []
    async with client.post("/append", data=append_body(), headers=JSON) as resp:
        assert resp.status == 200
    assert handler.names() == ["append_entries"]


# --- end-to-end checksum (Raft-Snapshot-Sha256) ----------------------------------------


class ChecksumRecordingHandler(RecordingHandler):
    """Also records the ``sha256`` each installed Snapshot carried."""

    def __init__(self, my_vote: Any) -> None:
        super().__init__(my_vote=my_vote)
        self.given_sha256: list[str | None] = []

    async def install_full_snapshot(self, v: Any, snapshot: Any) -> Any:
        self.given_sha256.append(snapshot.sha256)
        return await super().install_full_snapshot(v, snapshot)


def wrong_digest(right: str) -> str:
    return ("0" if right[0] != "0" else "1") + right[1:]


async def test_snapshot_with_the_right_checksum_installs_and_carries_it(
    aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    handler = ChecksumRecordingHandler(vote(2))
    client = await aiohttp_client(
        raft_app(handler, spool_dir=tmp_path / "spool", read_chunk_size=64 * 1024)
    )
    total = 1_000_000 + 7
    digest = sha256_of_stream_sync(total)
    headers = snapshot_headers(
        vote(2), snapshot_meta("summed"), total, **{"Raft-Snapshot-Sha256": digest}
    )
    resp = await client.post("/snapshot", data=body_stream(total, 50_000), headers=headers)
    assert resp.status == 200, await resp.text()
    # upper-case hex is accepted and handed on normalised
    data = snapshot_bytes(1000)
    upper = sha256_of_stream_sync(1000).upper()
    headers = snapshot_headers(
        vote(2), snapshot_meta("upper"), 1000, **{"Raft-Snapshot-Sha256": upper}
    )
    resp = await client.post("/snapshot", data=data, headers=headers)
    assert resp.status == 200, await resp.text()
    # no header: no check, and the handler is told nothing is known
    resp = await client.post(
        "/snapshot", data=data, headers=snapshot_headers(vote(2), snapshot_meta("plain"), 1000)
    )
    assert resp.status == 200, await resp.text()
    assert [(i.meta.snapshot_id, i.sha256) for i in handler.installed] == [
        ("summed", digest),
        ("upper", upper.lower()),
        ("plain", sha256_of_stream_sync(1000)),
    ]
    assert handler.given_sha256 == [digest, upper.lower(), None]
    assert [i.position_at_start for i in handler.installed] == [0, 0, 0]
    assert spool_files(tmp_path / "spool") == []


async def test_snapshot_with_a_wrong_checksum_is_refused_and_spool_deleted(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(read_chunk_size=64 * 1024)
    total = 700_000
    right = sha256_of_stream_sync(total)
    wrong = wrong_digest(right)
    headers = snapshot_headers(vote(2), snapshot_meta(), total, **{"Raft-Snapshot-Sha256": wrong})
    resp = await client.post("/snapshot", data=body_stream(total), headers=headers)
    err = await error_of(resp, 400, "checksum_mismatch")
    assert wrong in err["message"]
    assert right in err["message"]
    await assert_nothing_kept(client, handler, tmp_path)


@pytest.mark.parametrize(
    "value",
    ["abc", "g" * 64, "a" * 63, "a" * 65, "sha256:" + "a" * 64, "", "a" * 32 + " " + "a" * 31],
)
async def test_garbled_checksum_header_is_400_naming_it(
    client: Client, handler: RecordingHandler, tmp_path: Path, value: str
) -> None:
    headers = snapshot_headers(vote(2), snapshot_meta(), 3, **{"Raft-Snapshot-Sha256": value})
    err = await error_of(
        await client.post("/snapshot", data=b"abc", headers=headers), 400, "bad_request"
    )
    assert "Raft-Snapshot-Sha256" in err["message"]
    assert handler.calls == []
    assert spool_files(tmp_path / "spool") == []


async def test_resumed_upload_verifies_the_whole_file(
    handler: RecordingHandler, tmp_path: Path
) -> None:
    """A resume whose tail does not belong to the head is caught; a right one installs."""
    total = 2_000_000
    right = sha256_of_stream_sync(total)
    meta = snapshot_meta("resumable")
    extra = {"Raft-Snapshot-Sha256": right}
    async with mounted_session(handler, tmp_path) as (session, url, done):
        # 1. dropped, then resumed with a tail of other bytes: right size, wrong data
        at = await drop_mid_upload(session, url, done, meta, total, 1_200_000, **extra)
        headers = snapshot_headers(vote(2), meta, total, offset=at, **extra)
        async with session.post(url, data=b"\0" * (total - at), headers=headers) as resp:
            err = await error_of(resp, 400, "checksum_mismatch")
        assert right in err["message"]
        assert handler.calls == []
        assert spool_files(tmp_path) == []

        # 2. dropped, then resumed with the right tail: verified and installed
        at = await drop_mid_upload(session, url, done, meta, total, 1_200_000, **extra)
        headers = snapshot_headers(vote(2), meta, total, offset=at, **extra)
        async with session.post(url, data=body_stream(total, start=at), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    [installed] = handler.installed
    assert (installed.size, installed.sha256) == (total, right)
    assert spool_files(tmp_path) == []


async def test_resume_with_another_checksum_is_refused_and_spool_deleted(
    handler: RecordingHandler, tmp_path: Path
) -> None:
    total = 1_000_000
    right = sha256_of_stream_sync(total)
    meta = snapshot_meta("resumable")
    async with mounted_session(handler, tmp_path) as (session, url, done):
        for started, resumed in [(right, wrong_digest(right)), (right, None), (None, right)]:
            first = {"Raft-Snapshot-Sha256": started} if started else {}
            at = await drop_mid_upload(session, url, done, meta, total, 600_000, **first)
            second = {"Raft-Snapshot-Sha256": resumed} if resumed else {}
            headers = snapshot_headers(vote(2), meta, total, offset=at, **second)
            async with session.post(
                url, data=body_stream(total, start=at), headers=headers
            ) as resp:
                err = await error_of(resp, 400, "checksum_mismatch")
            assert "started with" in err["message"]
            assert spool_files(tmp_path) == []
            assert await held_at(session, url, "resumable") == 0
    assert handler.calls == []


async def test_per_chunk_fragment_cannot_continue_a_checksummed_upload(
    handler: RecordingHandler, tmp_path: Path
) -> None:
    total = 1_000_000
    meta = snapshot_meta("resumable")
    extra = {"Raft-Snapshot-Sha256": sha256_of_stream_sync(total)}
    async with mounted_session(handler, tmp_path) as (session, url, done):
        at = await drop_mid_upload(session, url, done, meta, total, 600_000, **extra)
        body = chunk_body("resumable", at, b"x", done=True)
        async with session.post(url, json=body) as resp:
            err = await error_of(resp, 409, "snapshot_mismatch")
        assert err["expect"] == {"snapshot_id": "resumable", "offset": 0}
        assert spool_files(tmp_path) == []
    assert handler.calls == []


# --- spool limits ------------------------------------------------------------------------


async def test_a_snapshot_over_the_size_cap_is_refused_before_its_body(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(spool_limits=SpoolLimits(max_snapshot_size=1_000_000))
    total = 200 * 1024**3  # declared; the body would never end
    body = CountedBody(total)
    headers = snapshot_headers(vote(2), snapshot_meta(), total)
    async with client.post("/snapshot", data=body.stream(), headers=headers) as resp:
        err = await error_of(resp, 413, "snapshot_too_large")
    assert err["limit"] == 1_000_000
    assert body.sent < 64 * 1024 * 1024
    # The per-chunk form has no declared size: it is refused once what it holds passes.
    resp = await client.post("/snapshot", json=chunk_body("snap-1", 0, b"x" * 900_000, False))
    assert resp.status == 200, await resp.text()
    body = chunk_body("snap-1", 900_000, b"x" * 200_000, True)
    await error_of(await client.post("/snapshot", json=body), 413, "snapshot_too_large")
    await assert_nothing_kept(client, handler, tmp_path)


async def test_a_snapshot_over_the_free_space_is_refused_with_507(
    make: MakeClient,
    handler: RecordingHandler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await make(spool_limits=SpoolLimits(reserve_bytes=1_000_000))
    monkeypatch.setattr(raft_http.spool, "free_bytes", lambda directory: 3_000_000)
    headers = snapshot_headers(vote(2), snapshot_meta(), 2_000_001)
    resp = await client.post("/snapshot", data=body_stream(2_000_001), headers=headers)
    err = await error_of(resp, 507, "insufficient_storage")
    assert "reserve" in err["message"]
    await assert_nothing_kept(client, handler, tmp_path)
    # Within free space minus the reserve it is accepted.
    headers = snapshot_headers(vote(2), snapshot_meta(), 2_000_000)
    resp = await client.post("/snapshot", data=body_stream(2_000_000), headers=headers)
    assert resp.status == 200, await resp.text()


async def test_a_disk_filling_up_during_an_upload_stops_it_with_507(
    make: MakeClient,
    handler: RecordingHandler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await make(spool_limits=SpoolLimits(reserve_bytes=1_000_000))
    free = [10_000_000]
    monkeypatch.setattr(raft_http.spool, "free_bytes", lambda directory: free[0])
    total = 4_000_000

    async def body() -> AsyncIterator[bytes]:
        async for piece in body_stream(total):
            if len(piece) and free[0] > 2_000_000:
                free[0] -= 1_000_000  # something else takes the disk meanwhile
            yield piece

    headers = snapshot_headers(vote(2), snapshot_meta(), total)
    resp = await client.post("/snapshot", data=body(), headers=headers)
    await error_of(resp, 507, "insufficient_storage")
    await assert_nothing_kept(client, handler, tmp_path)


async def test_too_many_snapshots_being_installed_gives_a_retryable_503(
    make: MakeClient, handler: RecordingHandler, tmp_path: Path
) -> None:
    client = await make(spool_limits=SpoolLimits(max_uploads=1))
    entered, release = asyncio.Event(), asyncio.Event()
    installing = handler.install_full_snapshot

    async def slow_install(v: Any, snapshot: Any) -> Any:
        entered.set()
        await release.wait()
        return await installing(v, snapshot)

    handler.install_full_snapshot = slow_install  # type: ignore[method-assign]
    data = snapshot_bytes(1000)
    first = asyncio.ensure_future(
        client.post(
            "/snapshot", data=data, headers=snapshot_headers(vote(2), snapshot_meta("a"), 1000)
        )
    )
    async with asyncio.timeout(10):
        await entered.wait()  # "a" is being installed: a new upload cannot supersede it
        headers = snapshot_headers(vote(2), snapshot_meta("b"), 1000)
        resp = await client.post("/snapshot", data=data, headers=headers)
        await error_of(resp, 503, "spool_full")
        assert resp.headers["Retry-After"] == "5"
        release.set()
        assert (await first).status == 200
        resp = await client.post("/snapshot", data=data, headers=headers)
        assert resp.status == 200, await resp.text()
    assert [i.meta.snapshot_id for i in handler.installed] == ["a", "b"]
