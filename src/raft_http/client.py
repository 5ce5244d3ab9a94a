"""The sending side of the HTTP transport: ``RaftNetwork`` calls turned into requests.

One ``HttpNetworkFactory`` holds the connection pools (keep-alive) for every
target; ``new_client`` only parses the address. Every failure surfaces as an
error of ``raft_http.errors`` (see docs/protocol.md, "Client error mapping"):
callers never see an aiohttp exception. Snapshots travel on a pool of their own
so that a long upload never delays a heartbeat to the same node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl as ssl_module
import threading
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, BinaryIO, Final, NoReturn, TypeVar

import aiohttp
import msgspec
from yarl import URL

from .errors import (
    APIError,
    Closed,
    Fatal,
    NetworkError,
    PayloadTooLarge,
    RaftError,
    RemoteError,
    ReplicationClosed,
    SnapshotMismatch,
    SnapshotRejected,
    SnapshotTransferError,
    Timeout,
    Unreachable,
)
from .network import (
    AppendStream,
    Backoff,
    RaftNetwork,
    RaftNetworkFactory,
    RPCOption,
    SerialAppendStream,
    reset_error,
)
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
    parse_node_address,
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
    AppendEntriesRequest,
    AppendEntriesResponse,
    ErrorDetail,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    JsonCodec,
    Node,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
)

__all__ = ["HttpNetwork", "HttpNetworkFactory", "parse_node_address"]

T = TypeVar("T")

MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
"""Answers are small JSON documents; a peer sending more than this is broken."""
EXCERPT_CHARS: Final = 200

_ACK: Final = JsonCodec[dict[str, Any]](dict[str, Any])
"""The answer of a route that only acknowledges (``{}``)."""
STREAM_RECHECK_AFTER: Final = 60.0
"""Seconds before a peer that refused ``/append-stream`` (404/405) is offered it again."""
_NO_STREAM_STATUSES: Final = frozenset({404, 405, 501})
_UPGRADE_REFUSED_KINDS: Final = {401: "unauthorized", 412: "cluster_mismatch"}

StreamObserver = Callable[[URL, int, float, "str | None"], None]
"""Told of each answered (or failed) message of an append stream, which ``trace_configs``
never see: the stream's URL, the bytes sent, the seconds from send to answer, and the
error's class name (None for an answer)."""

_ASCII_UNSAFE = re.compile(r"[^\x00-\x7f]")
_SNAPSHOT_READ_LOCK = threading.Lock()
"""Serialises seek+read on snapshot files, which several uploads may share."""


def _ascii_json(raw: bytes) -> str:
    """JSON for a header: ASCII only, non-ASCII escaped as ``\\uXXXX`` (surrogate pairs above)."""
    text = raw.decode()
    if text.isascii():
        return text

    def escape(m: re.Match[str]) -> str:
        cp = ord(m.group())
        if cp < 0x10000:
            return f"\\u{cp:04x}"
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"

    return _ASCII_UNSAFE.sub(escape, text)


def _excerpt(body: bytes) -> str:
    text = body[: EXCERPT_CHARS * 4].decode("utf-8", "replace")
    return text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")


def _file_size(data: BinaryIO) -> int:
    with _SNAPSHOT_READ_LOCK:
        return data.seek(0, os.SEEK_END)


def _read_at(data: BinaryIO, offset: int, n: int) -> bytes:
    """Seek and read in one call: a thread read cannot be cancelled, a shared position can race."""
    with _SNAPSHOT_READ_LOCK:
        data.seek(offset)
        return data.read(n)


async def _read_answer(resp: aiohttp.ClientResponse) -> bytes:
    """The whole answer body, refusing one larger than ``MAX_ANSWER_BYTES``."""
    if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
        raise NetworkError(f"answer of {resp.content_length} bytes exceeds {MAX_ANSWER_BYTES}")
    parts: list[bytes] = []
    total = 0
    async for part in resp.content.iter_any():
        total += len(part)
        if total > MAX_ANSWER_BYTES:
            raise NetworkError(f"answer exceeds {MAX_ANSWER_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


def _error_detail(resp: aiohttp.ClientResponse, body: bytes) -> ErrorDetail | None:
    """The JSON error body of a failed answer, or ``None`` if it is not one."""
    if resp.content_type != JSON:
        return None
    try:
        return ERROR_BODY.decode(body).error
    except msgspec.DecodeError:
        return None


def _segment(value: Any) -> tuple[str, int]:
    """A ``{"snapshot_id", "offset"}`` object of a 409 ``snapshot_mismatch`` as a segment id."""
    if isinstance(value, dict):
        sid, off = value.get("snapshot_id"), value.get("offset")
        if isinstance(sid, str) and isinstance(off, int):
            return (sid, off)
    raise ValueError(f"not a snapshot segment: {value!r}")


def _raft_error(detail: ErrorDetail) -> RaftError:
    """The Raft error a JSON error body stands for."""
    if detail.kind == "fatal":
        return Fatal(detail.message)
    if detail.kind == "snapshot_rejected":
        return SnapshotRejected(detail.message)
    if detail.kind == "snapshot_mismatch":
        try:
            return SnapshotMismatch(_segment(detail.expect), _segment(detail.got))
        except ValueError:
            pass  # a malformed mismatch is still an API error worth reporting
    extra = {
        k: v
        for k, v in msgspec.structs.asdict(detail).items()
        if k not in ("kind", "message") and v is not None
    }
    return APIError(detail.kind, detail.message, **extra)


class HttpNetworkFactory(RaftNetworkFactory):
    """Builds ``HttpNetwork`` clients sharing one keep-alive pool (and one for snapshots).

    A ``session`` passed in is borrowed: used for RPCs and never closed here. The
    snapshot pool is always the factory's own. Sessions are created lazily, inside
    the running loop, on the first RPC; ``close()`` (or ``async with``) releases
    what the factory owns.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        token: str | None = None,
        cluster: str | None = None,
        ssl: ssl_module.SSLContext | bool | None = None,
        backoff: Callable[[], Backoff] | None = None,
        max_resume_attempts: int = 3,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
        stream_observer: StreamObserver | None = None,
    ) -> None:
        if max_resume_attempts < 0:
            raise ValueError("max_resume_attempts cannot be negative")
        self._borrowed = session
        self._session: aiohttp.ClientSession | None = None
        self._snapshot_session: aiohttp.ClientSession | None = None
        self._closed = False
        headers: dict[str, str] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if cluster is not None:
            headers[H_CLUSTER] = cluster
        self.headers: Mapping[str, str] = headers
        self.json_headers: Mapping[str, str] = {**headers, "Content-Type": JSON}
        self.ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl
        self._backoff = backoff or (lambda: Backoff.constant(0.5))
        self.max_resume_attempts = max_resume_attempts
        self.trace_configs = list(trace_configs)  # e.g. counting RPCs per peer and route
        self.stream_observer = stream_observer  # what trace_configs are to each stream message
        self._no_stream: dict[str, float] = {}
        """Stream URL -> loop time a peer refused the upgrade; it gets POSTs for a while."""

    async def __aenter__(self) -> HttpNetworkFactory:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def new_client(self, target: int, node: Node) -> HttpNetwork:
        return HttpNetwork(self, target, node)

    def backoff(self) -> Backoff:
        return self._backoff()

    def _new_session(self) -> aiohttp.ClientSession:
        # Deadlines are ours (asyncio.timeout per call): aiohttp's 300 s total would
        # kill long snapshot uploads.
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), trace_configs=self.trace_configs or None
        )

    def session(self) -> aiohttp.ClientSession:
        """The pool for RPCs; must be called inside the running loop."""
        if self._closed:
            raise RuntimeError("HttpNetworkFactory is closed")
        if self._borrowed is not None:
            return self._borrowed
        if self._session is None:
            self._session = self._new_session()
        return self._session

    def snapshot_session(self) -> aiohttp.ClientSession:
        """The pool for snapshot uploads, separate so heartbeats never queue behind one."""
        if self._closed:
            raise RuntimeError("HttpNetworkFactory is closed")
        if self._snapshot_session is None:
            self._snapshot_session = self._new_session()
        return self._snapshot_session

    def offers_stream(self, url: URL) -> bool:
        """False for a while after ``url`` refused the upgrade (an older or simpler peer)."""
        refused = self._no_stream.get(str(url))
        if refused is None:
            return True
        if asyncio.get_running_loop().time() - refused >= STREAM_RECHECK_AFTER:
            del self._no_stream[str(url)]
            return True
        return False

    def stream_refused(self, url: URL) -> None:
        self._no_stream[str(url)] = asyncio.get_running_loop().time()

    async def close(self) -> None:
        self._closed = True
        owned = [s for s in (self._session, self._snapshot_session) if s is not None]
        self._session = self._snapshot_session = None
        for s in owned:
            await s.close()


class _Upload:
    """One attempt's progress: bytes handed to aiohttp, and a file failure if any."""

    __slots__ = ("failure", "sent")

    def __init__(self, offset: int) -> None:
        self.sent = offset
        self.failure: SnapshotTransferError | None = None


class _Dropped(Exception):
    """The connection dropped mid-upload: ask the target where to resume."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Resume(Exception):
    """The target holds a different offset (409 ``offset_mismatch``): resume from it."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class HttpNetwork(RaftNetwork):
    """The connection to one target node over HTTP; built by ``HttpNetworkFactory.new_client``."""

    def __init__(self, factory: HttpNetworkFactory, target: int, node: Node) -> None:
        self.factory = factory
        self.target = target
        self.node = node
        self.base_url = parse_node_address(node.addr)
        self.append_url = self.base_url / "append"
        self.append_stream_url = self.base_url / "append-stream"
        self.vote_url = self.base_url / "vote"
        self.transfer_leader_url = self.base_url / "transfer-leader"
        self.snapshot_url = self.base_url / "snapshot"

    def __repr__(self) -> str:
        return f"HttpNetwork(target={self.target}, url={str(self.base_url)!r})"

    def backoff(self) -> Backoff:
        return self.factory.backoff()

    # --- RPCs ----------------------------------------------------------------------

    async def append_entries(
        self, rpc: AppendEntriesRequest, option: RPCOption
    ) -> AppendEntriesResponse:
        return await self._rpc(
            "append_entries",
            self.append_url,
            APPEND_ENTRIES_REQUEST.encode(rpc),
            APPEND_ENTRIES_RESPONSE,
            option,
            entries=len(rpc.entries),
        )

    def stream_append(self, option: RPCOption) -> AppendStream:
        """A WebSocket to ``/append-stream``; plain POSTs to a peer that does not offer it."""
        if not self.factory.offers_stream(self.append_stream_url):
            return SerialAppendStream(self, option)
        return _WebSocketAppendStream(self, option)

    async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
        return await self._rpc(
            "vote", self.vote_url, VOTE_REQUEST.encode(rpc), VOTE_RESPONSE, option, entries=0
        )

    async def transfer_leader(self, rpc: TransferLeaderRequest, option: RPCOption) -> None:
        await self._rpc(
            "transfer_leader",
            self.transfer_leader_url,
            TRANSFER_LEADER_REQUEST.encode(rpc),
            _ACK,
            option,
            entries=0,
        )

    async def install_snapshot(
        self, rpc: InstallSnapshotRequest, option: RPCOption
    ) -> InstallSnapshotResponse:
        """Send one snapshot fragment as JSON (deprecated: use ``full_snapshot``)."""
        warnings.warn(
            "install_snapshot is deprecated; use full_snapshot",
            DeprecationWarning,
            stacklevel=2,
        )
        return await self._rpc(
            "install_snapshot",
            self.snapshot_url,
            INSTALL_SNAPSHOT_REQUEST.encode(rpc),
            INSTALL_SNAPSHOT_RESPONSE,
            option,
            entries=0,
        )

    async def _rpc(
        self,
        action: str,
        url: URL,
        body: bytes,
        codec: JsonCodec[T],
        option: RPCOption,
        *,
        entries: int,
    ) -> T:
        session = self.factory.session()
        try:
            async with asyncio.timeout(option.hard_ttl):
                async with session.post(
                    url,
                    data=body,
                    headers=self.factory.json_headers,
                    ssl=self.factory.ssl,
                    timeout=self._client_timeout(option),
                ) as resp:
                    answer = await _read_answer(resp)
                    if resp.status == 413:
                        raise self._too_large(action, resp, answer, entries)
                    if resp.status != 200:
                        self._raise_for_answer(action, resp, answer)
                    return self._decode(action, resp, answer, codec)
        except TimeoutError:
            # Before ClientError: aiohttp's ServerTimeoutError is both.
            raise Timeout(action, self.target, option.hard_ttl) from None
        except aiohttp.ClientError as e:
            raise self._transport_error(action, e) from e

    # --- full snapshot ---------------------------------------------------------------

    async def full_snapshot(
        self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: Awaitable[ReplicationClosed],
        option: RPCOption,
    ) -> SnapshotResponse:
        """Stream the snapshot, resuming after a dropped connection; race it against ``cancel``."""
        owns_cancel = not asyncio.isfuture(cancel)
        cancel_fut: asyncio.Future[ReplicationClosed] = asyncio.ensure_future(cancel)
        upload = asyncio.create_task(self._send_snapshot(vote, snapshot, option))
        try:
            await asyncio.wait((upload, cancel_fut), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not upload.done():
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
            if owns_cancel:
                # Only a task of our own making is ours to cancel (and its error to consume).
                cancel_fut.cancel()
                await asyncio.gather(cancel_fut, return_exceptions=True)
        if upload.cancelled():  # stopped because cancel came first
            raise Closed(self._closed_reason(cancel_fut)) from None
        return upload.result()

    @staticmethod
    def _closed_reason(cancel: asyncio.Future[ReplicationClosed]) -> ReplicationClosed:
        if cancel.cancelled():
            return ReplicationClosed("cancel awaitable was cancelled")
        exc = cancel.exception()
        if isinstance(exc, ReplicationClosed):
            return exc
        if exc is not None:
            return ReplicationClosed(f"cancel awaitable failed: {exc!r}")
        result = cancel.result()
        if isinstance(result, ReplicationClosed):
            return result
        return ReplicationClosed(str(result))

    async def _send_snapshot(
        self, vote: Vote, snapshot: Snapshot, option: RPCOption
    ) -> SnapshotResponse:
        action = "full_snapshot"
        meta = snapshot.meta
        sha256 = snapshot.sha256
        if sha256 is not None and (not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256)):
            raise SnapshotTransferError(
                meta,
                f"snapshot {meta.snapshot_id!r}: sha256 must be 64 lowercase hex digits, "
                f"got {str(sha256)[:80]!r}",
            )
        size = await asyncio.to_thread(_file_size, snapshot.data)
        headers = {
            **self.factory.headers,
            "Content-Type": OCTET_STREAM,
            H_VOTE: VOTE.encode(vote).decode(),
            H_SNAPSHOT_META: _ascii_json(SNAPSHOT_META.encode(meta)),
            H_SNAPSHOT_SIZE: str(size),
        }
        if sha256 is not None:
            # On every request, fresh or resumed: the server checks the whole file.
            headers[H_SNAPSHOT_SHA256] = sha256
        offset = 0
        resumes = 0
        while True:
            try:
                return await self._upload_from(action, headers, snapshot, offset, size, option)
            except (_Dropped, _Resume) as e:
                if resumes >= self.factory.max_resume_attempts:
                    raise NetworkError(
                        f"{action} to node {self.target} failed after {resumes} resumes: {e}",
                        target=self.target,
                    ) from (e.cause if isinstance(e, _Dropped) else None)
                resumes += 1
                if isinstance(e, _Resume):
                    offset = e.offset
                else:
                    offset = await self._held_offset(action, meta, option)
                if not 0 <= offset <= size:
                    raise NetworkError(
                        f"{action}: node {self.target} holds offset {offset} of a "
                        f"{size}-byte snapshot",
                        target=self.target,
                    ) from None

    async def _upload_from(
        self,
        action: str,
        headers: dict[str, str],
        snapshot: Snapshot,
        offset: int,
        size: int,
        option: RPCOption,
    ) -> SnapshotResponse:
        """One POST of the bytes from ``offset``; a dropped connection raises ``_Dropped``."""
        session = self.factory.snapshot_session()
        state = _Upload(offset)
        # A Content-Length, not chunked encoding: on Python 3.11 aiohttp joins each chunk
        # with its framing (a copy of every chunk), and the receiver checks the length.
        headers = {
            **headers,
            H_SNAPSHOT_OFFSET: str(offset),
            aiohttp.hdrs.CONTENT_LENGTH: str(size - offset),
        }
        try:
            async with asyncio.timeout(option.hard_ttl) as deadline:
                body = self._chunks(snapshot, state, size, option, deadline)
                async with session.post(
                    self.snapshot_url,
                    data=body,
                    headers=headers,
                    ssl=self.factory.ssl,
                    timeout=self._client_timeout(option),
                ) as resp:
                    answer = await _read_answer(resp)
                    if state.failure is not None:
                        raise state.failure
                    if resp.status == 409:
                        detail = _error_detail(resp, answer)
                        if (
                            detail is not None
                            and detail.kind == "offset_mismatch"
                            and detail.expected_offset is not None
                        ):
                            raise _Resume(detail.expected_offset)
                    if resp.status != 200:
                        self._raise_for_answer(action, resp, answer)
                    return self._decode(action, resp, answer, SNAPSHOT_RESPONSE)
        except TimeoutError:
            if state.failure is not None:
                raise state.failure from None
            raise Timeout(action, self.target, option.hard_ttl) from None
        except aiohttp.ClientError as e:
            if state.failure is not None:
                raise state.failure from None
            if isinstance(e, aiohttp.ClientConnectorError):
                raise Unreachable(
                    f"{action}: cannot connect to node {self.target} at {self.node.addr}: {e}",
                    target=self.target,
                ) from e
            if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
                raise _Dropped(e) from e
            raise self._transport_error(action, e) from e

    async def _chunks(
        self,
        snapshot: Snapshot,
        state: _Upload,
        size: int,
        option: RPCOption,
        deadline: asyncio.Timeout,
    ) -> AsyncIterator[bytes]:
        """The body from ``state.sent``; each step (read + write) gets ``hard_ttl`` of progress.

        aiohttp pulls the next chunk only once the previous one was written, so
        moving the deadline here bounds each chunk, not the whole snapshot; after
        the last byte, the answer gets ``hard_ttl`` too.
        """
        loop = asyncio.get_running_loop()
        chunk_size = option.chunk_size
        while state.sent < size:
            deadline.reschedule(loop.time() + option.hard_ttl)
            n = min(chunk_size, size - state.sent)
            chunk = await asyncio.to_thread(_read_at, snapshot.data, state.sent, n)
            if len(chunk) < n:
                state.failure = SnapshotTransferError(
                    snapshot.meta,
                    f"snapshot {snapshot.meta.snapshot_id!r} data ends at byte "
                    f"{state.sent + len(chunk)}, but its size is {size}",
                )
                raise state.failure
            state.sent += n
            yield chunk
        deadline.reschedule(loop.time() + option.hard_ttl)

    async def _held_offset(self, action: str, meta: SnapshotMeta, option: RPCOption) -> int:
        """Ask the target how many bytes of this snapshot it holds (``HEAD /snapshot``)."""
        session = self.factory.snapshot_session()
        try:
            async with (
                asyncio.timeout(option.hard_ttl),
                session.head(
                    self.snapshot_url,
                    headers={**self.factory.headers, H_SNAPSHOT_ID: meta.snapshot_id},
                    ssl=self.factory.ssl,
                    timeout=self._client_timeout(option),
                ) as resp,
            ):
                if resp.status != 200:
                    # HEAD answers carry no body: the next POST reports what is wrong.
                    return 0
                raw = resp.headers.get(H_SNAPSHOT_OFFSET, "")
                if not raw.isdigit():
                    raise NetworkError(
                        f"{action}: node {self.target} answered HEAD /snapshot without a "
                        f"valid {H_SNAPSHOT_OFFSET} ({raw[:40]!r})",
                        target=self.target,
                    )
                return int(raw)
        except TimeoutError:
            raise Timeout(action, self.target, option.hard_ttl) from None
        except aiohttp.ClientError as e:
            raise self._transport_error(action, e) from e

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _client_timeout(option: RPCOption) -> aiohttp.ClientTimeout:
        # A connect that has not finished by soft_ttl is a node we cannot reach,
        # reported as Unreachable before the hard deadline turns it into a Timeout.
        return aiohttp.ClientTimeout(total=None, sock_connect=option.soft_ttl)

    def _transport_error(self, action: str, e: aiohttp.ClientError) -> Unreachable | NetworkError:
        if isinstance(e, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return Unreachable(
                f"{action}: cannot connect to node {self.target} at {self.node.addr}: {e}",
                target=self.target,
            )
        return NetworkError(
            f"{action} to node {self.target} failed: {type(e).__name__}: {e}",
            target=self.target,
        )

    def _too_large(
        self, action: str, resp: aiohttp.ClientResponse, answer: bytes, entries: int
    ) -> PayloadTooLarge:
        detail = _error_detail(resp, answer)
        return PayloadTooLarge(
            action,
            entries_hint=max(1, entries // 2),
            bytes_hint=detail.limit if detail is not None else None,
            target=self.target,
        )

    def _raise_for_answer(
        self, action: str, resp: aiohttp.ClientResponse, answer: bytes
    ) -> NoReturn:
        detail = _error_detail(resp, answer)
        if detail is None:
            raise NetworkError(
                f"{action} to node {self.target}: HTTP {resp.status}: {_excerpt(answer)!r}",
                target=self.target,
            )
        raise RemoteError(self.target, self.node, _raft_error(detail))

    def _decode(
        self, action: str, resp: aiohttp.ClientResponse, answer: bytes, codec: JsonCodec[T]
    ) -> T:
        try:
            return codec.decode(answer)
        except msgspec.DecodeError as e:
            raise NetworkError(
                f"{action} to node {self.target}: undecodable answer (HTTP {resp.status}, {e}): "
                f"{_excerpt(answer)!r}",
                target=self.target,
            ) from None


class _Pending:
    """One request of an append stream awaiting its answer."""

    __slots__ = ("body", "deadline", "future", "rpc", "sent_at")

    def __init__(
        self,
        rpc: AppendEntriesRequest,
        future: asyncio.Future[AppendEntriesResponse],
        deadline: float,
    ) -> None:
        self.rpc = rpc
        self.body = APPEND_ENTRIES_REQUEST.encode(rpc)
        self.future = future
        self.deadline = deadline
        self.sent_at = asyncio.get_running_loop().time()


class _StreamFailed(Exception):
    """The channel failed: ``first`` is the error of pending request ``blame`` (the oldest)."""

    def __init__(self, first: Exception, blame: int = 0) -> None:
        super().__init__(str(first))
        self.first = first
        self.blame = blame


class _WebSocketAppendStream(AppendStream):
    """AppendEntries over one WebSocket to ``/append-stream``, answered in order.

    One task per connection writes what ``send`` queued and reads the answers; the
    oldest unanswered request's deadline (``hard_ttl`` after its ``send``) bounds
    every wait. Any transport failure closes the socket and fails what is pending;
    the next ``send`` connects again. A peer refusing the upgrade with 404/405 gets
    the same requests as POSTs, one at a time (remembered by the factory).
    """

    def __init__(self, network: HttpNetwork, option: RPCOption) -> None:
        self._network = network
        self._option = option
        self._pending: deque[_Pending] = deque()  # sent or queued, unanswered, in order
        self._unsent: deque[_Pending] = deque()
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._read_deadline: asyncio.Timeout | None = None
        self._fallback: SerialAppendStream | None = None
        self._closed = False

    @property
    def pipelined(self) -> bool:
        return self._fallback is None

    def send(self, rpc: AppendEntriesRequest) -> asyncio.Future[AppendEntriesResponse]:
        if self._closed:
            raise RuntimeError("send on a closed AppendStream")
        if self._fallback is not None:
            return self._fallback.send(rpc)
        loop = asyncio.get_running_loop()
        pending = _Pending(rpc, loop.create_future(), loop.time() + self._option.hard_ttl)
        self._pending.append(pending)
        self._unsent.append(pending)
        self._more.set()
        if self._read_deadline is not None and self._read_deadline.when() is None:
            self._read_deadline.reschedule(pending.deadline)
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"append-stream-{self._network.target}"
            )
        return pending.future

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()
        self._unsent.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    async def _run(self) -> None:
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws = await self._connect()
            if ws is None:
                self._use_posts()
                return
            await self._serve(ws)
        except _StreamFailed as e:
            self._fail_pending(e.first, e.blame)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: fail the requests rather than hang them
            self._fail_pending(NetworkError(f"append stream failed: {e!r}"))
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            self._read_deadline = None
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()

    def _fail_pending(self, first: Exception, blame: int = 0) -> None:
        failed = list(self._pending)
        self._pending.clear()
        self._unsent.clear()
        for i, pending in enumerate(failed):
            error = first if i == blame else reset_error(first)
            self._observe(pending, error)
            if not pending.future.done():
                pending.future.set_exception(error)

    def _observe(self, pending: _Pending, error: Exception | None) -> None:
        observer = self._network.factory.stream_observer
        if observer is not None:
            seconds = asyncio.get_running_loop().time() - pending.sent_at
            kind = None if error is None else type(error).__name__
            observer(self._network.append_stream_url, len(pending.body), seconds, kind)

    def _use_posts(self) -> None:
        """The peer has no stream: hand what is pending, in order, to a POST stream."""
        self._network.factory.stream_refused(self._network.append_stream_url)
        self._fallback = SerialAppendStream(self._network, self._option)
        waiting = list(self._pending)
        self._pending.clear()
        self._unsent.clear()
        for pending in waiting:
            _chain(self._fallback.send(pending.rpc), pending.future)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse | None:
        network = self._network
        factory = network.factory
        action = "append_entries"
        try:
            async with asyncio.timeout_at(self._pending[0].deadline):
                return await factory.session().ws_connect(
                    network.append_stream_url,
                    headers=factory.headers,
                    ssl=factory.ssl,
                    autoping=True,
                    max_msg_size=MAX_ANSWER_BYTES,
                    timeout=aiohttp.ClientWSTimeout(ws_close=min(1.0, self._option.hard_ttl)),
                )
        except aiohttp.WSServerHandshakeError as e:
            if e.status in _NO_STREAM_STATUSES or 200 <= e.status < 300:
                return None
            kind = _UPGRADE_REFUSED_KINDS.get(e.status, "http_error")
            refused = APIError(kind, f"upgrade to /append-stream refused: HTTP {e.status}")
            raise _StreamFailed(RemoteError(network.target, network.node, refused)) from None
        except TimeoutError:
            raise _StreamFailed(Timeout(action, network.target, self._option.hard_ttl)) from None
        except aiohttp.ClientError as e:
            raise _StreamFailed(network._transport_error(action, e)) from e

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Write and read until either fails (each raises ``_StreamFailed``)."""
        tasks = (asyncio.create_task(self._write(ws)), asyncio.create_task(self._read(ws)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send what is queued, in order."""
        while True:
            await self._more.wait()
            self._more.clear()
            while self._unsent:
                try:
                    await ws.send_bytes(self._unsent.popleft().body)
                except (aiohttp.ClientError, ConnectionError) as e:
                    raise _StreamFailed(self._error(f"a write failed: {e!r}")) from e

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        network = self._network
        while True:
            deadline = self._pending[0].deadline if self._pending else None
            try:
                async with asyncio.timeout_at(deadline) as timeout:
                    self._read_deadline = timeout
                    msg = await ws.receive()
            except TimeoutError:
                raise _StreamFailed(
                    Timeout("append_entries", network.target, self._option.hard_ttl)
                ) from None
            finally:
                self._read_deadline = None
            if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                if not self._pending:
                    raise _StreamFailed(self._error("an answer to no request"))
                self._settle(self._pending.popleft(), msg.data)
                continue
            if ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG and self._pending:
                # The target reads ahead of its answers, so the message it refused need not
                # be the oldest pending one: blame the largest (the others' answers are lost).
                sizes = [len(p.rpc.entries) for p in self._pending]
                blame = sizes.index(max(sizes))
                raise _StreamFailed(
                    PayloadTooLarge(
                        "append_entries",
                        entries_hint=max(1, sizes[blame] // 2),
                        target=network.target,
                    ),
                    blame,
                )
            raise _StreamFailed(
                self._error(f"the stream closed ({msg.type.name}, code {ws.close_code})")
            )

    def _settle(self, pending: _Pending, data: bytes | str) -> None:
        """Resolve one request from its answer message (a response or an error body)."""
        raw = data.encode() if isinstance(data, str) else data
        try:
            answer = APPEND_ENTRIES_RESPONSE.decode(raw)
        except msgspec.DecodeError:
            pass
        else:
            self._observe(pending, None)
            if not pending.future.done():
                pending.future.set_result(answer)
            return
        try:
            detail = ERROR_BODY.decode(raw).error
        except msgspec.DecodeError:
            raise _StreamFailed(self._error(f"an undecodable answer: {_excerpt(raw)!r}")) from None
        error: Exception
        if detail.kind == "payload_too_large":
            entries = len(pending.rpc.entries)
            error = PayloadTooLarge(
                "append_entries",
                entries_hint=max(1, entries // 2),
                bytes_hint=detail.limit,
                target=self._network.target,
            )
        else:
            error = RemoteError(self._network.target, self._network.node, _raft_error(detail))
        self._observe(pending, error)
        if not pending.future.done():
            pending.future.set_exception(error)

    def _error(self, what: str) -> NetworkError:
        target = self._network.target
        return NetworkError(f"append stream to node {target}: {what}", target=target)


def _chain(source: asyncio.Future[T], sink: asyncio.Future[T]) -> None:
    """Complete ``sink`` as ``source`` completes (the caller holds ``sink``)."""

    def copy(done: asyncio.Future[T]) -> None:
        if sink.done():
            return
        if done.cancelled():
            sink.cancel()
        elif (exc := done.exception()) is not None:
            sink.set_exception(exc)
        else:
            sink.set_result(done.result())

    source.add_done_callback(copy)
