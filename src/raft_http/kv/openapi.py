"""``GET /openapi.json``: every route a node serves, the KV API and the Raft routes at ``/raft``.

Request and response schemas come from the msgspec types the code encodes and decodes
(``msgspec.json.schema_components``); nothing here writes a JSON Schema by hand. The
route table below is checked against the app's router by the tests, and schemathesis
fuzzes a live node from this document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web
from msgspec import Struct

from .. import __version__
from ..raft import RaftMetrics
from ..types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    ErrorBody,
    Node,
    NodeId,
    SnapshotResponse,
    TransferLeaderRequest,
    VoteRequest,
    VoteResponse,
)
from .api import Address, ApiErrorBody, ValueResponse
from .client import ClusterStatus, WriteResult
from .probes import ProbeAnswer
from .state_machine import _Envelope


class Initialized(Struct, frozen=True):
    """``POST /init``'s answer: the first membership's nodes."""

    initialized: dict[NodeId, Node]


class WriteCommand(_Envelope, frozen=True, forbid_unknown_fields=True):
    """``POST /write``'s body: exactly one of ``Set`` and ``Delete`` (what ``/write`` decodes;
    a subclass only to give the schema a public name)."""


class LeaderTransferred(Struct, frozen=True):
    """``POST /transfer-leader``'s answer: the node that leads now."""

    leader_id: NodeId


class Handed(Struct, frozen=True):
    """``POST /raft/transfer-leader``'s answer: ``{}``, the target campaigns."""


BINARY: Final = "binary"
"""A request or response body of raw bytes (a snapshot), not JSON."""
TEXT: Final = "text"
"""A text body (the Prometheus exposition, the status page)."""


@dataclass(frozen=True)
class Operation:
    """One route: what it takes and what it answers, each body as a msgspec type."""

    method: str
    path: str
    summary: str
    body: Any = None
    ok: Any = None
    errors: tuple[int, ...] = ()
    open: bool = False  # answers without a token
    headers: tuple[str, ...] = ()  # required request headers (string values)
    ok_media: str = "application/json"
    ok_status: int = 200
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_WRITES: Final = (400, 401, 409, 413, 415, 503)
KV_OPERATIONS: Final = (
    Operation(
        "post",
        "/init",
        "Initialize a new cluster ([] : this node alone)",
        list[tuple[NodeId, Address]],
        Initialized,
        _WRITES,
    ),
    Operation(
        "post",
        "/add-learner",
        "Add a learner; answers once it caught up",
        tuple[NodeId, Address],
        WriteResult,
        (307, *_WRITES),
    ),
    Operation(
        "post",
        "/remove-learner",
        "Remove learners (voters leave by /change-membership)",
        list[NodeId],
        WriteResult,
        (307, *_WRITES),
    ),
    Operation(
        "post",
        "/transfer-leader",
        "Hand leadership to a voter (null: the most up-to-date one)",
        NodeId | None,
        LeaderTransferred,
        (307, *_WRITES),
    ),
    Operation(
        "post",
        "/change-membership",
        "Set the voters (joint consensus)",
        list[NodeId],
        WriteResult,
        (307, *_WRITES),
    ),
    Operation(
        "post",
        "/write",
        "Propose a command; answers once applied",
        WriteCommand,
        WriteResult,
        (307, *_WRITES),
    ),
    Operation(
        "post", "/read", "Read this node's state (may be stale)", str, ValueResponse, _WRITES
    ),
    Operation(
        "post",
        "/consistent_read",
        "Linearizable read, confirmed by the leader's quorum",
        str,
        ValueResponse,
        (307, *_WRITES),
    ),
    Operation(
        "get",
        "/metrics",
        "The node's metrics: JSON, or Prometheus text to Accept: text/plain",
        ok=RaftMetrics,
        errors=(401, 406),
    ),
    Operation(
        "get",
        "/health",
        "200 while running with a known leader",
        ok=ProbeAnswer,
        open=True,
        errors=(503,),
    ),
    Operation(
        "get",
        "/ready",
        "200 once caught up with the commit index",
        ok=ProbeAnswer,
        open=True,
        errors=(503,),
    ),
    Operation(
        "get",
        "/cluster-status",
        "Every member, as raft-http status shows it",
        ok=ClusterStatus,
        errors=(401, 503),
    ),
    Operation("get", "/openapi.json", "This document", ok=dict[str, Any], errors=(401,)),
    Operation(
        "get", "/", "The live status page (HTML)", ok=TEXT, ok_media="text/html", errors=(401,)
    ),
)
"""The KV API's routes (``kv_api``); errors are ``ApiErrorBody``."""

_SNAPSHOT_HEADERS: Final = (
    "Raft-Vote",
    "Raft-Snapshot-Meta",
    "Raft-Snapshot-Size",
    "Raft-Snapshot-Offset",
    "Raft-Snapshot-Id",
)
RAFT_OPERATIONS: Final = (
    Operation(
        "post",
        "/append",
        "AppendEntries",
        AppendEntriesRequest,
        AppendEntriesResponse,
        (400, 401, 412, 413, 415, 503),
    ),
    Operation(
        "post", "/vote", "RequestVote", VoteRequest, VoteResponse, (400, 401, 412, 413, 415, 503)
    ),
    Operation(
        "get",
        "/append-stream",
        "AppendEntries over one ordered WebSocket (pipelined replication)",
        ok_status=101,
        errors=(400, 401, 412),
        description="Upgrade to a WebSocket; each text message is an AppendEntriesRequest, "
        "answered in order by an AppendEntriesResponse (schemas of POST /append). "
        "Without an upgrade: 400.",
    ),
    Operation(
        "post",
        "/transfer-leader",
        "TransferLeader: the target campaigns at once once its log holds last_log_id",
        TransferLeaderRequest,
        Handed,
        (400, 401, 412, 413, 415, 503),
    ),
    Operation(
        "post",
        "/snapshot",
        "Stream a full snapshot (raw bytes from Raft-Snapshot-Offset; resumable)",
        BINARY,
        SnapshotResponse,
        (400, 401, 409, 412, 413, 503),
        headers=_SNAPSHOT_HEADERS,
    ),
    Operation(
        "head",
        "/snapshot",
        "How many bytes of an upload the node holds (Raft-Snapshot-Offset)",
        errors=(400, 401, 412),
        headers=("Raft-Snapshot-Id",),
    ),
)
"""``raft_http.server.raft_app``'s routes, relative to where they are mounted; errors are
``ErrorBody`` (docs/protocol.md)."""


def openapi_document(
    *, raft_prefix: str = "/raft", title: str = "raft-http node"
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a ``KVNode``: its KV routes and the Raft routes mounted
    at ``raft_prefix``."""
    ops: list[tuple[Operation, str, Any, str]]
    ops = [(op, op.path, ApiErrorBody, "apiToken") for op in KV_OPERATIONS]
    ops += [(op, raft_prefix + op.path, ErrorBody, "raftToken") for op in RAFT_OPERATIONS]
    json_types = {t for op, *_ in ops for t in (op.body, op.ok) if _is_type(t)}
    json_types |= {ApiErrorBody, ErrorBody}
    ordered = sorted(json_types, key=repr)
    schemas, components = msgspec.json.schema_components(
        ordered, ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip(ordered, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op, path, error_type, security in ops:
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{path.strip('/').replace('/', '_') or 'root'}",
            "responses": {},
        }
        if op.open:
            operation["security"] = []
        else:
            operation["security"] = [{security: []}]
        if op.headers:
            operation["parameters"] = [
                {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                for h in op.headers
            ]
        if op.body == BINARY:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/octet-stream": {"schema": {}}},
            }
        elif op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of[op.body]}},
            }
        ok: dict[str, Any] = {"description": "OK"}
        if op.ok == TEXT:
            ok["content"] = {op.ok_media: {"schema": {"type": "string"}}}
        elif op.ok is not None:
            ok["content"] = {"application/json": {"schema": schema_of[op.ok]}}
            if path == "/metrics":
                ok["content"]["text/plain"] = {"schema": {"type": "string"}}
        if op.description:
            operation["description"] = op.description
        if op.ok_status != 200:
            ok["description"] = "Switching Protocols" if op.ok_status == 101 else "OK"
        operation["responses"][str(op.ok_status)] = ok
        for status in op.errors:
            error: dict[str, Any] = {
                "description": _REASONS.get(status, "error"),
                "content": {"application/json": {"schema": schema_of[error_type]}},
            }
            if status == 307:
                error["headers"] = {"Location": {"schema": {"type": "string"}}}
            operation["responses"][str(status)] = error
        paths.setdefault(path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiToken": {"type": "http", "scheme": "bearer", "description": "--api-token"},
                "raftToken": {"type": "http", "scheme": "bearer", "description": "--token"},
            },
        },
    }


_REASONS: Final = {
    307: "not the leader: same route on the leader (Location)",
    400: "the body does not decode (the message names the field)",
    401: "missing or wrong bearer token",
    406: "the Prometheus format is not installed",
    409: "refused by the core",
    412: "Raft-Cluster does not match",
    413: "body too large",
    415: "not application/json, or an unsupported Content-Encoding",
    503: "no leader, no quorum, timeout or stopped; retry (Retry-After)",
}


def _is_type(t: Any) -> bool:
    return t is not None and t not in (BINARY, TEXT)


def openapi_route(raft_prefix: str = "/raft") -> web.RouteDef:
    """``GET /openapi.json``, the document built once."""
    body = msgspec.json.encode(openapi_document(raft_prefix=raft_prefix))

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return web.get("/openapi.json", serve)
