"""ConnectionGuard, GuardedSite and AcceptErrorFilter against real sockets, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from raft_http.connections import (
    AcceptErrorFilter,
    ConnectionGuard,
    ConnectionLimits,
    GuardedSite,
    default_max_connections,
)


def make_app(guard: ConnectionGuard) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        """Answers the client's port: the same port means the same connection."""
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    async def locked(request: web.Request) -> web.Response:
        return web.Response(status=401, text="no")

    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/raft/ping", ok)
    app.router.add_get("/raft/locked", locked)
    app.router.add_get("/public", ok)
    return app


@contextlib.asynccontextmanager
async def serve(
    limits: ConnectionLimits,
) -> AsyncIterator[tuple[ConnectionGuard, int]]:
    guard = ConnectionGuard(limits, peer_prefix="/raft/")
    runner = web.AppRunner(make_app(guard), keepalive_timeout=limits.idle_timeout)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, guard)
    await site.start()
    try:
        yield guard, site.port
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def idle_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that never send a byte; closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server has closed (they read EOF or a reset)."""
    closed = 0
    for s in socks:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


def open_connections(guard: ConnectionGuard) -> int:
    """Connections the guard counts; it counts until the loop reports them closed."""
    return guard.open_connections


async def settle(guard: ConnectionGuard, expect: int, timeout: float = 5.0) -> None:
    """Wait (bounded) until the server holds ``expect`` open connections."""
    async with asyncio.timeout(timeout):
        while open_connections(guard) != expect:
            await asyncio.sleep(0.02)


async def test_idle_connections_past_the_cap_are_evicted_oldest_first_peers_kept() -> None:
    async with (
        serve(ConnectionLimits(max_connections=8, idle_timeout=60)) as (guard, port),
        aiohttp.ClientSession() as peer,
        aiohttp.ClientSession() as stranger,
    ):
        base = f"http://127.0.0.1:{port}"
        async with peer.get(f"{base}/raft/ping") as resp:  # now a peer connection
            assert resp.status == 200
            peer_port = await resp.text()
        async with stranger.get(f"{base}/raft/locked") as resp:  # refused by auth: not a peer
            assert resp.status == 401
        with idle_sockets(port, 50) as flood:
            await settle(guard, 8)
            await asyncio.sleep(0.2)
            assert open_connections(guard) == 8
            # 52 connections for 8 places: the stranger's (oldest idle non-peer) and the
            # 43 oldest of the flood went; the peer's stayed.
            assert guard.evicted == 44
            assert closed_by_server(flood) == 43
            # The peer's pooled connection survived the flood: reused, not reconnected.
            async with peer.get(f"{base}/raft/ping") as resp:
                assert resp.status == 200
                assert await resp.text() == peer_port
            # A newcomer still gets in, by evicting an idle flood connection.
            async with aiohttp.ClientSession() as newcomer, newcomer.get(f"{base}/public") as r:
                assert r.status == 200
        assert guard.refused == 0


async def test_when_no_connection_can_be_evicted_new_ones_are_closed_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = ConnectionLimits(max_connections=2, idle_timeout=60, log_interval=60)
    async with serve(limits) as (guard, port):
        base = f"http://127.0.0.1:{port}"
        sessions = [aiohttp.ClientSession() for _ in range(2)]
        try:
            for s in sessions:
                async with s.get(f"{base}/raft/ping") as resp:
                    assert resp.status == 200
            with caplog.at_level(logging.WARNING, "raft_http.connections"):
                for _ in range(20):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n")
                    with contextlib.suppress(ConnectionResetError):
                        async with asyncio.timeout(5):
                            assert await reader.read(100) == b""  # closed, no answer
                    writer.close()
            assert guard.refused == 20
            assert open_connections(guard) == 2
            lines = [r for r in caplog.records if "connection limit 2 reached" in r.message]
            assert len(lines) == 1  # rate-limited: one line, not twenty
        finally:
            for s in sessions:
                await s.close()


async def test_idle_timeout_closes_connections_without_a_request() -> None:
    async with serve(ConnectionLimits(max_connections=100, idle_timeout=0.3)) as (guard, port):
        with idle_sockets(port, 10):
            await settle(guard, 10)
            await settle(guard, 0, timeout=5)


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[dict[str, object]] = []
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(lambda _loop, context: seen.append(context))

        async def main() -> None:
            accept_errors = AcceptErrorFilter(interval=60)
            accept_errors.install()
            error = {
                "message": "socket.accept() out of system resource",
                "exception": OSError(24, "Too many open files"),
            }
            with caplog.at_level(logging.WARNING, "raft_http.connections"):
                for _ in range(10_000):
                    loop.call_exception_handler(dict(error))
            loop.call_exception_handler({"message": "something else"})
            assert accept_errors.suppressed == 9_999
            accept_errors.uninstall()
            loop.call_exception_handler({"message": "after"})

        loop.run_until_complete(main())
    finally:
        loop.close()
    assert [c["message"] for c in seen] == ["something else", "after"]
    lines = [r for r in caplog.records if "cannot accept connections" in r.message]
    assert len(lines) == 1


def test_the_default_cap_leaves_file_descriptors_free() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = default_max_connections()
    assert 8 <= cap <= soft - 64
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        ConnectionLimits(idle_timeout=0)


def test_the_guard_serves_and_evicts_under_uvloop() -> None:
    """uvloop's transports do not subclass asyncio's: the guard must not assume they do
    (it asserted so, and every connection then failed under uvloop)."""
    import uvloop

    async def scenario() -> None:
        limits = ConnectionLimits(max_connections=4, idle_timeout=60)
        async with (
            asyncio.timeout(20),
            serve(limits) as (guard, port),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        ):
            async with client.get(f"http://127.0.0.1:{port}/public") as resp:
                assert resp.status == 200
            with idle_sockets(port, 10) as flood:
                await settle(guard, 4)
                await asyncio.sleep(0.2)
                # 11 connections for 4 places: the client's idle one and 6 of the flood went.
                assert guard.evicted == 7
                assert closed_by_server(flood) == 6

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
