"""The key-value application's HTTP API, after Openraft's raft-kv example.

Routes (bodies are JSON; answers are JSON; errors are ``{"error": {"kind", "message", ...}}``):

- ``POST /init`` ``[[1, "127.0.0.1:21001"], ...]`` (``[]``: a cluster of this node alone)
- ``POST /add-learner`` ``[4, "127.0.0.1:21004"]``
- ``POST /change-membership`` ``[1, 2, 3, 4]``
- ``POST /remove-learner`` ``[4]`` (learners only; voters leave by ``/change-membership``)
- ``POST /transfer-leader`` ``2`` (or ``null``: the most up-to-date voter)
- ``POST /write`` ``{"Set": {"key": "foo", "value": "bar"}}`` or ``{"Delete": {"key": "foo"}}``
- ``POST /read`` ``"foo"`` (local, may be stale)
- ``POST /consistent_read`` ``"foo"`` (linearizable: confirmed by a quorum first)
- ``GET /metrics``, ``GET /health``, ``GET /ready`` (``probes.py``)

With an API token (``kv_api(api_token=...)``; ``KVNode`` uses the Raft token when no
API token is given), every route but ``OPEN_PATHS`` answers ``401`` without
``Authorization: Bearer <token>``, before routing, so a caller without the credential
learns nothing and can change nothing.

What only the leader may do answers ``307`` to the leader's same route when this
node is not the leader (clients that follow redirects need do nothing), or ``503``
with ``Retry-After`` while no leader is known. Bad bodies answer ``400`` naming
the field; this module never answers 500 for bad input.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Final, Protocol, TypeAlias, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta, Struct

from ..errors import APIError, Fatal, RaftError
from ..protocol import JSON, parse_node_address
from ..raft.errors import LearnerNotCaughtUp, NodeRemoved
from ..raft.metrics import ServerState
from ..types import LogId, Node, NodeId, encode_json
from .instruments import NodeInstruments
from .intake import (
    ADMIN_MAX_BODY_SIZE,
    BODY,
    DEFAULT_BODY_TIMEOUT,
    OPEN_PATHS,
    ApiErrorBody,
    ApiErrorDetail,
    api_auth,
    body_intake,
    error_response,
)
from .probes import install_probes
from .state_machine import InvalidCommand, KVStateMachine, decode_command

__all__ = [
    "KV_API",
    "OPEN_PATHS",
    "ApiErrorBody",
    "ApiErrorDetail",
    "KVApi",
    "RaftAPI",
    "base_url",
    "error_response",
    "kv_api",
]

logger = logging.getLogger(__name__)

Address: TypeAlias = Annotated[str, Meta(min_length=1, max_length=2048)]


class RaftAPI(Protocol):
    """What the API asks of the Raft core (``raft_http.raft.Raft`` provides it)."""

    async def initialize(self, nodes: dict[int, Node]) -> None: ...

    async def client_write(self, data: bytes) -> Any: ...

    async def ensure_linearizable(self) -> LogId | None: ...

    async def add_learner(
        self, node_id: int, node: Node, blocking: bool = True, timeout: float = 60.0
    ) -> Any: ...

    async def remove_learner(self, node_ids: Iterable[int]) -> Any: ...

    async def change_membership(self, voters: Iterable[int], retain: bool = False) -> Any: ...

    async def transfer_leader(self, to: int | None = None) -> int: ...

    def metrics(self) -> Any: ...


class ValueResponse(Struct, frozen=True):
    value: str | None


_INIT_DECODER: Final = msgspec.json.Decoder(list[tuple[NodeId, Address]])
_LEARNER_DECODER: Final = msgspec.json.Decoder(tuple[NodeId, Address])
_VOTERS_DECODER: Final = msgspec.json.Decoder(list[NodeId])
_TARGET_DECODER: Final = msgspec.json.Decoder(NodeId | None)
_KEY_DECODER: Final = msgspec.json.Decoder(str)

_RETRYABLE_KINDS: Final = frozenset(
    {"quorum_not_enough", "write_aborted", "write_outcome_unknown", "overloaded", "transfer_failed"}
)
"""Core refusals that a later attempt may not get: 503 with ``Retry-After`` rather than 409.

``write_aborted`` means the write was not applied; ``write_outcome_unknown`` that it may be.
``overloaded``: the leader holds as many uncommitted writes as it may (nothing was proposed).
``transfer_failed``: a leadership transfer did not finish in time.
"""

T = TypeVar("T")
Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]


def base_url(addr: str, scheme: str = "http") -> str:
    """The URL a node address stands for: ``host:port`` means ``<scheme>://host:port``."""
    if "://" in addr:
        return addr.rstrip("/")
    return f"{scheme}://{addr}"


def _same_address(a: str, b: str, scheme: str) -> bool:
    """Whether two node addresses name the same base URL (``host:port`` means ``scheme``)."""
    try:
        return parse_node_address(base_url(a, scheme)) == parse_node_address(base_url(b, scheme))
    except ValueError:
        return False


def _uninitialized(metrics: Any) -> bool:
    """Whether the core's metrics say this node belongs to no cluster yet (and no leader
    is bringing it one: a learner being added hears its leader before any membership)."""
    stored = getattr(metrics, "membership_config", None)
    leader = getattr(metrics, "current_leader", None)
    return stored is not None and not stored.membership.nodes and leader is None


def _json(value: Any) -> web.Response:
    return web.Response(body=encode_json(value), content_type=JSON)


class _BadRequest(Exception):
    """A body that does not decode; answered 400 with msgspec's message (it names the field)."""


def _check_address(addr: str, path: str) -> None:
    try:
        parse_node_address(addr)
    except ValueError as e:
        raise _BadRequest(f"{e} - at `{path}`") from None


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: aiohttp's own 404/405/413 and anything unexpected (500, logged)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = {
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(e.status, "bad_request" if e.status < 500 else "internal")
        if e.status == 413:
            return error_response(
                413, kind, e.text or e.reason, limit=request.app.get(CLIENT_MAX_SIZE)
            )
        return error_response(e.status, kind, f"{e.reason}: {request.method} {request.path}")
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error")


CLIENT_MAX_SIZE: Final = web.AppKey("client_max_size", int)


class KVApi:
    """The route handlers, bound to one node's Raft and state machine."""

    def __init__(
        self,
        raft: RaftAPI,
        state_machine: KVStateMachine,
        *,
        node_id: int,
        addr: str,
        scheme: str = "http",
        write_timeout: float = 10.0,
        leader_timeout: float | None = None,
    ) -> None:
        self.raft = raft
        self.state_machine = state_machine
        self.node_id = node_id
        self.addr = addr
        self.listen_addr: str | None = None
        """Where the node listens, when it differs from ``addr`` (``--advertise``)."""
        self.scheme = scheme
        self.write_timeout = write_timeout
        self.leader_timeout = leader_timeout
        """A follower that has not heard from its leader this long answers 503 no_leader."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/init", self.init),
            web.post("/add-learner", self.add_learner),
            web.post("/change-membership", self.change_membership),
            web.post("/remove-learner", self.remove_learner),
            web.post("/transfer-leader", self.transfer_leader),
            web.post("/write", self.write),
            web.post("/read", self.read),
            web.post("/consistent_read", self.consistent_read),
        ]

    async def _body(self, request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
        data = request[BODY]
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as e:
            raise _BadRequest(str(e)) from None

    async def _call(
        self, request: web.Request, action: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """Run a Raft call and turn what it raises into an honest HTTP answer."""
        try:
            async with asyncio.timeout(self.write_timeout):
                return await action()
        except _BadRequest as e:
            return error_response(400, "bad_request", str(e))
        except TimeoutError:
            return error_response(
                503,
                "timeout",
                f"no answer from the cluster within {self.write_timeout:g}s; "
                "a write may still be applied later",
                headers={"Retry-After": "1"},
            )
        except Fatal as e:
            return error_response(503, "fatal", f"this node has stopped: {e.reason}")
        except APIError as e:
            if e.kind == "forward_to_leader":
                return self._forward(request, e)
            if e.kind in _RETRYABLE_KINDS:
                return error_response(503, e.kind, e.message, headers={"Retry-After": "1"})
            return error_response(409, e.kind, e.message)
        except RaftError as e:
            return error_response(503, "raft_error", str(e))

    def _forward(self, request: web.Request, e: APIError) -> web.Response:
        leader_id: int | None = getattr(e, "leader_id", None)
        leader_node: Node | None = getattr(e, "leader_node", None)
        metrics = self.raft.metrics()
        if leader_id is None or leader_node is None or leader_id == self.node_id:
            if _uninitialized(metrics):
                return error_response(
                    503,
                    "not_initialized",
                    f"node {self.node_id} is in no cluster yet: POST /init to it (`[]` for a "
                    'cluster of this node alone, or `[[id, "host:port"], ...]` naming it), or '
                    "add it from the leader with POST /add-learner "
                    f'[{self.node_id}, "{self.addr}"]',
                )
            return error_response(
                503,
                "no_leader",
                "no leader is known yet (election in progress); retry shortly",
                headers={"Retry-After": "1"},
            )
        silent = getattr(metrics, "since_leader_heard", None)
        if self.leader_timeout is not None and silent is not None and silent > self.leader_timeout:
            # Its leader may be dead: a redirect there would only fail (or hang) again.
            return error_response(
                503,
                "no_leader",
                f"node {self.node_id} has not heard from its leader (node {leader_id}) for "
                f"{silent:.2f}s; an election is likely under way; retry shortly",
                headers={"Retry-After": "1"},
            )
        location = base_url(leader_node.addr, self.scheme) + request.rel_url.path
        return error_response(
            307,
            "forward_to_leader",
            f"node {self.node_id} is not the leader; send to node {leader_id} at {location}",
            headers={"Location": location},
            leader_id=leader_id,
            leader_addr=leader_node.addr,
        )

    async def init(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            members = await self._body(request, _INIT_DECODER)
            if members:
                for i, (_, addr) in enumerate(members):
                    _check_address(addr, f"$[{i}][1]")
                nodes = {node_id: Node(addr) for node_id, addr in members}
                if len(nodes) != len(members):
                    raise _BadRequest("a node id appears twice - at `$`")
                self._check_own_entry(members)
            else:
                nodes = {self.node_id: Node(self.addr)}
            await self.raft.initialize(nodes)
            logger.info("initialized the cluster with %s", {k: v.addr for k, v in nodes.items()})
            return _json({"initialized": nodes})

        return await self._call(request, action)

    def _check_own_entry(self, members: list[tuple[int, str]]) -> None:
        """This node must be a member, at an address that reaches it (``addr`` or where it
        listens): a cluster whose membership names it elsewhere can never hear from it."""
        own = [i for i, (node_id, _) in enumerate(members) if node_id == self.node_id]
        if not own:
            raise _BadRequest(
                f"this node (id {self.node_id}) is not among the members: send /init to a "
                "node of the new cluster - at `$`"
            )
        (i,) = own
        given = members[i][1]
        known = [a for a in (self.addr, self.listen_addr) if a is not None]
        if not any(_same_address(given, a, self.scheme) for a in known):
            raise _BadRequest(
                f"the entry for this node (id {self.node_id}) says {given!r}, but it is at "
                f"{self.addr!r}: fix the entry, or start the node with --advertise {given} "
                f"- at `$[{i}][1]`"
            )

    async def add_learner(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            node_id, addr = await self._body(request, _LEARNER_DECODER)
            _check_address(addr, "$[1]")
            # Half the answer's deadline for catching up: the rest is for the change itself.
            wait = self.write_timeout / 2
            try:
                resp = await self.raft.add_learner(node_id, Node(addr), blocking=True, timeout=wait)
            except LearnerNotCaughtUp as e:
                # Added, but not caught up: 202, and whether it is unreachable.
                body = {
                    "log_id": e.log_id,
                    "caught_up": False,
                    "unreachable": e.unreachable,
                    "error": {"kind": e.kind, "message": e.message},
                }
                return web.Response(status=202, body=encode_json(body), content_type=JSON)
            return _json({"log_id": resp.log_id, "data": resp.data})

        return await self._call(request, action)

    async def remove_learner(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            node_ids = await self._body(request, _VOTERS_DECODER)
            resp = await self.raft.remove_learner(set(node_ids))
            return _json({"log_id": resp.log_id, "data": resp.data})

        return await self._call(request, action)

    async def change_membership(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            voters = await self._body(request, _VOTERS_DECODER)
            if not voters:
                raise _BadRequest("a membership needs at least one voter - at `$`")
            resp = await self.raft.change_membership(set(voters), retain=False)
            return _json({"log_id": resp.log_id, "data": resp.data})

        return await self._call(request, action)

    async def transfer_leader(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            target = await self._body(request, _TARGET_DECODER)
            leader_id = await self.raft.transfer_leader(target)
            return _json({"leader_id": leader_id})

        return await self._call(request, action)

    async def write(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            data = request[BODY]
            try:
                decode_command(data)
            except InvalidCommand as e:
                raise _BadRequest(str(e)) from None
            resp = await self.raft.client_write(bytes(data))
            return _json({"log_id": resp.log_id, "data": resp.data})

        return await self._call(request, action)

    async def read(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            key = await self._body(request, _KEY_DECODER)
            if getattr(self.raft.metrics(), "state", None) == ServerState.REMOVED:
                raise NodeRemoved(self.node_id)  # its data is stale for good
            return _json(ValueResponse(self.state_machine.get(key)))

        return await self._call(request, action)

    async def consistent_read(self, request: web.Request) -> web.Response:
        async def action() -> web.Response:
            key = await self._body(request, _KEY_DECODER)
            await self.raft.ensure_linearizable()
            return _json(ValueResponse(self.state_machine.get(key)))

        return await self._call(request, action)


KV_API: Final = web.AppKey("kv_api", KVApi)
"""The handlers' state in the app, e.g. to set ``addr`` once a free port is bound."""


def kv_api(
    raft: RaftAPI,
    state_machine: KVStateMachine,
    *,
    node_id: int,
    addr: str,
    scheme: str = "http",
    write_timeout: float = 10.0,
    client_max_size: int = 1024**2,
    api_token: str | None = None,
    admin_max_body_size: int = ADMIN_MAX_BODY_SIZE,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    instruments: NodeInstruments | None = None,
    leader_timeout: float | None = None,
) -> web.Application:
    """The KV API as an aiohttp app; ``KVNode`` mounts the Raft routes under it at ``/raft``.

    ``addr`` is this node's address as peers and clients know it (``host:port`` or a URL);
    ``scheme`` is what a bare ``host:port`` means in a redirect (``https`` with TLS).
    ``api_token``: require it as a bearer token on every route but ``OPEN_PATHS``.
    ``client_max_size`` bounds a body (``admin_max_body_size`` on ``/init`` and the
    membership routes); ``body_timeout`` is how long a body may take to arrive.
    ``instruments``: where the node counts its traffic (``/metrics``); shared with its
    network and log store by ``KVNode``. ``leader_timeout``: a follower that has not
    heard from its leader this long answers 503 ``no_leader`` instead of redirecting there.
    """
    if min(client_max_size, admin_max_body_size) <= 0 or not body_timeout > 0:
        raise ValueError("body limits and body_timeout must be > 0")
    instruments = instruments or NodeInstruments()
    api = KVApi(
        raft,
        state_machine,
        node_id=node_id,
        addr=addr,
        scheme=scheme,
        write_timeout=write_timeout,
        leader_timeout=leader_timeout,
    )
    app = web.Application(
        middlewares=[
            instruments.middleware,
            json_errors,
            api_auth(api_token, KV_API),
            body_intake(client_max_size, admin_max_body_size, body_timeout, KV_API),
        ],
        client_max_size=client_max_size,
    )
    app[CLIENT_MAX_SIZE] = client_max_size
    app[KV_API] = api
    app.add_routes(api.routes())
    install_probes(app, raft, instruments, reveal=api_token is None)
    return app
