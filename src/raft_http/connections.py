"""Bounded server connections: a flood of idle sockets cannot take a node's fds from its peers.

A node that runs out of file descriptors cannot accept its peers' connections, open
its own to them, or write its log, and asyncio then logs every failed ``accept()``
(thousands of lines a second). Three defences, all for aiohttp servers:

- ``ConnectionGuard`` caps the connections a server holds, below the fd limit. A
  connection past the cap evicts the oldest idle connection that never made a Raft
  request (so peers are favoured over anonymous clients), or is closed at once.
- ``ConnectionLimits.idle_timeout`` becomes aiohttp's ``keepalive_timeout``: a
  connection with no request in flight is closed after it (aiohttp's default is an hour).
- ``AcceptErrorFilter`` logs asyncio's ``socket.accept() out of system resource``
  once per interval, with a count, instead of once per failed accept.

``GuardedSite`` is aiohttp's ``TCPSite`` with the guard in front of the app's protocol
factory. No Raft knowledge here beyond the path prefix of the peer routes.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "AcceptErrorFilter",
    "ConnectionGuard",
    "ConnectionLimits",
    "GuardedSite",
    "default_max_connections",
]

log = logging.getLogger(__name__)

ACCEPT_BATCH: Final = 16
"""Connections asyncio accepts per wakeup, before any of them reaches the guard: each holds a
descriptor until refused, so the cap leaves room for a few batches (asyncio's default is 128)."""
DEFAULT_IDLE_TIMEOUT: Final = 20.0
"""Above aiohttp's client pool keep-alive (15 s), so a client drops an idle connection first."""
FD_RESERVE_MIN: Final = 64
"""File descriptors kept for everything but inbound connections (log, snapshots, peers)."""
_ACCEPT_ERROR: Final = "socket.accept() out of system resource"
_NOT_A_PEER: Final = frozenset({401, 403, 412})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def default_max_connections() -> int:
    """Inbound connections that leave a quarter (at least 64) of ``RLIMIT_NOFILE`` free,
    and room for three accept batches in flight."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(8, soft - max(FD_RESERVE_MIN, soft // 4) - 3 * ACCEPT_BATCH)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """``max_connections``: inbound connections held at once (None: from the fd limit).
    ``idle_timeout``: seconds a connection with no request in flight stays open.
    ``log_interval``: at most one log line per this many seconds about refusals.
    """

    max_connections: int | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections!r}")
        if not self.idle_timeout > 0 or not self.log_interval > 0:
            raise ValueError("idle_timeout and log_interval must be > 0 seconds")

    @property
    def connections(self) -> int:
        return default_max_connections() if self.max_connections is None else self.max_connections


class _Refused(asyncio.Protocol):
    """A connection past the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _abort(transport)


class _State:
    __slots__ = ("in_flight", "peer")

    def __init__(self) -> None:
        self.in_flight = 0
        self.peer = False


class _Tracked(asyncio.Protocol):
    """One connection, counted by the guard from accept to close.

    aiohttp reports a connection only once its handler task runs, and accepts come in
    bursts before that, so the guard counts what it handed out itself. aiohttp's
    handler (an object and a task) is made only when the first byte arrives: until
    then an idle connection costs a transport and this object, and is closed after
    ``idle_timeout``.
    """

    __slots__ = ("_guard", "_idle", "_server", "evicted", "handler", "transport")

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self._guard = guard
        self._server = server
        self.handler: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True
        if self.handler is not None:
            self.handler.force_close()  # closes its transport
        elif self.transport is not None:
            _abort(self.transport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.evicted:  # evicted between accept and now
            _abort(transport)
            return
        # Not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._guard.limits.idle_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            if self.transport is None or self.evicted:
                return
            if self._idle is not None:
                self._idle.cancel()
            self.handler = self._server()
            self.handler.connection_made(self.transport)
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            self.handler.eof_received()
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard._lost(self)
        if self._idle is not None:
            self._idle.cancel()
        if self.handler is not None:
            self.handler.connection_lost(exc)


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)  # uvloop's transports are not asyncio's
    if abort is not None:
        abort()  # no lingering: the fd is free at once
    else:
        transport.close()


class _RateLimitedLog:
    """One line per ``interval`` with the count of what happened since the last one."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -interval
        self.suppressed = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        now = self._clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return
        self._last = now
        more = f" (and {self.suppressed} more in {self.interval:g}s)" if self.suppressed else ""
        self.suppressed = 0
        log.log(level, message + more, *args)


class ConnectionGuard:
    """Keeps a server's connections at ``limits.connections`` at most; peers first.

    Install ``middleware`` on the app (it tells requests in flight and peers apart)
    and serve through ``protocol_factory(server)`` (``GuardedSite`` does both ends).
    A connection counts as a peer once a request under ``peer_prefix`` got past
    authentication.
    """

    def __init__(self, limits: ConnectionLimits | None = None, *, peer_prefix: str = "/") -> None:
        self.limits = limits if limits is not None else ConnectionLimits()
        self.max_connections = self.limits.connections
        self.peer_prefix = peer_prefix
        self.evicted = 0
        self.refused = 0
        self._states: dict[RequestHandler, _State] = {}
        self._open: dict[_Tracked, None] = {}  # in accept order: oldest first
        self._log = _RateLimitedLog(self.limits.log_interval)

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        protocol = request.protocol
        state = self._states.get(protocol)
        if state is None:
            state = self._states[protocol] = _State()
        state.in_flight += 1
        try:
            response = await handler(request)
        finally:
            state.in_flight -= 1
        if request.path.startswith(self.peer_prefix) and response.status not in _NOT_A_PEER:
            state.peer = True
        return response

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.BaseProtocol]:
        def factory() -> asyncio.BaseProtocol:
            if self._make_room():
                tracked = _Tracked(self, server)
                self._open[tracked] = None
                return tracked
            self.refused += 1
            self._log(
                logging.WARNING,
                "connection limit %d reached: refusing connections (%d refused, %d idle "
                "evicted so far)",
                self.max_connections,
                self.refused,
                self.evicted,
            )
            return _Refused()

        return factory

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _lost(self, tracked: _Tracked) -> None:
        self._open.pop(tracked, None)
        if tracked.handler is not None:
            self._states.pop(tracked.handler, None)

    def _make_room(self) -> bool:
        """True if a new connection fits, after evicting idle non-peer ones if needed."""
        excess = len(self._open) + 1 - self.max_connections
        if excess <= 0:
            return True
        self._log(
            logging.WARNING,
            "connection limit %d reached: closing idle connections that are not peers' "
            "(%d closed, %d refused so far)",
            self.max_connections,
            self.evicted,
            self.refused,
        )
        for tracked in list(self._open):  # oldest first
            handler = tracked.handler
            state = None if handler is None else self._states.get(handler)
            if state is None or (not state.peer and state.in_flight == 0):
                # Gone from the count now; its fd is freed once the loop closes it.
                self._lost(tracked)
                tracked.evict()
                self.evicted += 1
                excess -= 1
                if excess <= 0:
                    return True
        return False


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a ``ConnectionGuard`` first."""

    __slots__ = ("_bound_port", "_guard", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._guard = guard

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if not isinstance(server, web.Server):
            raise RuntimeError("GuardedSite needs a runner serving an aiohttp web.Server")
        loop = asyncio.get_running_loop()
        family, *_, address = (
            await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )[0]
        try:
            sock = socket.create_server(address[:2], family=family, backlog=self._backlog)
        except OSError as e:  # worded as asyncio's create_server words it
            raise OSError(
                e.errno,
                f"error while attempting to bind on address {address[:2]!r}: "
                f"{(e.strerror or str(e)).lower()}",
            ) from None
        try:
            # asyncio accepts up to ``backlog`` connections per wakeup and calls listen()
            # with it: give it a small batch, then give the kernel its queue back.
            self._server = await loop.create_server(
                self._guard.protocol_factory(server),
                sock=sock,
                ssl=self._ssl_context,
                backlog=ACCEPT_BATCH,
                ssl_handshake_timeout=10.0 if self._ssl_context is not None else None,
            )
            sock.listen(self._backlog)
        except BaseException:
            sock.close()
            raise
        self._bound_port = sock.getsockname()[1]


class AcceptErrorFilter:
    """A loop exception handler that rate-limits asyncio's failed-accept reports.

    Everything else goes to the handler that was installed before (or the default).
    ``install()`` and ``uninstall()`` put it on, and take it off, the running loop.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._log = _RateLimitedLog(interval)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    @property
    def suppressed(self) -> int:
        return self._log.suppressed

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self._loop is not None and self._loop.get_exception_handler() is self:
            self._loop.set_exception_handler(self._previous)
        self._loop = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_ERROR:
            self._log(
                logging.WARNING,
                "cannot accept connections: %s (out of file descriptors?)",
                context.get("exception"),
            )
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
