"""The receiving side of the HTTP transport: an aiohttp app that hands Raft RPCs to a handler.

``raft_app(handler)`` runs alone (``web.run_app(raft_app(h))``) or mounts into any
app (``app.add_subapp("/raft", raft_app(h))``). The wire protocol is in
docs/protocol.md. The app enforces its own body limits while reading, because a
host app's ``client_max_size`` neither applies to streamed reads nor to a sub-app,
and every error it can answer is JSON with an honest status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import msgspec
from aiohttp import ClientPayloadError, WSCloseCode, WSMsgType, hdrs, web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from .errors import (
    APIError,
    Fatal,
    InvalidRequest,
    RaftError,
    SnapshotMismatch,
    SnapshotRejected,
)
from .network import RaftHandler
from .protocol import (
    H_CLUSTER,
    H_SNAPSHOT_ID,
    H_SNAPSHOT_META,
    H_SNAPSHOT_OFFSET,
    H_SNAPSHOT_SHA256,
    H_SNAPSHOT_SIZE,
    H_VOTE,
    JSON,
    OCTET_STREAM,
    SHA256_HEX,
)
from .spool import (
    ChecksumConflict,
    InsufficientStorage,
    OffsetMismatch,
    SizeConflict,
    SnapshotSpool,
    SnapshotTooLarge,
    SpoolError,
    SpoolFull,
    SpoolLease,
    SpoolLimits,
    SpoolLost,
)
from .types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    ERROR_BODY,
    INSTALL_SNAPSHOT_REQUEST,
    INSTALL_SNAPSHOT_RESPONSE,
    SNAPSHOT_META,
    SNAPSHOT_RESPONSE,
    TRANSFER_LEADER_REQUEST,
    VOTE,
    VOTE_REQUEST,
    VOTE_RESPONSE,
    ErrorBody,
    ErrorDetail,
    InstallSnapshotResponse,
    JsonCodec,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    Vote,
)

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_READ_CHUNK_SIZE",
    "RAFT_HANDLER",
    "SERVER_CONFIG",
    "SNAPSHOT_SPOOL",
    "RaftHandler",
    "ServerConfig",
    "raft_app",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_SIZE: Final = 64 * 1024 * 1024
DEFAULT_READ_CHUNK_SIZE: Final = 256 * 1024

# Short local names for the protocol's headers (protocol.py spells them).
H_META: Final = H_SNAPSHOT_META
H_SIZE: Final = H_SNAPSHOT_SIZE
H_OFFSET: Final = H_SNAPSHOT_OFFSET
H_ID: Final = H_SNAPSHOT_ID
H_SHA256: Final = H_SNAPSHOT_SHA256
OCTETS: Final = OCTET_STREAM

SPOOL_RETRY_AFTER: Final = "5"
"""Seconds a sender refused with ``spool_full`` is told to wait (``Retry-After``)."""

_COUNT = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What ``raft_app`` was configured with (read-only, under ``SERVER_CONFIG``)."""

    token: str | None
    cluster: str | None
    max_body_size: int
    read_chunk_size: int
    spool_idle_timeout: float
    spool_limits: SpoolLimits


RAFT_HANDLER: Final = web.AppKey("raft_handler", RaftHandler)
_APPEND_STREAMS: Final[web.AppKey[set[web.WebSocketResponse]]] = web.AppKey("raft_append_streams")
SNAPSHOT_SPOOL: Final = web.AppKey("raft_snapshot_spool", SnapshotSpool)
SERVER_CONFIG: Final = web.AppKey("raft_server_config", ServerConfig)

_T = TypeVar("_T")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- errors ------------------------------------------------------------------------


class _Problem(Exception):
    """An answer with an error body; raised anywhere below the middleware."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        # A message may quote a header whose bytes were not UTF-8 (aiohttp keeps them as
        # surrogates, which no JSON encoder takes): escape them, so no answer fails to encode.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(kind=kind, message=message, **extra)
        self.headers = dict(headers or {})


def _bad_request(message: str) -> NoReturn:
    raise _Problem(400, "bad_request", message)


_HTTP_KINDS: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _error_response(request: web.Request, problem: _Problem) -> web.Response:
    resp = web.Response(
        status=problem.status,
        body=ERROR_BODY.encode(ErrorBody(problem.detail)),
        content_type=JSON,
        headers=problem.headers,
    )
    if request.body_exists and not request.content.is_eof():
        resp.force_close()  # the unread rest of the body is not worth keeping the connection
    return resp


def _json(codec: JsonCodec[_T], value: _T) -> web.Response:
    return web.Response(body=codec.encode(value), content_type=JSON)


def _segment(snapshot_id: str, offset: int) -> dict[str, Any]:
    return {"snapshot_id": snapshot_id, "offset": offset}


@web.middleware
async def _errors_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error body with an honest status."""
    try:
        return await handler(request)
    except _Problem as problem:
        return _error_response(request, problem)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_KINDS.get(exc.status, "http_error")
        headers: dict[str, str] = {}
        if exc.status == 405 and hdrs.ALLOW in exc.headers:
            headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return _error_response(
            request, _Problem(exc.status, kind, exc.reason or kind, headers=headers)
        )
    except SnapshotTooLarge as exc:
        return _error_response(
            request, _Problem(413, "snapshot_too_large", str(exc), limit=exc.limit)
        )
    except InsufficientStorage as exc:
        return _error_response(request, _Problem(507, "insufficient_storage", str(exc)))
    except SpoolFull as exc:
        return _error_response(
            request,
            _Problem(503, "spool_full", str(exc), headers={hdrs.RETRY_AFTER: SPOOL_RETRY_AFTER}),
        )
    except SizeConflict as exc:
        return _error_response(request, _Problem(400, "size_mismatch", str(exc)))
    except RaftError as exc:
        return _error_response(request, _raft_problem(exc))
    except (ConnectionError, ClientPayloadError) as exc:
        # The peer is gone (or garbled its body): nobody will read this answer.
        log.info("%s %s: connection lost while reading: %s", request.method, request.path, exc)
        return _error_response(request, _Problem(400, "bad_request", "connection lost"))
    except RequestPayloadError as exc:
        # aiohttp could not decode the body as sent (a broken chunked or compressed body).
        log.debug("%s %s: unreadable body: %s", request.method, request.path, exc)
        return _error_response(request, _Problem(400, "bad_request", f"unreadable body: {exc}"))
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return _error_response(
            request, _Problem(500, "internal", "internal server error (see the server log)")
        )


def _raft_problem(exc: RaftError) -> _Problem:
    """The answer to a Raft error a handler raised."""
    if isinstance(exc, Fatal):
        return _Problem(503, "fatal", exc.reason)
    if isinstance(exc, SnapshotMismatch):
        return _Problem(
            409,
            "snapshot_mismatch",
            str(exc),
            expect=_segment(*exc.expect),
            got=_segment(*exc.got),
        )
    if isinstance(exc, InvalidRequest):
        return _Problem(400, "bad_request", str(exc))
    if isinstance(exc, SnapshotRejected):
        return _Problem(422, "snapshot_rejected", str(exc))
    if isinstance(exc, APIError):
        return _Problem(503, "raft_error", f"{exc.kind}: {exc.message}")
    return _Problem(503, "raft_error", f"{type(exc).__name__}: {exc}")


def _auth_middleware(token: str | None, cluster: str | None) -> Middleware:
    expected = f"Bearer {token}".encode() if token is not None else None
    cluster_bytes = cluster.encode() if cluster is not None else None

    @web.middleware
    async def auth(request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Authorization before cluster, both before anything else (even a 404)."""
        if expected is not None:
            given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise _Problem(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token",
                    headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="raft"'},
                )
        if cluster_bytes is not None:
            given_cluster = request.headers.get(H_CLUSTER)
            if given_cluster is None or not hmac.compare_digest(
                given_cluster.encode("utf-8", "surrogateescape"), cluster_bytes
            ):
                raise _Problem(
                    412,
                    "cluster_mismatch",
                    f"this node serves cluster {cluster!r}, request says {given_cluster!r}",
                )
        _refuse_content_encoding(request)
        return await handler(request)

    return auth


def _refuse_content_encoding(request: web.Request) -> None:
    """Bodies travel uncompressed: a compressed one is refused before a byte is read.

    Decompressing would make every size limit a limit on the compressed form (a small
    gzip body can inflate to gigabytes), and Raft's payloads are mostly incompressible
    snapshot bytes or small JSON anyway.
    """
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _Problem(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed",
        )


# --- reading -----------------------------------------------------------------------


def _require_content_type(request: web.Request, *allowed: str) -> str:
    ctype = request.content_type
    if ctype not in allowed:
        got = request.headers.get(hdrs.CONTENT_TYPE, "none")
        raise _Problem(
            415,
            "unsupported_media_type",
            f"Content-Type must be {' or '.join(allowed)}, got {got}",
        )
    return ctype


def _too_large(limit: int) -> _Problem:
    return _Problem(413, "payload_too_large", f"request body exceeds {limit} bytes", limit=limit)


async def _read_limited(request: web.Request, config: ServerConfig) -> bytes:
    """The whole (small) body, refusing as soon as it passes ``max_body_size``."""
    limit = config.max_body_size
    length = request.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        try:  # one buffer, no copies: the common case (aiohttp's client sends a length)
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            _bad_request(f"body ended after {len(exc.partial)} of {length} bytes")
    body = bytearray()
    async for piece in request.content.iter_chunked(config.read_chunk_size):
        body += piece
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def _json_body(request: web.Request, codec: JsonCodec[_T]) -> _T:
    """A JSON RPC's body: right content type, within the size limit, decoded and valid."""
    _require_content_type(request, JSON)
    return _decode(codec, await _read_limited(request, request.app[SERVER_CONFIG]))


def _decode(codec: JsonCodec[_T], body: bytes) -> _T:
    try:
        return codec.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError too: its message names the path
        _bad_request(str(exc))
    except RecursionError:  # msgspec walks nested arrays even where it keeps them Raw
        _bad_request("JSON nested too deeply")


def _header(request: web.Request, name: str) -> str:
    value = request.headers.get(name)
    if value is None:
        _bad_request(f"missing header {name}")
    return value


def _header_json(request: web.Request, name: str, codec: JsonCodec[_T]) -> _T:
    value = _header(request, name)
    try:
        return codec.decode(value)
    except UnicodeEncodeError:
        _bad_request(f"invalid header {name}: not UTF-8")
    except msgspec.DecodeError as exc:
        _bad_request(f"invalid header {name}: {exc}")
    except RecursionError:
        _bad_request(f"invalid header {name}: JSON nested too deeply")


def _header_sha256(request: web.Request) -> str | None:
    """The optional checksum of the whole snapshot, lowercased; None when not sent."""
    value = request.headers.get(H_SHA256)
    if value is None:
        return None
    value = value.strip()
    if not SHA256_HEX.fullmatch(value.lower()):
        _bad_request(f"invalid header {H_SHA256}: expected 64 hex digits, got {value[:80]!r}")
    return value.lower()


def _header_count(request: web.Request, name: str) -> int:
    value = _header(request, name).strip()
    if not _COUNT.fullmatch(value):
        _bad_request(f"invalid header {name}: expected a non-negative integer, got {value!r}")
    return int(value)


# --- routes ------------------------------------------------------------------------


class _Routes:
    """The route handlers of one app; state lives in the app under its ``AppKey``s."""

    @staticmethod
    async def append(request: web.Request) -> web.Response:
        rpc = await _json_body(request, APPEND_ENTRIES_REQUEST)
        if (why := rpc.shape_error()) is not None:
            _bad_request(why)
        return _json(APPEND_ENTRIES_RESPONSE, await request.app[RAFT_HANDLER].append_entries(rpc))

    @staticmethod
    async def append_stream(request: web.Request) -> web.StreamResponse:
        """``GET /append-stream``: a WebSocket of AppendEntries, each answered, in order.

        Auth and cluster were checked at the upgrade (the middleware). A bad message gets
        an error message and the stream goes on; a message over ``max_body_size`` ends
        the stream (close code 1009), since it cannot be skipped without reading it.
        """
        config = request.app[SERVER_CONFIG]
        ws = web.WebSocketResponse(max_msg_size=config.max_body_size, compress=False)
        if not ws.can_prepare(request).ok:
            _bad_request("GET /append-stream needs a WebSocket upgrade")
        await ws.prepare(request)
        streams = request.app[_APPEND_STREAMS]
        streams.add(ws)
        # Messages are handed to the handler as they arrive (up to a window) and answered
        # in arrival order: the handler decides each in turn and may write several in one
        # fsync, instead of this loop waiting for each answer before reading the next.
        answers: asyncio.Queue[asyncio.Task[bytes]] = asyncio.Queue(_STREAM_WINDOW)
        sender = asyncio.create_task(_send_answers(ws, answers))
        try:
            handler = request.app[RAFT_HANDLER]
            async for msg in ws:
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                    await answers.put(asyncio.create_task(_stream_answer(handler, data)))
                elif msg.type is WSMsgType.ERROR:
                    log.info("append stream from %s ended: %s", request.remote, ws.exception())
        finally:
            streams.discard(ws)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            while not answers.empty():  # the handler finishes each one (it is uncancellable)
                answers.get_nowait().cancel()
        return ws

    @staticmethod
    async def vote(request: web.Request) -> web.Response:
        rpc = await _json_body(request, VOTE_REQUEST)
        return _json(VOTE_RESPONSE, await request.app[RAFT_HANDLER].vote(rpc))

    @staticmethod
    async def transfer_leader(request: web.Request) -> web.Response:
        rpc = await _json_body(request, TRANSFER_LEADER_REQUEST)
        await request.app[RAFT_HANDLER].handle_transfer_leader(rpc)
        return web.Response(body=b"{}", content_type=JSON)

    @staticmethod
    async def snapshot_offset(request: web.Request) -> web.Response:
        snapshot_id = _header(request, H_ID)
        held = request.app[SNAPSHOT_SPOOL].held(snapshot_id)
        return web.Response(status=200, headers={H_OFFSET: str(held)})

    @staticmethod
    async def snapshot(request: web.Request) -> web.Response:
        if _require_content_type(request, OCTETS, JSON) == JSON:
            return await _Routes.snapshot_chunk(request)
        return await _Routes.snapshot_stream(request)

    @staticmethod
    async def snapshot_stream(request: web.Request) -> web.Response:
        vote = _header_json(request, H_VOTE, VOTE)
        meta = _header_json(request, H_META, SNAPSHOT_META)
        size = _header_count(request, H_SIZE)
        offset = _header_count(request, H_OFFSET)
        sha256 = _header_sha256(request)
        if offset > size:
            _bad_request(f"{H_OFFSET} {offset} is past {H_SIZE} {size}")
        handler = request.app[RAFT_HANDLER]
        current = handler.current_vote()
        if not vote >= current:
            # Refused without reading a byte: the sender must step down, not resend.
            return _json(SNAPSHOT_RESPONSE, SnapshotResponse(current))

        spool = request.app[SNAPSHOT_SPOOL]
        sid = meta.snapshot_id
        try:
            lease = await spool.claim(sid, offset, sha256=sha256, size=size)
        except ChecksumConflict as exc:
            raise _Problem(400, "checksum_mismatch", str(exc)) from None
        except OffsetMismatch as exc:
            raise _Problem(
                409,
                "offset_mismatch",
                str(exc),
                expected_offset=exc.expected,
                headers={H_OFFSET: str(exc.expected)},
            ) from None
        remaining = size - offset
        declared = request.content_length
        if declared is not None and declared != remaining:
            await spool.remove(sid, lease)
            raise _size_mismatch(sid, size, offset, f"Content-Length is {declared}")
        received = await _spool_body(request, lease, remaining)
        if received != remaining:
            await spool.remove(sid, lease)
            raise _size_mismatch(sid, size, offset, f"the body ended after {received} bytes")
        return _json(SNAPSHOT_RESPONSE, await _install(request, lease, vote, meta, sha256))

    @staticmethod
    async def snapshot_chunk(request: web.Request) -> web.Response:
        """The deprecated per-chunk protocol (Openraft's ``install_snapshot``)."""
        rpc = await _json_body(request, INSTALL_SNAPSHOT_REQUEST)
        handler = request.app[RAFT_HANDLER]
        current = handler.current_vote()
        if not rpc.vote >= current:
            return _json(INSTALL_SNAPSHOT_RESPONSE, InstallSnapshotResponse(current))
        spool = request.app[SNAPSHOT_SPOOL]
        sid = rpc.meta.snapshot_id
        try:
            if rpc.offset != 0 and sid not in spool.snapshot_ids():
                held = spool.latest() or (sid, 0)
                raise SnapshotMismatch(held, (sid, rpc.offset))
            try:
                lease = await spool.claim(sid, rpc.offset)
            except OffsetMismatch as exc:
                raise SnapshotMismatch((sid, exc.expected), (sid, rpc.offset)) from None
            except (ChecksumConflict, SizeConflict):  # a streamed upload: nothing to continue
                raise SnapshotMismatch((sid, 0), (sid, rpc.offset)) from None
            if rpc.data:
                await spool.append(lease, rpc.data)
        except SpoolLost:
            raise SnapshotMismatch(spool.latest() or (sid, 0), (sid, rpc.offset)) from None
        if rpc.done:
            answer = await _install(request, lease, rpc.vote, rpc.meta)
            return _json(INSTALL_SNAPSHOT_RESPONSE, InstallSnapshotResponse(answer.vote))
        return _json(INSTALL_SNAPSHOT_RESPONSE, InstallSnapshotResponse(handler.current_vote()))


_STREAM_WINDOW: Final = 64
"""Messages of one append stream being handled at once (the leader sends at most 8)."""


async def _send_answers(
    ws: web.WebSocketResponse, answers: asyncio.Queue[asyncio.Task[bytes]]
) -> None:
    """Send each message's answer, in the order the messages came."""
    while True:
        task = await answers.get()
        try:
            answer = await task
        except asyncio.CancelledError:
            task.cancel()
            raise
        try:
            await ws.send_bytes(answer)
        except ConnectionError:
            return  # the stream is gone; the reading side ends too
        except Exception:
            log.exception("cannot answer on an append stream; closing it")
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)
            return


async def _stream_answer(handler: RaftHandler, data: bytes) -> bytes:
    """The answer to one message of an append stream: what ``POST /append`` would answer."""
    try:
        try:
            rpc = _decode(APPEND_ENTRIES_REQUEST, data)
            if (why := rpc.shape_error()) is not None:
                _bad_request(why)
            return APPEND_ENTRIES_RESPONSE.encode(await handler.append_entries(rpc))
        except RaftError as exc:
            raise _raft_problem(exc) from None
    except _Problem as problem:
        return ERROR_BODY.encode(ErrorBody(problem.detail))
    except Exception:
        log.exception("unexpected error handling a message of /append-stream")
        detail = ErrorDetail(kind="internal", message="internal server error (see the server log)")
        return ERROR_BODY.encode(ErrorBody(detail))


def _size_mismatch(sid: str, size: int, offset: int, what: str) -> _Problem:
    return _Problem(
        400,
        "size_mismatch",
        f"snapshot {sid!r}: expected {size - offset} body bytes "
        f"({H_SIZE} {size} - {H_OFFSET} {offset}), {what}; partial snapshot deleted",
    )


class _Overlong(Exception):
    pass


async def _spool_body(request: web.Request, lease: SpoolLease, remaining: int) -> int:
    """Write the body to the spool as it arrives; returns the bytes received.

    Pieces are handed to the spool in batches of ``_BATCH_BYTES``, one batch written
    (and hashed, in a worker thread) while the next is received: one thread hop per
    batch, no copy of the pieces. Stops at the first byte past
    ``remaining`` (returns more than ``remaining``). A dropped connection keeps what
    arrived, for a resume.
    """
    spool = request.app[SNAPSHOT_SPOOL]
    chunk = request.app[SERVER_CONFIG].read_chunk_size
    received = 0
    batch: list[bytes] = []
    pending = 0
    writing: asyncio.Future[int] | None = None

    async def flush() -> None:
        nonlocal writing, batch, pending
        if writing is not None:
            await asyncio.shield(writing)  # at most one batch in flight
            writing = None
        if batch:
            writing = asyncio.ensure_future(spool.append(lease, batch))
            batch, pending = [], 0

    try:
        try:
            async for piece in request.content.iter_chunked(chunk):
                received += len(piece)
                if received > remaining:
                    raise _Overlong
                batch.append(piece)
                pending += len(piece)
                if pending >= _BATCH_BYTES:
                    await flush()
            await flush()
            await flush()  # the last batch written too
        except (ConnectionError, ClientPayloadError, asyncio.CancelledError):
            # Dropped (a host app with handler_cancellation cancels us instead): keep
            # what arrived, so the sender can resume from it.
            with contextlib.suppress(SpoolError):
                await asyncio.shield(_keep(writing, spool.append(lease, batch)))
            log.info(
                "snapshot %r: connection lost; %d bytes held for resume",
                lease.snapshot_id,
                spool.held(lease.snapshot_id),
            )
            raise
        except BaseException:
            if writing is not None:  # let the batch in flight finish before it is dropped
                with contextlib.suppress(SpoolError):
                    await asyncio.shield(writing)
            raise
    except _Overlong:
        return remaining + 1
    except SpoolLost:
        held = spool.held(lease.snapshot_id)
        raise _Problem(
            409,
            "offset_mismatch",
            f"snapshot {lease.snapshot_id!r}: this upload was superseded or expired",
            expected_offset=held,
            headers={H_OFFSET: str(held)},
        ) from None
    return received


_BATCH_BYTES: Final = 2 * 1024 * 1024
"""Bytes received per thread hop to the spool. Each hop costs the receiver CPU (a wakeup,
a context switch, the batch read back from another core's cache): at 1 MiB the receiver
spent about 0.4 s/GiB more than at 2 MiB (bench_snapshot.py). The server holds at most
two batches per upload."""


async def _keep(writing: asyncio.Future[int] | None, rest: Awaitable[int]) -> None:
    """Finish the batch in flight, then write what was received after it."""
    try:
        if writing is not None:
            await writing
    finally:
        await rest


async def _install(
    request: web.Request,
    lease: SpoolLease,
    vote: Vote,
    meta: SnapshotMeta,
    sha256: str | None = None,
) -> SnapshotResponse:
    """Hand the completed spool to the handler, then delete it whatever the outcome.

    With a ``sha256``, the digest of the whole file (kept by the spool as it wrote
    it; the byte count alone would pass a wrongly stitched resume) must match, so
    the handler sees only verified data.
    """
    spool = request.app[SNAPSHOT_SPOOL]
    try:
        data = await spool.open_for_install(lease)
    except SpoolLost:
        held = spool.held(lease.snapshot_id)
        raise _Problem(
            409,
            "offset_mismatch",
            f"snapshot {lease.snapshot_id!r}: this upload was superseded or expired",
            expected_offset=held,
            headers={H_OFFSET: str(held)},
        ) from None
    try:
        if sha256 is not None:  # hashed as it was written: no second pass
            size, actual = spool.held(lease.snapshot_id), spool.digest(lease)
            if actual != sha256:
                raise _Problem(
                    400,
                    "checksum_mismatch",
                    f"snapshot {meta.snapshot_id!r}: {H_SHA256} expected {sha256}, "
                    f"the {size} bytes received hash to {actual}; partial snapshot deleted",
                )
        snapshot = Snapshot(meta, data, sha256=sha256)
        return await request.app[RAFT_HANDLER].install_full_snapshot(vote, snapshot)
    finally:
        await asyncio.to_thread(data.close)
        await spool.remove(lease.snapshot_id, lease)


# --- the app -----------------------------------------------------------------------


def raft_app(
    handler: RaftHandler,
    *,
    token: str | None = None,
    cluster: str | None = None,
    spool_dir: str | Path | None = None,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE,
    spool_idle_timeout: float = 300.0,
    spool_limits: SpoolLimits | None = None,
) -> web.Application:
    """An aiohttp app serving the Raft routes for ``handler``; mount it or run it alone.

    ``token``: require ``Authorization: Bearer <token>``. ``cluster``: require a
    matching ``Raft-Cluster`` header. ``spool_dir``: where partial snapshot uploads
    live (a temp dir removed at cleanup if None). ``max_body_size`` bounds JSON
    bodies; ``read_chunk_size`` is the read and write unit of snapshot bodies;
    ``spool_idle_timeout`` drops a partial upload that made no progress that long;
    ``spool_limits`` bounds the disk snapshot uploads may take (see ``SpoolLimits``).
    """
    if spool_limits is None:
        spool_limits = SpoolLimits()
    if max_body_size <= 0 or read_chunk_size <= 0:
        raise ValueError("max_body_size and read_chunk_size must be > 0")
    config = ServerConfig(
        token=token,
        cluster=cluster,
        max_body_size=max_body_size,
        read_chunk_size=read_chunk_size,
        spool_idle_timeout=spool_idle_timeout,
        spool_limits=spool_limits,
    )
    spool = SnapshotSpool(spool_dir, idle_timeout=spool_idle_timeout, limits=spool_limits)
    app = web.Application(middlewares=[_errors_middleware, _auth_middleware(token, cluster)])
    app[RAFT_HANDLER] = handler
    app[SNAPSHOT_SPOOL] = spool
    app[SERVER_CONFIG] = config

    async def spool_lifetime(app: web.Application) -> AsyncIterator[None]:
        await spool.start()
        reaper = asyncio.create_task(spool.run_reaper(), name="raft-snapshot-spool-reaper")
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await spool.close()

    app[_APPEND_STREAMS] = set()

    async def close_append_streams(app: web.Application) -> None:
        # Open streams would hold the server's shutdown until its timeout.
        open_streams: set[web.WebSocketResponse] = app[_APPEND_STREAMS]
        for ws in list(open_streams):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    app.on_shutdown.append(close_append_streams)
    app.cleanup_ctx.append(spool_lifetime)
    app.router.add_post("/append", _Routes.append)
    app.router.add_get("/append-stream", _Routes.append_stream)
    app.router.add_post("/vote", _Routes.vote)
    app.router.add_post("/transfer-leader", _Routes.transfer_leader)
    app.router.add_post("/snapshot", _Routes.snapshot)
    app.router.add_route("HEAD", "/snapshot", _Routes.snapshot_offset)
    return app
