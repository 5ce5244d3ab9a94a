"""The HTTP client against hand-written servers: round trips, every error kind, snapshots."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from client_helpers import (
    DroppingProxy,
    FakeRaft,
    GatedFile,
    Recorder,
    ShortFile,
    append_request,
    error_response,
    free_port,
    json_response,
    vote_request,
)
from raft_http.client import HttpNetwork, HttpNetworkFactory, parse_node_address
from raft_http.errors import (
    APIError,
    Closed,
    Fatal,
    NetworkError,
    PayloadTooLarge,
    RemoteError,
    ReplicationClosed,
    RPCError,
    SnapshotMismatch,
    SnapshotTransferError,
    StreamingError,
    Timeout,
    Unreachable,
)
from raft_http.network import Backoff, RPCOption
from raft_http.server import raft_app
from raft_http.types import (
    InstallSnapshotRequest,
    Node,
    PartialSuccess,
    Snapshot,
    SnapshotResponse,
    Success,
    TransferLeaderRequest,
)
from wire_helpers import log_id, snapshot_meta, vote

ServerFactory = Callable[..., Awaitable[TestServer]]
OPT = RPCOption(hard_ttl=5.0)
SHORT = RPCOption(hard_ttl=0.3)


def addr(server: TestServer) -> Node:
    return Node(f"127.0.0.1:{server.port}")


@pytest.fixture
async def factory() -> AsyncIterator[HttpNetworkFactory]:
    async with HttpNetworkFactory() as f:
        yield f


async def fake_server(aiohttp_server: ServerFactory, raft: FakeRaft) -> HttpNetwork:
    server = await aiohttp_server(raft.app())
    return HttpNetworkFactory(token=raft.token, cluster=raft.cluster).new_client(2, addr(server))


def acquired(session: aiohttp.ClientSession) -> int:
    """Connections checked out of the pool (private, but the only way to see a leak)."""
    connector = session.connector
    assert connector is not None
    return len(connector._acquired)  # type: ignore[attr-defined]


def never() -> asyncio.Future[ReplicationClosed]:
    return asyncio.get_running_loop().create_future()


def snapshot_of(data: bytes, snapshot_id: str = "snap-1") -> Snapshot:
    return Snapshot(snapshot_meta(snapshot_id), io.BytesIO(data))


def summed(data: bytes, snapshot_id: str = "snap-1", sha256: str | None = None) -> Snapshot:
    digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    return Snapshot(snapshot_meta(snapshot_id), io.BytesIO(data), sha256=digest)


async def single_route(
    aiohttp_server: ServerFactory,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    method: str = "POST",
    path: str = "/append",
) -> Node:
    app = web.Application()
    app.router.add_route(method, path, handler)
    return addr(await aiohttp_server(app))


# --- addresses and factory lifecycle ----------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080/append"),
        ("node-1.example:81", "http://node-1.example:81/append"),
        ("[::1]:9000", "http://[::1]:9000/append"),
        ("http://h:1", "http://h:1/append"),
        ("https://h:8443/raft", "https://h:8443/raft/append"),
        ("https://h/raft/", "https://h/raft/append"),
    ],
)
def test_parse_node_address_accepts(address: str, expected: str) -> None:
    assert str(parse_node_address(address) / "append") == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "127.0.0.1",
        "host:notaport",
        "host:8080/prefix",
        "ftp://h:21",
        "http://:80",
        "http://h:1/x?q=1",
        "http://h:1/#frag",
        "http://user:pw@h:1",
        " h:1",
    ],
)
def test_new_client_rejects_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="node address"):
        HttpNetworkFactory().new_client(1, Node(address))


def test_new_client_outside_a_loop_is_lazy() -> None:
    f = HttpNetworkFactory()
    net = f.new_client(3, Node("https://n3:8443/raft"))
    assert net.append_url.path == "/raft/append"
    assert net.snapshot_url.path == "/raft/snapshot"
    assert f._session is None
    assert f._snapshot_session is None


def test_backoff_default_and_custom() -> None:
    net = HttpNetworkFactory().new_client(1, Node("h:1"))
    assert [next(net.backoff()) for _ in range(2)] == [0.5, 0.5]
    f = HttpNetworkFactory(backoff=lambda: Backoff.constant(0.1))
    assert next(f.new_client(1, Node("h:1")).backoff()) == 0.1


async def test_close_keeps_a_borrowed_session_open(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    node = addr(await aiohttp_server(raft.app()))
    async with aiohttp.ClientSession() as borrowed:
        async with HttpNetworkFactory(borrowed) as f:
            assert await f.new_client(2, node).vote(vote_request(), OPT)
            owned_snapshot_pool = f.snapshot_session()
        assert not borrowed.closed
        assert owned_snapshot_pool.closed
        with pytest.raises(RuntimeError, match="closed"):
            f.session()


async def test_close_closes_owned_sessions(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    node = addr(await aiohttp_server(raft.app()))
    f = HttpNetworkFactory()
    await f.new_client(2, node).append_entries(append_request(), OPT)
    session = f.session()
    await f.close()
    assert session.closed


# --- RPC round trips ------------------------------------------------------------------


async def test_append_and_vote_round_trip_with_headers(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(token="s3cret", cluster="prod")
    net = await fake_server(aiohttp_server, raft)
    try:
        rpc = append_request(3)
        assert await net.append_entries(rpc, OPT) == Success()
        assert raft.appends == [rpc]
        answer = await net.vote(vote_request(4), OPT)
        assert answer.vote_granted
        assert answer.vote == vote_request(4).vote
        assert raft.votes == [vote_request(4)]
        for headers in raft.headers:
            assert headers["Authorization"] == "Bearer s3cret"
            assert headers["Raft-Cluster"] == "prod"
            assert headers["Content-Type"] == "application/json"
    finally:
        await net.factory.close()


async def test_keep_alive_reuses_one_connection(aiohttp_server: ServerFactory) -> None:
    peers: set[Any] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return json_response(PartialSuccess(None))

    node = await single_route(aiohttp_server, handler)
    async with HttpNetworkFactory() as f:
        net = f.new_client(2, node)
        for _ in range(5):
            assert await net.append_entries(append_request(1), OPT) == PartialSuccess(None)
    assert len(peers) == 1


# --- error mapping --------------------------------------------------------------------


async def test_closed_port_is_unreachable(factory: HttpNetworkFactory) -> None:
    net = factory.new_client(7, Node(f"127.0.0.1:{free_port()}"))
    with pytest.raises(Unreachable) as info:
        await net.append_entries(append_request(), OPT)
    assert info.value.target == 7
    with pytest.raises(Unreachable):
        await net.full_snapshot(vote(1), snapshot_of(b"x" * 10), never(), OPT)


async def test_unknown_host_is_unreachable(factory: HttpNetworkFactory) -> None:
    net = factory.new_client(7, Node("no-such-host.invalid:80"))
    with pytest.raises(Unreachable):
        await net.vote(vote_request(), OPT)


async def test_handler_past_the_deadline_is_timeout(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return json_response(Success())

    node = await single_route(aiohttp_server, stall)
    try:
        with pytest.raises(Timeout) as info:
            await factory.new_client(2, node).append_entries(append_request(), SHORT)
        assert info.value.timeout == SHORT.hard_ttl
        assert info.value.action == "append_entries"
        assert acquired(factory.session()) == 0
    finally:
        release.set()


async def test_json_413_is_payload_too_large_with_hints(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    async def too_big(request: web.Request) -> web.Response:
        return error_response(413, "payload_too_large", "too large", limit=1024)

    node = await single_route(aiohttp_server, too_big)
    with pytest.raises(PayloadTooLarge) as info:
        await factory.new_client(2, node).append_entries(append_request(10), OPT)
    assert info.value.entries_hint == 5
    assert info.value.bytes_hint == 1024


async def test_plain_text_413_is_payload_too_large(aiohttp_server: ServerFactory) -> None:
    """The host app's own limit (1 MiB by default) answers a plain-text 413."""
    app = web.Application()
    app.router.add_post("/append", FakeRaft().append)
    node = addr(await aiohttp_server(app))
    async with HttpNetworkFactory() as f:
        with pytest.raises(PayloadTooLarge) as info:
            await f.new_client(2, node).append_entries(append_request(12_000), OPT)
    assert info.value.entries_hint == 6000
    assert info.value.bytes_hint is None


async def test_one_entry_too_large_still_hints_one(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    async def too_big(request: web.Request) -> web.Response:
        return web.Response(status=413, text="Request Entity Too Large")

    node = await single_route(aiohttp_server, too_big)
    with pytest.raises(PayloadTooLarge) as info:
        await factory.new_client(2, node).append_entries(append_request(1), OPT)
    assert info.value.entries_hint == 1


@pytest.mark.parametrize(
    ("status", "kind", "extra"),
    [
        (400, "bad_request", {}),
        (401, "unauthorized", {}),
        (404, "not_found", {}),
        (412, "cluster_mismatch", {}),
        (415, "unsupported_media_type", {}),
        (503, "raft_error", {}),
        (500, "internal", {}),
    ],
)
async def test_json_errors_are_remote_api_errors(
    aiohttp_server: ServerFactory,
    factory: HttpNetworkFactory,
    status: int,
    kind: str,
    extra: dict[str, Any],
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return error_response(status, kind, f"{kind} happened", **extra)

    node = await single_route(aiohttp_server, refuse, path="/vote")
    with pytest.raises(RemoteError) as info:
        await factory.new_client(2, node).vote(vote_request(), OPT)
    assert isinstance(info.value.source, APIError)
    assert info.value.source.kind == kind
    assert info.value.source.message == f"{kind} happened"
    assert info.value.node == node
    assert info.value.target == 2


async def test_fatal_is_remote_error_with_fatal_source(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    async def stopped(request: web.Request) -> web.Response:
        return error_response(503, "fatal", "storage failed")

    node = await single_route(aiohttp_server, stopped)
    with pytest.raises(RemoteError) as info:
        await factory.new_client(2, node).append_entries(append_request(), OPT)
    assert isinstance(info.value.source, Fatal)
    assert info.value.source.reason == "storage failed"


async def test_wrong_token_is_unauthorized(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(token="right")
    server = await aiohttp_server(raft.app())
    async with HttpNetworkFactory(token="wrong") as f:
        with pytest.raises(RemoteError) as info:
            await f.new_client(2, addr(server)).append_entries(append_request(), OPT)
    assert isinstance(info.value.source, APIError)
    assert info.value.source.kind == "unauthorized"
    assert raft.appends == []


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(status=400, text="Bad Request: header too long"),
        web.Response(status=502, body=b"<html>bad gateway</html>", content_type="text/html"),
        web.Response(status=400, body=b"{not json", content_type="application/json"),
        web.Response(status=200, body=b"garbled", content_type="application/json"),
        web.Response(status=200, body=b'{"type": "nonsense"}', content_type="application/json"),
    ],
    ids=["plain-400", "html-502", "bad-json-400", "garbled-200", "unknown-tag-200"],
)
async def test_non_protocol_answers_are_network_errors(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory, answer: web.Response
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    node = await single_route(aiohttp_server, handler)
    with pytest.raises(NetworkError) as info:
        await factory.new_client(2, node).append_entries(append_request(), OPT)
    assert str(answer.status) in str(info.value)


async def test_connection_dropped_mid_answer_is_network_error(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    async def half(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"type": "succ')
        assert request.transport is not None
        request.transport.abort()
        return resp

    node = await single_route(aiohttp_server, half)
    net = factory.new_client(2, node)
    with pytest.raises(NetworkError):
        await net.append_entries(append_request(), OPT)
    assert acquired(factory.session()) == 0


async def test_errors_are_contract_errors_only(factory: HttpNetworkFactory) -> None:
    """No aiohttp exception leaks: both RPC and streaming callers can catch their base."""
    net = factory.new_client(1, Node(f"127.0.0.1:{free_port()}"))
    with pytest.raises(RPCError):
        await net.vote(vote_request(), OPT)
    with pytest.raises(StreamingError):
        await net.full_snapshot(vote(1), snapshot_of(b"abc"), never(), OPT)


# --- cancellation ---------------------------------------------------------------------


async def test_caller_cancellation_leaks_no_connection(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()
    stall = True

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        if stall:
            await release.wait()
        return json_response(Success())

    node = await single_route(aiohttp_server, handler)
    net = factory.new_client(2, node)
    try:
        task = asyncio.create_task(net.append_entries(append_request(), OPT))
        await asyncio.wait_for(arrived.wait(), 5)
        assert acquired(factory.session()) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert acquired(factory.session()) == 0
        stall = False
        assert await net.append_entries(append_request(), OPT) == Success()
        assert acquired(factory.session()) == 0
    finally:
        release.set()


async def test_install_snapshot_warns_and_maps_mismatch(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    meta = snapshot_meta("s")
    try:
        with pytest.warns(DeprecationWarning, match="full_snapshot"):
            await net.install_snapshot(
                InstallSnapshotRequest(vote(1), meta, 0, b"\x00\xffab", False), OPT
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            answer = await net.install_snapshot(
                InstallSnapshotRequest(vote(1), meta, 4, b"cd", True), OPT
            )
            assert answer.vote == raft.current_vote
            assert raft.installed == [(vote(1), meta, b"\x00\xffabcd")]
            with pytest.raises(RemoteError) as info:
                await net.install_snapshot(
                    InstallSnapshotRequest(vote(1), snapshot_meta("t"), 9, b"x", True), OPT
                )
        assert isinstance(info.value.source, SnapshotMismatch)
        assert info.value.source.got == ("t", 9)
    finally:
        await net.factory.close()


# --- full snapshot --------------------------------------------------------------------


def payload(size: int) -> bytes:
    return os.urandom(size)


async def test_full_snapshot_streams_every_byte(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(token="t", cluster="c")
    net = await fake_server(aiohttp_server, raft)
    data = payload(3 * 1024 * 1024 + 17)
    try:
        answer = await net.full_snapshot(
            vote(2), snapshot_of(data), never(), RPCOption(5.0, snapshot_chunk_size=256 * 1024)
        )
        assert answer == SnapshotResponse(raft.current_vote)
        [(got_vote, meta, got)] = raft.installed
        assert got_vote == vote(2)
        assert meta == snapshot_meta()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert raft.snapshot_offsets == [0]
        headers = raft.headers[-1]
        assert "Transfer-Encoding" not in headers
        assert headers["Content-Length"] == str(len(data))
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Raft-Snapshot-Size"] == str(len(data))
        assert headers["Authorization"] == "Bearer t"
        assert headers["Raft-Cluster"] == "c"
    finally:
        await net.factory.close()


async def test_empty_snapshot(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    try:
        await net.full_snapshot(vote(1), snapshot_of(b""), never(), OPT)
        assert raft.installed == [(vote(1), snapshot_meta(), b"")]
    finally:
        await net.factory.close()


async def test_non_ascii_meta_travels_as_ascii_header(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    try:
        await net.full_snapshot(vote(1), snapshot_of(b"xyz", "snäp-😀-ü"), never(), OPT)
        [(_, meta, got)] = raft.installed
        assert meta.snapshot_id == "snäp-😀-ü"
        assert got == b"xyz"
    finally:
        await net.factory.close()


async def test_higher_vote_answered_without_the_body(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(current_vote=vote(9, 3))
    net = await fake_server(aiohttp_server, raft)
    try:
        answer = await net.full_snapshot(vote(2), snapshot_of(payload(4 << 20)), never(), OPT)
        assert answer.vote == vote(9, 3)
        assert answer.vote > vote(2)
        assert raft.installed == []
    finally:
        await net.factory.close()


async def test_resume_after_a_dropped_connection(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(drop_after=[300_000, 500_000])
    net = await fake_server(aiohttp_server, raft)
    data = payload(2 * 1024 * 1024)
    try:
        await net.full_snapshot(
            vote(1), snapshot_of(data), never(), RPCOption(5.0, snapshot_chunk_size=64 * 1024)
        )
        [(_, _, got)] = raft.installed
        assert got == data
        assert len(raft.snapshot_offsets) == 3
        first, second, third = raft.snapshot_offsets
        assert first == 0
        assert 300_000 <= second < len(data)
        assert second + 500_000 <= third < len(data)
    finally:
        await net.factory.close()


async def test_offset_mismatch_resumes_from_the_expected_offset(
    aiohttp_server: ServerFactory,
) -> None:
    data = payload(100_000)
    raft = FakeRaft(spools={"snap-1": bytearray(data[:40_000])})
    net = await fake_server(aiohttp_server, raft)
    try:
        await net.full_snapshot(vote(1), snapshot_of(data), never(), OPT)
        assert raft.snapshot_offsets == [0, 40_000]
        assert raft.installed[0][2] == data
        # each request declares the length of its own body, not the snapshot's
        assert [h["Content-Length"] for h in raft.headers[-2:]] == ["100000", "60000"]
    finally:
        await net.factory.close()


async def test_resumes_are_bounded(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(always_drop_after=10_000)
    server = await aiohttp_server(raft.app())
    async with HttpNetworkFactory(max_resume_attempts=2) as f:
        with pytest.raises(NetworkError, match="2 resumes"):
            await f.new_client(2, addr(server)).full_snapshot(
                vote(1),
                snapshot_of(payload(1 << 20)),
                never(),
                RPCOption(5.0, snapshot_chunk_size=16 * 1024),
            )
        assert acquired(f.snapshot_session()) == 0
    assert len(raft.snapshot_offsets) == 3
    assert raft.installed == []


async def test_file_shorter_than_its_size_is_a_transfer_error(
    aiohttp_server: ServerFactory,
) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    snapshot = Snapshot(snapshot_meta(), ShortFile(payload(100_000), extra=5000))
    try:
        with pytest.raises(SnapshotTransferError) as info:
            await net.full_snapshot(
                vote(1), snapshot, never(), RPCOption(5.0, snapshot_chunk_size=8192)
            )
        assert info.value.meta == snapshot_meta()
        assert raft.installed == []
    finally:
        await net.factory.close()


async def test_cancel_mid_upload_raises_closed(aiohttp_server: ServerFactory) -> None:
    gate = asyncio.Event()
    raft = FakeRaft(snapshot_gate=gate)
    net = await fake_server(aiohttp_server, raft)
    cancel = never()
    try:
        task = asyncio.create_task(
            net.full_snapshot(vote(1), snapshot_of(payload(1 << 20)), cancel, OPT)
        )
        await asyncio.wait_for(raft.snapshot_started.wait(), 5)
        cancel.set_result(ReplicationClosed("leader stepped down"))
        with pytest.raises(Closed) as info:
            await task
        assert info.value.closed.reason == "leader stepped down"
        assert acquired(net.factory.snapshot_session()) == 0
        assert raft.installed == []
        # The network still works afterwards.
        raft.snapshot_gate = None
        await net.full_snapshot(vote(1), snapshot_of(b"after", "snap-2"), never(), OPT)
        assert raft.installed[0][2] == b"after"
    finally:
        gate.set()
        await net.factory.close()


async def test_cancel_coroutine_is_cleaned_up_after_success(
    aiohttp_server: ServerFactory,
) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    cancelled = asyncio.Event()

    async def wait_for_close() -> ReplicationClosed:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    try:
        await net.full_snapshot(vote(1), snapshot_of(b"abc"), wait_for_close(), OPT)
        assert cancelled.is_set()
        # A Future the caller owns is left alone.
        owned = never()
        await net.full_snapshot(vote(1), snapshot_of(b"abc"), owned, OPT)
        assert not owned.done()
    finally:
        await net.factory.close()


async def test_caller_cancellation_of_full_snapshot(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft(snapshot_gate=asyncio.Event())
    net = await fake_server(aiohttp_server, raft)
    try:
        task = asyncio.create_task(
            net.full_snapshot(vote(1), snapshot_of(payload(1 << 20)), never(), OPT)
        )
        await asyncio.wait_for(raft.snapshot_started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert acquired(net.factory.snapshot_session()) == 0
    finally:
        raft.snapshot_gate.set()
        await net.factory.close()


async def test_snapshot_answer_past_the_deadline_is_timeout(
    aiohttp_server: ServerFactory, factory: HttpNetworkFactory
) -> None:
    release = asyncio.Event()

    async def read_then_stall(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return json_response(SnapshotResponse(vote(1)))

    node = await single_route(aiohttp_server, read_then_stall, path="/snapshot")
    try:
        with pytest.raises(Timeout) as info:
            await factory.new_client(2, node).full_snapshot(
                vote(1), snapshot_of(b"x" * 1000), never(), SHORT
            )
        assert info.value.action == "full_snapshot"
        assert acquired(factory.snapshot_session()) == 0
    finally:
        release.set()


class SlowFile(io.BytesIO):
    """Each read takes ``delay`` seconds: a snapshot whose total time exceeds ``hard_ttl``."""

    def __init__(self, data: bytes, delay: float) -> None:
        super().__init__(data)
        self.delay = delay
        self.reads = 0

    def read(self, n: int | None = -1) -> bytes:
        import time

        time.sleep(self.delay)
        self.reads += 1
        return super().read(n)


async def test_deadline_is_per_chunk_not_per_snapshot(aiohttp_server: ServerFactory) -> None:
    """Eight chunks at 0.1 s each outlast a 0.6 s hard_ttl, yet every chunk makes progress."""
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    data = payload(8 * 1024)
    slow = SlowFile(data, delay=0.1)
    try:
        await net.full_snapshot(
            vote(1),
            Snapshot(snapshot_meta(), slow),
            never(),
            RPCOption(0.6, snapshot_chunk_size=1024),
        )
        assert slow.reads == 8
        assert raft.installed[0][2] == data
    finally:
        await net.factory.close()


class StalledFile(io.BytesIO):
    """Reads return at once, except read number ``stall_at``, which hangs until ``release``."""

    def __init__(self, data: bytes, stall_at: int) -> None:
        super().__init__(data)
        self.stall_at = stall_at
        self.reads = 0
        self.release = threading.Event()

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == self.stall_at:
            self.release.wait(10.0)
        return super().read(n)


async def test_a_stalled_chunk_times_out_mid_snapshot(aiohttp_server: ServerFactory) -> None:
    """The per-chunk deadline also bounds each chunk: one that makes no progress is a Timeout.

    Two chunks go through, the third stalls for far longer than ``hard_ttl``; the
    upload must end with ``Timeout`` near ``hard_ttl``, and nothing is installed.
    """
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    stalled = StalledFile(payload(8 * 1024), stall_at=3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(Timeout) as info:
            await asyncio.wait_for(
                net.full_snapshot(
                    vote(1),
                    Snapshot(snapshot_meta(), stalled),
                    never(),
                    RPCOption(0.3, snapshot_chunk_size=1024),
                ),
                5.0,
            )
        assert info.value.action == "full_snapshot"
        assert loop.time() - started < 5.0
        assert stalled.reads == 3
        assert raft.installed == []
    finally:
        stalled.release.set()
        await net.factory.close()


@pytest.mark.parametrize(
    ("answer", "error", "kind"),
    [
        (lambda: error_response(503, "fatal", "disk gone"), RemoteError, "fatal"),
        (lambda: error_response(401, "unauthorized", "no"), RemoteError, "unauthorized"),
        (lambda: error_response(400, "size_mismatch", "short"), RemoteError, "size_mismatch"),
        (lambda: web.Response(status=400, text="header too long"), NetworkError, None),
        (lambda: web.Response(text="garbled", content_type="application/json"), NetworkError, None),
    ],
)
async def test_snapshot_error_answers(
    aiohttp_server: ServerFactory,
    factory: HttpNetworkFactory,
    answer: Callable[[], web.Response],
    error: type[Exception],
    kind: str | None,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return answer()

    node = await single_route(aiohttp_server, handler, path="/snapshot")
    with pytest.raises(error) as info:
        await factory.new_client(2, node).full_snapshot(vote(1), snapshot_of(b"abc"), never(), OPT)
    if kind == "fatal":
        assert isinstance(info.value, RemoteError)
        assert isinstance(info.value.source, Fatal)
    elif kind is not None:
        assert isinstance(info.value, RemoteError)
        assert isinstance(info.value.source, APIError)
        assert info.value.source.kind == kind


async def test_heartbeat_completes_during_a_slow_upload(aiohttp_server: ServerFactory) -> None:
    """Even with a one-connection RPC pool, an upload to the same node never blocks append."""
    raft = FakeRaft(snapshot_gate=asyncio.Event())
    node = addr(await aiohttp_server(raft.app()))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection,
        HttpNetworkFactory(one_connection) as f,
    ):
        net = f.new_client(2, node)
        upload = asyncio.create_task(
            net.full_snapshot(vote(1), snapshot_of(payload(1 << 20)), never(), OPT)
        )
        try:
            await asyncio.wait_for(raft.snapshot_started.wait(), 5)
            for _ in range(3):
                assert await net.append_entries(append_request(), OPT) == Success()
            assert not upload.done()
        finally:
            raft.snapshot_gate.set()
        await upload
        assert len(raft.installed) == 1


# --- end to end against the real server ---------------------------------------------


async def real_server(
    aiohttp_server: ServerFactory, handler: Recorder, prefix: str = "", **options: Any
) -> Node:
    app = raft_app(handler, **options)
    if prefix:
        host = web.Application()
        host.add_subapp(prefix, app)
        app = host
    server = await aiohttp_server(app)
    return Node(f"http://127.0.0.1:{server.port}{prefix}")


async def test_e2e_round_trips_with_token_and_cluster(aiohttp_server: ServerFactory) -> None:
    handler = Recorder(my_vote=vote(1))
    node = await real_server(aiohttp_server, handler, "/raft", token="tok", cluster="blue")
    async with HttpNetworkFactory(token="tok", cluster="blue") as f:
        net = f.new_client(2, node)
        rpc = append_request(5)
        assert await net.append_entries(rpc, OPT) == Success()
        assert handler.appends == [rpc]
        answer = await net.vote(vote_request(3), OPT)
        assert answer.vote_granted
        assert handler.votes == [vote_request(3)]
    async with HttpNetworkFactory(token="tok", cluster="green") as f:
        with pytest.raises(RemoteError) as info:
            await f.new_client(2, node).append_entries(rpc, OPT)
        assert isinstance(info.value.source, APIError)
        assert info.value.source.kind == "cluster_mismatch"
    async with HttpNetworkFactory(token="bad", cluster="blue") as f:
        with pytest.raises(RemoteError) as info:
            await f.new_client(2, node).vote(vote_request(), OPT)
        assert isinstance(info.value.source, APIError)
        assert info.value.source.kind == "unauthorized"
    assert len(handler.appends) == 1
    assert len(handler.votes) == 1


async def test_e2e_transfer_leader_round_trip_and_errors(aiohttp_server: ServerFactory) -> None:
    handler = Recorder(my_vote=vote(1))
    node = await real_server(aiohttp_server, handler, "/raft", token="tok")
    rpc = TransferLeaderRequest(vote(3, 1).committed_vote(), 2, log_id(3, 17))
    async with HttpNetworkFactory(token="tok") as f:
        assert await f.new_client(2, node).transfer_leader(rpc, OPT) is None
        assert handler.transfers == [rpc]
        handler.fail_with = Fatal("stopped")
        with pytest.raises(RemoteError) as info:
            await f.new_client(2, node).transfer_leader(rpc, OPT)
        assert isinstance(info.value.source, Fatal)
        with pytest.raises(Unreachable):
            await f.new_client(5, Node(f"127.0.0.1:{free_port()}")).transfer_leader(rpc, OPT)
    # A peer without the route (an older version) answers a JSON 404: not a transfer.
    bare = web.Application()
    bare.add_subapp("/raft", web.Application())
    server = await aiohttp_server(bare)
    async with HttpNetworkFactory() as f:
        with pytest.raises((RemoteError, NetworkError)):
            await f.new_client(2, Node(f"http://127.0.0.1:{server.port}/raft")).transfer_leader(
                rpc, OPT
            )
    assert len(handler.transfers) == 1


async def test_e2e_wrong_prefix_is_a_network_error(aiohttp_server: ServerFactory) -> None:
    """The host app's plain-text 404 (the Raft sub-app is never reached) is no Raft answer."""
    node = await real_server(aiohttp_server, Recorder(), "/raft")
    async with HttpNetworkFactory() as f:
        with pytest.raises(NetworkError, match="404"):
            await f.new_client(2, Node(node.addr.replace("/raft", "/other"))).vote(
                vote_request(), OPT
            )


async def test_e2e_full_snapshot_byte_for_byte(aiohttp_server: ServerFactory) -> None:
    handler = Recorder(my_vote=vote(1))
    node = await real_server(aiohttp_server, handler, token="tok")
    data = payload(5 * 1024 * 1024 + 123)
    async with HttpNetworkFactory(token="tok") as f:
        answer = await f.new_client(2, node).full_snapshot(
            vote(2), snapshot_of(data, "snäp-1"), never(), RPCOption(10.0, 1024 * 1024)
        )
    assert answer.vote == vote(1)
    [(got_vote, meta, digest)] = handler.installed
    assert got_vote == vote(2)
    assert meta == snapshot_meta("snäp-1")
    assert digest == hashlib.sha256(data).hexdigest()


async def test_e2e_higher_vote_refuses_the_snapshot(aiohttp_server: ServerFactory) -> None:
    handler = Recorder(my_vote=vote(7, 3))
    node = await real_server(aiohttp_server, handler)
    async with HttpNetworkFactory() as f:
        answer = await f.new_client(2, node).full_snapshot(
            vote(2), snapshot_of(payload(2 << 20)), never(), OPT
        )
    assert answer.vote == vote(7, 3)
    assert answer.vote > vote(2)
    assert handler.installed == []


async def test_e2e_cancel_mid_upload_is_closed(aiohttp_server: ServerFactory) -> None:
    handler = Recorder()
    node = await real_server(aiohttp_server, handler)
    data = GatedFile(payload(1 << 20), open_bytes=128 * 1024)
    cancel = never()
    async with HttpNetworkFactory() as f:
        net = f.new_client(2, node)
        try:
            task = asyncio.create_task(
                net.full_snapshot(
                    vote(1), Snapshot(snapshot_meta(), data), cancel, RPCOption(5.0, 64 * 1024)
                )
            )
            assert await asyncio.to_thread(data.blocked.wait, 5)
            cancel.set_result(ReplicationClosed("shutting down"))
            with pytest.raises(Closed, match="shutting down"):
                await task
            assert acquired(f.snapshot_session()) == 0
        finally:
            data.gate.set()
        await net.full_snapshot(vote(1), snapshot_of(b"next", "snap-2"), never(), OPT)
    assert [meta.snapshot_id for _, meta, _ in handler.installed] == ["snap-2"]


@pytest.mark.parametrize(
    "make_snapshot", [snapshot_of, summed], ids=["without_checksum", "checksum_verified"]
)
async def test_e2e_resume_after_a_dropped_connection(
    aiohttp_server: ServerFactory, make_snapshot: Callable[[bytes], Snapshot]
) -> None:
    handler = Recorder()
    node = await real_server(aiohttp_server, handler)
    proxy = DroppingProxy(int(node.addr.rsplit(":", 1)[1]), after=700_000, drops=1)
    port = await proxy.start()
    data = payload(3 * 1024 * 1024)
    try:
        async with HttpNetworkFactory(max_resume_attempts=5) as f:
            await f.new_client(2, Node(f"127.0.0.1:{port}")).full_snapshot(
                vote(1), make_snapshot(data), never(), RPCOption(10.0, 256 * 1024)
            )
    finally:
        await proxy.close()
    assert proxy.dropped == 1
    [(_, _, digest)] = handler.installed
    assert digest == hashlib.sha256(data).hexdigest()


async def test_e2e_error_kinds(aiohttp_server: ServerFactory) -> None:
    stall = asyncio.Event()
    slow = Recorder(stall=stall)
    slow_node = await real_server(aiohttp_server, slow)
    small_node = await real_server(aiohttp_server, Recorder(), max_body_size=4000)
    fatal_node = await real_server(aiohttp_server, Recorder(fail_with=Fatal("disk on fire")))
    async with HttpNetworkFactory() as f:
        try:
            with pytest.raises(Timeout):
                await f.new_client(2, slow_node).append_entries(append_request(), SHORT)
        finally:
            stall.set()
        with pytest.raises(PayloadTooLarge) as too_large:
            await f.new_client(3, small_node).append_entries(append_request(100), OPT)
        assert too_large.value.entries_hint == 50
        assert too_large.value.bytes_hint == 4000
        with pytest.raises(RemoteError) as fatal:
            await f.new_client(4, fatal_node).vote(vote_request(), OPT)
        assert isinstance(fatal.value.source, Fatal)
        assert fatal.value.source.reason == "disk on fire"
        with pytest.raises(Unreachable):
            await f.new_client(5, Node(f"127.0.0.1:{free_port()}")).vote(vote_request(), OPT)


async def test_e2e_install_snapshot_chunks(aiohttp_server: ServerFactory) -> None:
    handler = Recorder()
    node = await real_server(aiohttp_server, handler)
    meta = snapshot_meta("chunked")
    async with HttpNetworkFactory() as f:
        net = f.new_client(2, node)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            await net.install_snapshot(InstallSnapshotRequest(vote(1), meta, 0, b"ab", False), OPT)
            await net.install_snapshot(InstallSnapshotRequest(vote(1), meta, 2, b"cd", True), OPT)
            with pytest.raises(RemoteError) as info:
                await net.install_snapshot(
                    InstallSnapshotRequest(vote(1), snapshot_meta("other"), 5, b"x", True), OPT
                )
    assert handler.installed == [(vote(1), meta, hashlib.sha256(b"abcd").hexdigest())]
    assert isinstance(info.value.source, SnapshotMismatch)
    assert info.value.source.got == ("other", 5)


async def test_e2e_heartbeat_during_a_slow_upload(aiohttp_server: ServerFactory) -> None:
    handler = Recorder()
    node = await real_server(aiohttp_server, handler)
    data = GatedFile(payload(1 << 20), open_bytes=128 * 1024)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection,
        HttpNetworkFactory(one_connection) as f,
    ):
        net = f.new_client(2, node)
        upload = asyncio.create_task(
            net.full_snapshot(
                vote(1), Snapshot(snapshot_meta(), data), never(), RPCOption(5.0, 64 * 1024)
            )
        )
        try:
            assert await asyncio.to_thread(data.blocked.wait, 5)
            assert await net.append_entries(append_request(2), OPT) == Success()
            assert not upload.done()
        finally:
            data.gate.set()
        await upload
    assert len(handler.appends) == 1
    assert len(handler.installed) == 1


async def test_cancel_coroutine_completing_first_is_closed(aiohttp_server: ServerFactory) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)

    async def closed_now() -> ReplicationClosed:
        return ReplicationClosed("membership changed")

    try:
        with pytest.raises(Closed, match="membership changed"):
            await net.full_snapshot(vote(1), snapshot_of(payload(1 << 20)), closed_now(), OPT)
        assert raft.installed == []
    finally:
        await net.factory.close()


# --- end-to-end checksum (Raft-Snapshot-Sha256) ----------------------------------------


def upload_headers(raft: FakeRaft) -> list[dict[str, str]]:
    """The headers of each POST /snapshot (not the HEADs asking where to resume)."""
    return [h for h in raft.headers if "Raft-Snapshot-Size" in h]


async def test_checksum_header_on_fresh_and_resumed_uploads(
    aiohttp_server: ServerFactory,
) -> None:
    raft = FakeRaft(drop_after=[300_000])
    net = await fake_server(aiohttp_server, raft)
    data = payload(1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    try:
        await net.full_snapshot(
            vote(1), summed(data), never(), RPCOption(5.0, snapshot_chunk_size=64 * 1024)
        )
        [(_, _, got)] = raft.installed
        assert got == data
        sent = upload_headers(raft)
        assert [h["Raft-Snapshot-Offset"] != "0" for h in sent] == [False, True]
        assert [h.get("Raft-Snapshot-Sha256") for h in sent] == [digest, digest]
        # without a known checksum, no header
        raft.headers.clear()
        await net.full_snapshot(vote(1), snapshot_of(b"plain", "snap-2"), never(), OPT)
        [plain] = upload_headers(raft)
        assert "Raft-Snapshot-Sha256" not in plain
    finally:
        await net.factory.close()


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65, " " + "a" * 64])
async def test_malformed_checksum_is_a_transfer_error_before_sending(
    aiohttp_server: ServerFactory, bad: str
) -> None:
    raft = FakeRaft()
    net = await fake_server(aiohttp_server, raft)
    try:
        with pytest.raises(SnapshotTransferError, match="sha256") as info:
            await net.full_snapshot(vote(1), summed(b"data", sha256=bad), never(), OPT)
        assert info.value.meta == snapshot_meta()
        assert raft.headers == []
    finally:
        await net.factory.close()


async def test_e2e_wrong_checksum_is_a_remote_checksum_mismatch(
    aiohttp_server: ServerFactory,
) -> None:
    handler = Recorder()
    node = await real_server(aiohttp_server, handler)
    data = payload(200_000)
    wrong = hashlib.sha256(data + b"!").hexdigest()
    async with HttpNetworkFactory() as f:
        with pytest.raises(RemoteError) as info:
            await f.new_client(2, node).full_snapshot(
                vote(1), summed(data, sha256=wrong), never(), OPT
            )
    assert isinstance(info.value.source, APIError)
    assert info.value.source.kind == "checksum_mismatch"
    assert wrong in info.value.source.message
    assert handler.installed == []
