"""``stream_append``: the contract's default (one at a time) and the HTTP WebSocket form.

The stream's promise is order: requests reach the target in send order and answers come
back in the same order, which separate pooled POSTs do not give (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from client_helpers import FakeRaft, free_port
from raft_http.client import HttpNetworkFactory
from raft_http.errors import (
    APIError,
    Fatal,
    NetworkError,
    PayloadTooLarge,
    RemoteError,
    Timeout,
    Unreachable,
)
from raft_http.network import AppendStream, RaftNetwork, RPCOption, SerialAppendStream
from raft_http.server import raft_app
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    ERROR_BODY,
    AppendEntriesRequest,
    AppendEntriesResponse,
    Blank,
    Entry,
    HigherVote,
    Node,
    PartialSuccess,
    Snapshot,
    SnapshotResponse,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
)
from server_helpers import RecordingHandler
from wire_helpers import log_id, vote

ServerFactory = Callable[..., Awaitable[TestServer]]
OPT = RPCOption(hard_ttl=5.0)


def numbered(i: int, term: int = 1) -> AppendEntriesRequest:
    """A heartbeat after entry ``i``: its answer (``PartialSuccess(prev)``) names it."""
    return AppendEntriesRequest(vote(term), log_id(term, i), [], None)


def addr(server: TestServer) -> Node:
    return Node(f"127.0.0.1:{server.port}")


@dataclass
class EchoHandler(RecordingHandler):
    """Answers each append with its own ``prev_log_id``; ``gate`` holds every call."""

    gate: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    most_active: int = 0

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        self.calls.append(("append_entries", rpc))
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            self._maybe_fail()
            return PartialSuccess(rpc.prev_log_id)
        finally:
            self.active -= 1

    def prevs(self) -> list[int]:
        return [rpc.prev_log_id.index for name, rpc in self.calls if name == "append_entries"]


# --- the contract's default: one append_entries at a time -------------------------------


class CountingNetwork(RaftNetwork):
    """A network that answers appends after a short pause, counting how many overlap."""

    def __init__(self, fail: dict[int, Exception] | None = None) -> None:
        self.seen: list[int] = []
        self.active = 0
        self.most_active = 0
        self.fail = fail or {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def append_entries(
        self, rpc: AppendEntriesRequest, option: RPCOption
    ) -> AppendEntriesResponse:
        assert rpc.prev_log_id is not None
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
            self.seen.append(rpc.prev_log_id.index)
            if (error := self.fail.pop(rpc.prev_log_id.index, None)) is not None:
                raise error
            return PartialSuccess(rpc.prev_log_id)
        finally:
            self.active -= 1

    async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
        raise NotImplementedError

    async def full_snapshot(
        self, vote: Vote, snapshot: Snapshot, cancel: Awaitable[object], option: RPCOption
    ) -> SnapshotResponse:
        raise NotImplementedError


async def answers(futures: list[asyncio.Future[AppendEntriesResponse]]) -> list[object]:
    return list(await asyncio.gather(*futures, return_exceptions=True))


async def test_default_stream_sends_one_at_a_time_in_order() -> None:
    net = CountingNetwork()
    stream = net.stream_append(OPT)
    assert isinstance(stream, SerialAppendStream)
    async with stream:
        got = await answers([stream.send(numbered(i)) for i in range(50)])
    assert got == [PartialSuccess(log_id(1, i)) for i in range(50)]
    assert net.seen == list(range(50))
    assert net.most_active == 1


async def test_default_stream_answer_errors_fail_one_request_only() -> None:
    refused = RemoteError(2, Node("x:1"), APIError("raft_error", "no"))
    too_large = PayloadTooLarge("append_entries", entries_hint=1, target=2)
    net = CountingNetwork(fail={1: refused, 3: too_large})
    async with net.stream_append(OPT) as stream:
        got = await answers([stream.send(numbered(i)) for i in range(5)])
    assert got[1] is refused
    assert got[3] is too_large
    assert [got[i] for i in (0, 2, 4)] == [PartialSuccess(log_id(1, i)) for i in (0, 2, 4)]
    assert net.seen == [0, 1, 2, 3, 4]


async def test_default_stream_transport_error_resets_what_is_pending_then_recovers() -> None:
    down = Unreachable("down", target=2)
    net = CountingNetwork(fail={1: down})
    async with net.stream_append(OPT) as stream:
        got = await answers([stream.send(numbered(i)) for i in range(4)])
        assert got[0] == PartialSuccess(log_id(1, 0))
        assert got[1] is down
        assert all(isinstance(e, NetworkError) and "reset" in str(e) for e in got[2:])
        assert net.seen == [0, 1]  # nothing behind the failure was sent
        assert await stream.send(numbered(7)) == PartialSuccess(log_id(1, 7))


async def test_default_stream_close_cancels_pending_and_refuses_sends() -> None:
    net = CountingNetwork()
    net.gate.clear()
    stream = net.stream_append(OPT)
    futures = [stream.send(numbered(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert net.active == 1
    await stream.aclose()
    assert all(f.cancelled() for f in futures)
    assert net.active == 0  # the call in flight was cancelled too
    with pytest.raises(RuntimeError):
        stream.send(numbered(9))
    await stream.aclose()  # idempotent


# --- the HTTP stream ----------------------------------------------------------------------


@pytest.fixture
async def echo_server(aiohttp_server: ServerFactory) -> tuple[EchoHandler, Node]:
    handler = EchoHandler()
    server = await aiohttp_server(raft_app(handler, token="t", cluster="c"))
    return handler, addr(server)


async def test_http_stream_keeps_thousands_of_requests_in_order(
    echo_server: tuple[EchoHandler, Node],
) -> None:
    handler, node = echo_server
    n = 3000
    async with HttpNetworkFactory(token="t", cluster="c") as factory:
        stream = factory.new_client(2, node).stream_append(OPT)
        assert not isinstance(stream, SerialAppendStream)
        async with stream:
            futures = [stream.send(numbered(i)) for i in range(n)]
            order: list[int] = []
            for f in futures:
                f.add_done_callback(lambda f: order.append(len(order)))
            got = await answers(futures)
    assert got == [PartialSuccess(log_id(1, i)) for i in range(n)]
    assert handler.prevs() == list(range(n))
    assert order == list(range(n))


async def test_http_stream_carries_entries_and_higher_votes(aiohttp_server: ServerFactory) -> None:
    handler = RecordingHandler(my_vote=vote(5))
    server = await aiohttp_server(raft_app(handler))
    entries = [Entry(log_id(6, i), Blank()) for i in (1, 2)]
    rpc = AppendEntriesRequest(vote(6), log_id(6, 0), entries, None)
    async with (
        HttpNetworkFactory() as factory,
        factory.new_client(2, addr(server)).stream_append(OPT) as stream,
    ):
        assert await stream.send(numbered(3)) == HigherVote(vote(5))
        await stream.send(rpc)
    assert handler.calls[-1] == ("append_entries", rpc)


@pytest.mark.parametrize(
    ("token", "cluster", "kind"),
    [
        (None, "c", "unauthorized"),
        ("wrong", "c", "unauthorized"),
        ("t", "other", "cluster_mismatch"),
    ],
)
async def test_http_stream_refused_at_the_upgrade_without_credentials(
    echo_server: tuple[EchoHandler, Node], token: str | None, cluster: str, kind: str
) -> None:
    handler, node = echo_server
    async with HttpNetworkFactory(token=token, cluster=cluster) as factory:
        network = factory.new_client(2, node)
        async with network.stream_append(OPT) as stream:
            with pytest.raises(RemoteError) as info:
                await stream.send(numbered(1))
        assert isinstance(info.value.source, APIError)
        assert info.value.source.kind == kind
        # Refused, not missing: no silent fallback to POST (which would be refused too).
        assert not isinstance(network.stream_append(OPT), SerialAppendStream)
    assert handler.calls == []


async def test_http_stream_answers_malformed_messages_and_goes_on(
    echo_server: tuple[EchoHandler, Node],
) -> None:
    handler, node = echo_server
    good = APPEND_ENTRIES_REQUEST.encode(numbered(4))
    term_too_big = good.replace(b'"term":1', b'"term":9223372036854775807', 1)
    bad_shape = APPEND_ENTRIES_REQUEST.encode(
        AppendEntriesRequest(vote(1), log_id(1, 4), [Entry(log_id(1, 9), Blank())], None)
    )
    messages = [b"{not json", b'{"vote": 3}', term_too_big, bad_shape, b"[]" * 3, good]
    url = f"http://127.0.0.1:{node.addr.rsplit(':', 1)[1]}/append-stream"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": "Bearer t", "Raft-Cluster": "c"}) as ws,
    ):
        for message in messages:
            await ws.send_bytes(message)
        await ws.send_str(good.decode())  # a text frame is read the same way
        got = [await ws.receive_bytes(timeout=5) for _ in range(len(messages) + 1)]
    for raw in got[:-2]:
        detail = ERROR_BODY.decode(raw).error
        assert detail.kind == "bad_request"
        assert detail.message
    assert "Expected `int` <= " in ERROR_BODY.decode(got[2]).error.message
    assert APPEND_ENTRIES_RESPONSE.decode(got[-2]) == PartialSuccess(log_id(1, 4))
    assert APPEND_ENTRIES_RESPONSE.decode(got[-1]) == PartialSuccess(log_id(1, 4))
    assert handler.prevs() == [4, 4]


async def test_http_stream_reports_handler_errors_per_request(
    aiohttp_server: ServerFactory,
) -> None:
    handler = EchoHandler(fail_with=Fatal("stopped"))
    server = await aiohttp_server(raft_app(handler))
    async with (
        HttpNetworkFactory() as factory,
        factory.new_client(2, addr(server)).stream_append(OPT) as stream,
    ):
        first = stream.send(numbered(1))
        with pytest.raises(RemoteError) as info:
            await first
        assert isinstance(info.value.source, Fatal)
        handler.fail_with = None
        assert await stream.send(numbered(2)) == PartialSuccess(log_id(1, 2))


async def test_http_stream_oversized_message_is_payload_too_large(
    aiohttp_server: ServerFactory,
) -> None:
    handler = EchoHandler()
    server = await aiohttp_server(raft_app(handler, max_body_size=2000))
    big = AppendEntriesRequest(
        vote(1), log_id(1, 0), [Entry(log_id(1, i), Blank()) for i in range(1, 60)], None
    )
    assert len(APPEND_ENTRIES_REQUEST.encode(big)) > 2000
    async with (
        HttpNetworkFactory() as factory,
        factory.new_client(2, addr(server)).stream_append(OPT) as stream,
    ):
        got = await answers([stream.send(numbered(1)), stream.send(big), stream.send(numbered(2))])
        # The server reads ahead of its answers: the first one may be lost with the stream
        # (after it was handled), but the oversized message is the one blamed.
        assert got[0] == PartialSuccess(log_id(1, 1)) or isinstance(got[0], NetworkError)
        assert isinstance(got[1], PayloadTooLarge)
        assert got[1].entries_hint == 29
        assert isinstance(got[2], NetworkError)
        # The stream reconnects for the next request.
        assert await stream.send(numbered(3)) == PartialSuccess(log_id(1, 3))
    assert handler.prevs() == [1, 3]


async def test_http_stream_falls_back_to_posts_for_a_peer_without_the_route(
    aiohttp_server: ServerFactory,
) -> None:
    raft = FakeRaft()  # POST /append only, like an older or simpler peer
    server = await aiohttp_server(raft.app())
    async with HttpNetworkFactory() as factory:
        network = factory.new_client(2, addr(server))
        async with network.stream_append(OPT) as stream:
            got = await answers([stream.send(numbered(i)) for i in range(20)])
            assert got == [Success()] * 20
            assert await stream.send(numbered(20)) == Success()
        assert [rpc.prev_log_id.index for rpc in raft.appends if rpc.prev_log_id] == list(range(21))
        # Remembered per target: the next stream does not try the upgrade again.
        assert isinstance(network.stream_append(OPT), SerialAppendStream)
        assert isinstance(
            factory.new_client(2, addr(server)).stream_append(OPT), SerialAppendStream
        )
    upgrades = [h for h in raft.headers if h.get("Upgrade")]
    assert upgrades == []  # the fallback POSTs carry no upgrade headers


async def test_http_stream_timeout_resets_and_reconnects(aiohttp_server: ServerFactory) -> None:
    handler = EchoHandler(gate=asyncio.Event())
    server = await aiohttp_server(raft_app(handler))
    async with HttpNetworkFactory() as factory:
        stream = factory.new_client(2, addr(server)).stream_append(RPCOption(hard_ttl=0.3))
        async with stream:
            got = await answers([stream.send(numbered(i)) for i in range(3)])
            assert isinstance(got[0], Timeout)
            assert all(isinstance(e, NetworkError) for e in got[1:])
            handler.gate.set()
            assert await stream.send(numbered(5)) == PartialSuccess(log_id(1, 5))


async def test_http_stream_close_cancels_pending_promptly(aiohttp_server: ServerFactory) -> None:
    handler = EchoHandler(gate=asyncio.Event())
    server = await aiohttp_server(raft_app(handler))
    async with HttpNetworkFactory() as factory:
        network = factory.new_client(2, addr(server))
        stream = network.stream_append(OPT)
        futures = [stream.send(numbered(i)) for i in range(3)]
        await asyncio.wait_for(handler.started.wait(), 5)
        async with asyncio.timeout(2):
            await stream.aclose()
        assert all(f.cancelled() for f in futures)
        with pytest.raises(RuntimeError):
            stream.send(numbered(9))
        handler.gate.set()
        # The network stays usable: a new stream, and a plain POST.
        async with network.stream_append(OPT) as again:
            assert await again.send(numbered(7)) == PartialSuccess(log_id(1, 7))
        assert await network.append_entries(numbered(8), OPT) == PartialSuccess(log_id(1, 8))


async def test_http_stream_to_a_closed_port_is_unreachable() -> None:
    async with HttpNetworkFactory() as factory:
        node = Node(f"127.0.0.1:{free_port()}")
        async with factory.new_client(2, node).stream_append(OPT) as stream:
            got = await answers([stream.send(numbered(i)) for i in range(2)])
    assert isinstance(got[0], Unreachable)
    assert isinstance(got[1], NetworkError)


async def test_server_shutdown_closes_open_streams(aiohttp_server: ServerFactory) -> None:
    handler = EchoHandler()
    server = await aiohttp_server(raft_app(handler))
    async with HttpNetworkFactory() as factory:
        stream = factory.new_client(2, addr(server)).stream_append(OPT)
        assert await stream.send(numbered(1)) == PartialSuccess(log_id(1, 1))
        async with asyncio.timeout(5):
            await server.close()
        with pytest.raises((NetworkError, Unreachable)):
            await stream.send(numbered(2))
        await stream.aclose()


def test_append_stream_is_public() -> None:
    import raft_http

    assert raft_http.AppendStream is AppendStream
    assert raft_http.SerialAppendStream is SerialAppendStream
