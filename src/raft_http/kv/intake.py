"""What a request must be before a KV handler sees it, and the JSON error every refusal gets.

Two middlewares guard the KV app's own routes (the Raft routes mounted under it have
their own): ``api_auth`` checks the bearer token before routing, so a caller without
it learns nothing; ``body_intake`` refuses, before reading a byte, a compressed body
(no decompression bomb, no parser error), a content type other than JSON and a
declared length over the route's limit, then reads the body within its own deadline
(408 for a slow body, never the write timeout's 503; a body that came whole with its
headers, the common case, is taken without arming a timer). Admin routes get a small limit:
their bodies are a few node addresses, and a large one only costs the loop time.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from msgspec import Struct

from ..protocol import JSON
from ..types import encode_json

Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS: Final = frozenset({"/health", "/ready", "/"})
"""Routes that answer without the API token: probes, which must reveal only up or down, and
the status page (``status.py``), which holds no data and asks for the token itself."""

ADMIN_PATHS: Final = frozenset(
    {"/init", "/add-learner", "/change-membership", "/remove-learner", "/transfer-leader"}
)
"""Routes whose bodies are a few node ids and addresses: ``ADMIN_MAX_BODY_SIZE`` applies."""

ADMIN_MAX_BODY_SIZE: Final = 64 * 1024
DEFAULT_BODY_TIMEOUT: Final = 10.0

_IDENTITY: Final = frozenset({"", "identity"})


class ApiErrorDetail(Struct, frozen=True, omit_defaults=True):
    """The transport's error shape, plus where the leader is for ``forward_to_leader``."""

    kind: str
    message: str
    leader_id: int | None = None
    leader_addr: str | None = None
    limit: int | None = None


class ApiErrorBody(Struct, frozen=True):
    error: ApiErrorDetail


def error_response(
    status: int,
    kind: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    # A message may quote a header whose bytes were not UTF-8 (aiohttp keeps them as
    # surrogates, which no JSON encoder takes): escape them.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = ApiErrorBody(ApiErrorDetail(kind=kind, message=message, **extra))
    return web.Response(status=status, body=encode_json(body), content_type=JSON, headers=headers)


def _refuse_unread(request: web.Request, resp: web.Response) -> web.Response:
    """Close the connection after an answer given before the body was read."""
    if request.body_exists and not request.content.is_eof():
        resp.force_close()
    return resp


def _own_route(request: web.Request, marker: web.AppKey[Any]) -> bool:
    """Whether the app holding ``marker`` owns the route, not an app mounted in it."""
    apps = request.match_info.apps  # outermost first: the last one owns the route
    return not apps or marker in apps[-1]


BODY: Final = web.RequestKey("kv_body", bytes)
"""The request body ``body_intake`` read, for the handler."""


def api_auth(token: str | None, marker: web.AppKey[Any]) -> Middleware:
    """Require ``Authorization: Bearer <token>`` on every route of the app but ``OPEN_PATHS``.

    Compared in constant time, as the Raft routes' token is. Routes of a mounted app
    (the Raft routes under ``/raft``) are left to that app's own auth: their callers
    hold the Raft token, which may differ from this one. ``marker`` is a key that
    only this app holds.
    """
    expected = f"Bearer {token}".encode() if token is not None else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or not _own_route(request, marker) or request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
        if hmac.compare_digest(given, expected):
            return await handler(request)
        resp = error_response(
            401,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <API token>)",
            headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="kv"'},
        )
        return _refuse_unread(request, resp)

    return auth


def body_intake(
    max_body_size: int, admin_max_body_size: int, timeout: float, marker: web.AppKey[Any]
) -> Middleware:
    """Check and read the body of every POST to a route of this app (see the module doc)."""

    @web.middleware
    async def intake(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method != hdrs.METH_POST
            or request.match_info.http_exception is not None  # 404/405: say so first
            or not _own_route(request, marker)
        ):
            return await handler(request)
        refusal = _check_headers(request, max_body_size, admin_max_body_size)
        if refusal is not None:
            return _refuse_unread(request, refusal)
        limit = admin_max_body_size if request.path in ADMIN_PATHS else max_body_size
        try:
            if request.content.is_eof():  # all of it arrived with the headers: no wait
                body = await _read_limited(request, limit)
            else:
                async with asyncio.timeout(timeout):
                    body = await _read_limited(request, limit)
        except TimeoutError:
            resp = error_response(
                408,
                "request_timeout",
                f"the request body did not arrive within {timeout:g}s; nothing was done",
            )
            return _refuse_unread(request, resp)
        if body is None:
            return _refuse_unread(request, _too_large(limit))
        request[BODY] = body
        return await handler(request)

    return intake


def _check_headers(request: web.Request, limit: int, admin_limit: int) -> web.Response | None:
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in _IDENTITY:
        return error_response(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed",
        )
    if request.content_type != JSON:
        got = request.headers.get(hdrs.CONTENT_TYPE, "none")
        return error_response(
            415, "unsupported_media_type", f"Content-Type must be {JSON}, got {got}"
        )
    route_limit = admin_limit if request.path in ADMIN_PATHS else limit
    length = request.content_length
    if length is not None and length > route_limit:
        return _too_large(route_limit)
    return None


def _too_large(limit: int) -> web.Response:
    return error_response(
        413, "payload_too_large", f"request body exceeds {limit} bytes", limit=limit
    )


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit``."""
    length = request.content_length
    if length is not None:
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # the client closed early: the decoder names what is missing
    body = bytearray()
    async for piece in request.content.iter_chunked(64 * 1024):
        body += piece
        if len(body) > limit:
            return None
    return bytes(body)
