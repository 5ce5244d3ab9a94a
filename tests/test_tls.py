"""HTTPS and mutual TLS: the transport, in-process KV nodes, and the ``raft-http node`` CLI.

Certificates come from throwaway CAs made with ``openssl`` (tests/tls_helpers.py).
Everything binds 127.0.0.1 on free ports; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from raft_http.client import HttpNetworkFactory
from raft_http.errors import NetworkError, RaftHttpError, ReplicationClosed, Unreachable
from raft_http.kv.node import KVNode
from raft_http.network import RPCOption
from raft_http.server import raft_app
from raft_http.types import Node, Snapshot, Success, VoteResponse

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .client_helpers import append_request, vote_request
    from .cluster_helpers import ProcessCluster
    from .server_helpers import RecordingHandler
    from .tls_helpers import (
        OPENSSL,
        TlsFiles,
        client_context,
        make_tls_files,
        server_context,
    )
    from .wire_helpers import snapshot_meta, vote
except ImportError:
    from client_helpers import append_request, vote_request  # type: ignore[no-redef]
    from cluster_helpers import ProcessCluster  # type: ignore[no-redef]
    from server_helpers import RecordingHandler  # type: ignore[no-redef]
    from tls_helpers import (  # type: ignore[no-redef]
        OPENSSL,
        TlsFiles,
        client_context,
        make_tls_files,
        server_context,
    )
    from wire_helpers import snapshot_meta, vote  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")

OPT = RPCOption(hard_ttl=5.0)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@contextlib.asynccontextmanager
async def serve(app: web.Application, ctx: ssl.SSLContext) -> AsyncIterator[str]:
    """Serve ``app`` over HTTPS on a free port of 127.0.0.1; yield its https:// base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def never() -> asyncio.Future[ReplicationClosed]:
    return asyncio.get_running_loop().create_future()


# --- the transport over HTTPS ---------------------------------------------------------


async def test_transport_round_trips_over_https(tls: TlsFiles) -> None:
    handler = RecordingHandler()
    data = hashlib.sha256(b"seed").digest() * 4096 + b"tail"  # 128 KiB + 4, several chunks
    async with (
        serve(raft_app(handler), server_context(tls.node)) as url,
        HttpNetworkFactory(ssl=client_context(tls.ca.cert)) as factory,
    ):
        net = factory.new_client(2, Node(url))
        assert await net.append_entries(append_request(3), OPT) == Success()
        answer = await net.vote(vote_request(term=2), OPT)
        assert answer == VoteResponse(vote(2, committed=False), vote_granted=True, last_log_id=None)
        snapshot = Snapshot(snapshot_meta(), io.BytesIO(data), hashlib.sha256(data).hexdigest())
        option = RPCOption(hard_ttl=5.0, snapshot_chunk_size=40_000)
        done = await net.full_snapshot(vote(2), snapshot, never(), option)
    assert done.vote == vote(2)
    assert handler.names() == ["append_entries", "vote", "install_full_snapshot"]
    assert len(handler.calls[0][1].entries) == 3
    (installed,) = handler.installed
    assert (installed.size, installed.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert installed.meta == snapshot_meta()


async def test_client_that_does_not_trust_the_server_ca_is_unreachable(tls: TlsFiles) -> None:
    """A failed certificate check happens before a byte of the RPC is sent: ``Unreachable``."""
    handler = RecordingHandler()
    async with (
        serve(raft_app(handler), server_context(tls.node)) as url,
        HttpNetworkFactory(ssl=client_context(tls.other_ca.cert)) as factory,
    ):
        net = factory.new_client(2, Node(url))
        with pytest.raises(Unreachable) as info:
            await net.append_entries(append_request(1), OPT)
        assert info.value.target == 2
        assert "certificate" in str(info.value).lower()
        assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
        with pytest.raises(Unreachable):
            await net.vote(vote_request(), OPT)
        snapshot = Snapshot(snapshot_meta(), io.BytesIO(b"abc"))
        with pytest.raises(Unreachable):
            await net.full_snapshot(vote(2), snapshot, never(), OPT)
        # The default (system trust store) does not know the throwaway CA either.
        async with HttpNetworkFactory() as default_factory:
            with pytest.raises(Unreachable):
                await default_factory.new_client(2, Node(url)).vote(vote_request(), OPT)
    assert handler.calls == []


# --- mutual TLS -------------------------------------------------------------------------


async def test_mutual_tls_accepts_a_client_certificate_from_the_ca(tls: TlsFiles) -> None:
    handler = RecordingHandler()
    server = server_context(tls.node, require_client_ca=tls.ca.cert)
    async with (
        serve(raft_app(handler), server) as url,
        HttpNetworkFactory(ssl=client_context(tls.ca.cert, tls.client)) as factory,
    ):
        net = factory.new_client(2, Node(url))
        assert await net.append_entries(append_request(1), OPT) == Success()
        snapshot = Snapshot(snapshot_meta(), io.BytesIO(b"0123456789"))
        await net.full_snapshot(vote(2), snapshot, never(), OPT)
    assert handler.names() == ["append_entries", "install_full_snapshot"]
    assert handler.installed[0].sha256 == hashlib.sha256(b"0123456789").hexdigest()


@pytest.mark.parametrize("presented", ["none", "stranger"])
async def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(
    tls: TlsFiles, presented: str
) -> None:
    """The server refuses the client; the caller gets ``NetworkError``, never aiohttp's error.

    With TLS 1.3 the client's side of the handshake is over before the server checks
    the client certificate, so the refusal arrives as a reset on the first read
    (observed: ``ClientOSError`` ECONNRESET for JSON RPCs, ``ServerDisconnectedError``
    for snapshot uploads): the client cannot tell it from a dropped connection, hence
    ``NetworkError`` and not ``Unreachable``. Nothing reaches the handler.
    """
    handler = RecordingHandler()
    server = server_context(tls.node, require_client_ca=tls.ca.cert)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    pair = None if presented == "none" else tls.stranger
    async with (
        serve(raft_app(handler), server) as url,
        HttpNetworkFactory(ssl=client_context(tls.ca.cert, pair)) as factory,
    ):
        net = factory.new_client(2, Node(url))
        for call in (
            lambda: net.append_entries(append_request(1), OPT),
            lambda: net.vote(vote_request(), OPT),
            lambda: net.full_snapshot(
                vote(2), Snapshot(snapshot_meta(), io.BytesIO(b"abc")), never(), OPT
            ),
        ):
            with pytest.raises(RaftHttpError) as info:
                await call()
            assert type(info.value) is NetworkError, repr(info.value)
            assert info.value.target == 2
            assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert handler.calls == []


async def test_mutual_tls_refusal_kind_under_tls_1_2(tls: TlsFiles) -> None:
    """Pinned to TLS 1.2, the refusal happens inside the handshake: ``Unreachable``."""
    handler = RecordingHandler()
    server = server_context(tls.node, require_client_ca=tls.ca.cert)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    async with (
        serve(raft_app(handler), server) as url,
        HttpNetworkFactory(ssl=client_context(tls.ca.cert)) as factory,
    ):
        with pytest.raises(Unreachable):
            await factory.new_client(2, Node(url)).append_entries(append_request(1), OPT)
    assert handler.calls == []


# --- three in-process KV nodes over mutual TLS ---------------------------------------------


def _cli_contexts(tls: TlsFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The node's server and client contexts, built the way kv/cli.py builds them."""
    return (
        server_context(tls.node, require_client_ca=tls.ca.cert),
        client_context(tls.ca.cert, tls.node),
    )


async def _wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None


async def _read(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as resp:
        return await resp.read()


async def test_three_kv_nodes_over_mutual_tls(tls: TlsFiles, tmp_path: Path) -> None:
    nodes: list[KVNode] = []
    api_tls = client_context(tls.ca.cert, tls.client)
    try:
        for n in (1, 2, 3):
            server_ssl, client_ssl = _cli_contexts(tls)
            node = KVNode(n, tmp_path / str(n), server_ssl=server_ssl, client_ssl=client_ssl)
            nodes.append(node)
            await node.start()
            assert node.url.startswith("https://127.0.0.1:")
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=api_tls),
            timeout=aiohttp.ClientTimeout(total=15),
            headers={"Content-Type": "application/json"},
        ) as session:
            members = [[node.node_id, node.addr] for node in nodes]
            resp = await session.post(f"{nodes[1].url}/init", json=members)
            assert resp.status == 200, await resp.text()

            def agreed_leader() -> int | None:
                leaders = {node.raft.metrics().current_leader for node in nodes}
                if len(leaders) != 1 or None in leaders:
                    return None
                (leader_id,) = leaders
                leader = next((n for n in nodes if n.node_id == leader_id), None)
                return leader_id if leader and leader.raft.metrics().state == "Leader" else None

            # A busy loop may delay a heartbeat into a new election: retry (bounded)
            # until a follower answers with the leader it knows.
            write = b'{"Set":{"key":"tls","value":"yes"}}'
            for _ in range(50):
                await _wait(lambda: agreed_leader() is not None, "a leader all nodes agree on")
                follower = next(n for n in nodes if n.node_id != agreed_leader())
                resp = await session.post(
                    f"{follower.url}/write", data=write, allow_redirects=False
                )
                if resp.status != 503:
                    break
                await asyncio.sleep(0.1)
            assert resp.status == 307, await resp.text()
            leader_id = (await resp.json())["error"]["leader_id"]
            leader = next(n for n in nodes if n.node_id == leader_id)
            assert resp.headers["Location"] == f"https://{leader.addr}/write"
            # Following the redirect lands the write on the leader, over HTTPS.
            resp = await session.post(f"{follower.url}/write", data=write)
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["data"] == {"value": "yes"}
            for node in nodes:
                resp = await session.post(f"{node.url}/consistent_read", data=b'"tls"')
                assert resp.status == 200, await resp.text()
                assert await resp.json() == {"value": "yes"}
            # Replication itself went over mutual TLS: every state machine has the value.
            await _wait(
                lambda: all(n.state_machine.get("tls") == "yes" for n in nodes), "replication"
            )

        # The API requires a client certificate too (the node's server context does).
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(tls.ca.cert)),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as anonymous:
            with pytest.raises(aiohttp.ClientConnectionError):
                await _read(anonymous, f"{nodes[0].url}/metrics")
    finally:
        for node in nodes:
            await node.stop()


# --- the CLI ------------------------------------------------------------------------------


class TlsProcessCluster(ProcessCluster):
    """``ProcessCluster`` whose nodes serve HTTPS: requests go over ``context``."""

    def __init__(self, root: Path, node_ids: list[int], tls: TlsFiles) -> None:
        super().__init__(
            root,
            node_ids,
            [
                "--tls-cert", str(tls.node.cert), "--tls-key", str(tls.node.key),
                "--tls-ca", str(tls.ca.cert),
            ],
        )  # fmt: skip
        self.context = client_context(tls.ca.cert, tls.client)
        self.start_timeout = 15.0

    def url(self, node_id: int, route: str) -> str:
        return f"https://{self.addr(node_id)}{route}"

    def http(
        self, method: str, url: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        return https(method, url, self.context, body, timeout)


def https(
    method: str, url: str, context: ssl.SSLContext, body: Any = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], Any]:
    """One HTTPS request over ``context``, redirects not followed."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(req, timeout=timeout) as resp:
            payload = resp.read()
            return resp.status, dict(resp.headers), json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        payload = e.read()
        return e.code, dict(e.headers), json.loads(payload) if payload else None


@pytest.fixture
def tls_cluster(tmp_path: Path, tls: TlsFiles) -> Iterator[TlsProcessCluster]:
    cluster = TlsProcessCluster(tmp_path, [1], tls)
    try:
        yield cluster
    finally:
        cluster.close()
        print(cluster.logs())  # shown by pytest when the test failed


def test_cli_node_serves_https_with_client_certificates(
    tls_cluster: TlsProcessCluster, tls: TlsFiles
) -> None:
    cluster = tls_cluster
    cluster.start(1)  # waits (bounded) until /metrics answers 200 over mutual TLS
    url = cluster.url(1, "/metrics")
    status, _, metrics = https("GET", url, cluster.context, timeout=5)
    assert status == 200
    assert metrics["id"] == 1
    # A one-node cluster writes and reads over HTTPS.
    cluster.call(1, "/init", [])
    cluster.wait_leader(timeout=15)
    cluster.write(1, "k", "v", timeout=15)
    assert cluster.call(1, "/consistent_read", "k") == {"value": "v"}

    # Without a client certificate, or with one from another CA: refused.
    for refused in (client_context(tls.ca.cert), client_context(tls.ca.cert, tls.stranger)):
        # TLS 1.3: the handshake completes on our side, then the node closes without answering.
        with pytest.raises((ConnectionError, ssl.SSLError)):
            https("GET", url, refused, timeout=5)
    # A client that does not trust the node's CA refuses the node.
    with pytest.raises(urllib.error.URLError) as info:
        https("GET", url, client_context(tls.other_ca.cert, tls.client), timeout=5)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    # Plain HTTP to the HTTPS port gets no answer.
    with pytest.raises(ConnectionError):
        urllib.request.urlopen(f"http://{cluster.addr(1)}/metrics", timeout=5)
    assert cluster.running(1)
