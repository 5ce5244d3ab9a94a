"""An in-process Raft network with fault injection, for tests of the core and of clusters.

``MemoryRouter`` connects ``RaftHandler``s registered under node ids; each node gets
a ``RaftNetworkFactory`` from ``router.factory(node_id)``. Every message is encoded
and decoded with the wire codecs of ``raft_http.types`` on the way, so a type that
does not survive JSON fails here as it would over HTTP, and no object is shared
between nodes.

Faults are directional (``source -> target``) unless said otherwise. A request
that cannot go out fails with ``Unreachable``; a reply that cannot come back is
lost, so the caller waits until its deadline (``Timeout``) although the target
acted on the request, as with a one-way partition on a real network.

No aiohttp here: the core's tests need not start servers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import re
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Literal, TypeAlias, TypeVar, cast

import msgspec

from .errors import (
    APIError,
    Closed,
    PayloadTooLarge,
    RaftError,
    RemoteError,
    ReplicationClosed,
    SnapshotTransferError,
    Timeout,
    Unreachable,
)
from .network import Backoff, RaftHandler, RaftNetwork, RaftNetworkFactory, RPCOption
from .types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    SNAPSHOT_META,
    SNAPSHOT_RESPONSE,
    TRANSFER_LEADER_REQUEST,
    VOTE,
    VOTE_REQUEST,
    VOTE_RESPONSE,
    AppendEntriesRequest,
    AppendEntriesResponse,
    Entry,
    Node,
    Normal,
    Snapshot,
    SnapshotResponse,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
)

RpcKind: TypeAlias = Literal["append", "vote", "snapshot", "transfer"]
T = TypeVar("T")

_SPOOL_IN_MEMORY: Final = 1024 * 1024
"""Snapshots up to this size stay in memory on the way; larger ones go to a temp file."""
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Faults:
    unreachable: set[tuple[int, int]] = field(default_factory=set)
    isolated: set[int] = field(default_factory=set)
    groups: dict[int, int] = field(default_factory=dict)  # node -> partition group
    delays: dict[tuple[int, int], float] = field(default_factory=dict)
    failures: dict[tuple[int, int], collections.deque[Callable[[], Exception]]] = field(
        default_factory=dict
    )
    max_entries: dict[int, int] = field(default_factory=dict)
    blocked: set[tuple[int, int]] = field(default_factory=set)


class MemoryRouter:
    """Delivers RPCs between registered handlers, with faults a test can switch on and off.

    ``sent[(source, target, kind)]`` counts every RPC a node started, delivered or not,
    with ``kind`` one of ``"append"``, ``"vote"``, ``"snapshot"``, ``"transfer"``.
    """

    def __init__(self, *, backoff_seconds: float = 0.05) -> None:
        self._handlers: dict[int, RaftHandler] = {}
        self._faults = _Faults()
        self.backoff_seconds = backoff_seconds
        self.sent: collections.Counter[tuple[int, int, RpcKind]] = collections.Counter()

    # --- membership of the network -------------------------------------------------

    def register(self, node_id: int, handler: RaftHandler) -> None:
        self._handlers[node_id] = handler

    def unregister(self, node_id: int) -> None:
        """Take a node off the network (a crash): RPCs to it fail with ``Unreachable``."""
        self._handlers.pop(node_id, None)

    def factory(self, source_id: int) -> MemoryNetworkFactory:
        return MemoryNetworkFactory(self, source_id)

    # --- faults ----------------------------------------------------------------------

    def set_unreachable(self, source: int, target: int, on: bool = True) -> None:
        """Drop everything ``source`` sends to ``target`` (requests and replies)."""
        if on:
            self._faults.unreachable.add((source, target))
        else:
            self._faults.unreachable.discard((source, target))

    def isolate(self, node_id: int, on: bool = True) -> None:
        """Cut ``node_id`` off from every node, both ways."""
        if on:
            self._faults.isolated.add(node_id)
        else:
            self._faults.isolated.discard(node_id)

    def partition(self, *groups: set[int]) -> None:
        """Nodes in different groups cannot talk (either way); replaces an earlier partition.

        A node in no group is not cut off from anyone.
        """
        assignment: dict[int, int] = {}
        for i, group in enumerate(groups):
            for node in group:
                if node in assignment:
                    raise ValueError(f"node {node} is in two partition groups")
                assignment[node] = i
        self._faults.groups = assignment

    def heal(self) -> None:
        """Clear every fault (delays, pending failures, limits and blocks too)."""
        self._faults = _Faults()

    def set_delay(self, source: int, target: int, seconds: float) -> None:
        """Delay every request from ``source`` to ``target`` (0 to stop)."""
        if not seconds >= 0:
            raise ValueError("a delay cannot be negative")
        if seconds:
            self._faults.delays[(source, target)] = seconds
        else:
            self._faults.delays.pop((source, target), None)

    def fail_next(
        self,
        source: int,
        target: int,
        error_factory: Callable[[], Exception],
        count: int = 1,
    ) -> None:
        """Make the next ``count`` RPCs from ``source`` to ``target`` raise ``error_factory()``."""
        queue = self._faults.failures.setdefault((source, target), collections.deque())
        queue.extend([error_factory] * count)

    def set_max_entries(self, target: int, n: int | None) -> None:
        """``target`` refuses appends of more than ``n`` entries (``PayloadTooLarge``)."""
        if n is None:
            self._faults.max_entries.pop(target, None)
        elif n < 1:
            raise ValueError("the entry limit must be at least 1")
        else:
            self._faults.max_entries[target] = n

    def block(self, source: int, target: int, on: bool = True) -> None:
        """RPCs from ``source`` to ``target`` hang until their deadline (``Timeout``)."""
        if on:
            self._faults.blocked.add((source, target))
        else:
            self._faults.blocked.discard((source, target))

    def can_send(self, source: int, target: int) -> bool:
        """Whether a message from ``source`` would reach ``target`` now (ignoring delays)."""
        faults = self._faults
        if (source, target) in faults.unreachable:
            return False
        if source in faults.isolated or target in faults.isolated:
            return False
        gs, gt = faults.groups.get(source), faults.groups.get(target)
        return gs is None or gt is None or gs == gt

    # --- delivery ----------------------------------------------------------------------

    async def _deliver(
        self,
        source: int,
        target: int,
        action: str,
        entries: int | None,
        call: Callable[[RaftHandler], Awaitable[bytes]],
    ) -> bytes:
        """Apply the faults, then run ``call`` on the target's handler; returns the encoded reply.

        Runs inside the caller's deadline.
        """
        faults = self._faults
        queue = faults.failures.get((source, target))
        if queue:
            raise queue.popleft()()
        if not self.can_send(source, target):
            raise Unreachable(f"{action}: node {target} is unreachable", target=target)
        if (source, target) in faults.blocked:
            await asyncio.Event().wait()  # until the deadline
        delay = faults.delays.get((source, target))
        if delay:
            await asyncio.sleep(delay)
            if not self.can_send(source, target):  # cut off while in flight
                raise Unreachable(f"{action}: node {target} is unreachable", target=target)
        handler = self._handlers.get(target)
        if handler is None:
            raise Unreachable(f"{action}: node {target} is not on the network", target=target)
        limit = self._faults.max_entries.get(target)
        if entries is not None and limit is not None and entries > limit:
            raise PayloadTooLarge(action, entries_hint=limit, target=target)
        try:
            reply = await call(handler)
        except RaftError as exc:  # e.g. Fatal: the target has stopped
            raise RemoteError(target, None, exc) from exc
        if not self.can_send(target, source):  # the reply is lost on the way back
            await asyncio.Event().wait()
        return reply


async def _within(option: RPCOption, action: str, target: int, node: Node, work: Awaitable[T]) -> T:
    """Run ``work`` within ``option.hard_ttl``; fills in the node of a ``RemoteError``."""
    try:
        async with asyncio.timeout(option.hard_ttl):
            return await work
    except TimeoutError:
        raise Timeout(action, target, option.hard_ttl) from None
    except RemoteError as exc:
        if exc.node is None:
            raise RemoteError(target, node, exc.source) from exc.__cause__
        raise


class MemoryNetwork(RaftNetwork):
    """One node's connection to one target through a ``MemoryRouter``."""

    def __init__(self, router: MemoryRouter, source: int, target: int, node: Node) -> None:
        self.router = router
        self.source = source
        self.target = target
        self.node = node

    async def append_entries(
        self, rpc: AppendEntriesRequest, option: RPCOption
    ) -> AppendEntriesResponse:
        self.router.sent[(self.source, self.target, "append")] += 1
        body = APPEND_ENTRIES_REQUEST.encode(rpc)

        async def call(handler: RaftHandler) -> bytes:
            reply = await handler.append_entries(APPEND_ENTRIES_REQUEST.decode(body))
            return APPEND_ENTRIES_RESPONSE.encode(reply)

        deliver = self.router._deliver(
            self.source, self.target, "append_entries", len(rpc.entries), call
        )
        reply = await _within(option, "append_entries", self.target, self.node, deliver)
        return APPEND_ENTRIES_RESPONSE.decode(reply)

    async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
        self.router.sent[(self.source, self.target, "vote")] += 1
        body = VOTE_REQUEST.encode(rpc)

        async def call(handler: RaftHandler) -> bytes:
            return VOTE_RESPONSE.encode(await handler.vote(VOTE_REQUEST.decode(body)))

        deliver = self.router._deliver(self.source, self.target, "vote", None, call)
        reply = await _within(option, "vote", self.target, self.node, deliver)
        return VOTE_RESPONSE.decode(reply)

    async def transfer_leader(self, rpc: TransferLeaderRequest, option: RPCOption) -> None:
        self.router.sent[(self.source, self.target, "transfer")] += 1
        body = TRANSFER_LEADER_REQUEST.encode(rpc)

        async def call(handler: RaftHandler) -> bytes:
            await handler.handle_transfer_leader(TRANSFER_LEADER_REQUEST.decode(body))
            return b"{}"

        deliver = self.router._deliver(self.source, self.target, "transfer_leader", None, call)
        await _within(option, "transfer_leader", self.target, self.node, deliver)

    async def full_snapshot(
        self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: Awaitable[ReplicationClosed],
        option: RPCOption,
    ) -> SnapshotResponse:
        """Copy the snapshot (in chunks, in worker threads) and install it on the target.

        The transfer races ``cancel``: if ``cancel`` completes first, the transfer
        is cancelled and ``Closed`` is raised.
        """
        self.router.sent[(self.source, self.target, "snapshot")] += 1
        cancel_future = asyncio.ensure_future(cancel)
        owned = cancel_future is not cancel  # never cancel the caller's own future
        transfer: asyncio.Future[SnapshotResponse] | None = None
        try:
            if cancel_future.done():
                raise Closed(_closed_reason(cancel_future))
            transfer = asyncio.ensure_future(
                _within(
                    option,
                    "full_snapshot",
                    self.target,
                    self.node,
                    self._send_snapshot(vote, snapshot, option),
                )
            )
            done, _ = await asyncio.wait(
                {transfer, cancel_future}, return_when=asyncio.FIRST_COMPLETED
            )
            if transfer in done:
                return transfer.result()
            raise Closed(_closed_reason(cancel_future))
        finally:
            if transfer is not None and not transfer.done():
                transfer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await transfer
            if owned and not cancel_future.done():
                cancel_future.cancel()

    async def _send_snapshot(
        self, vote: Vote, snapshot: Snapshot, option: RPCOption
    ) -> SnapshotResponse:
        vote_body = VOTE.encode(vote)
        meta_body = SNAPSHOT_META.encode(snapshot.meta)
        expected = snapshot.sha256
        if expected is not None and not _SHA256_HEX.fullmatch(expected):
            raise SnapshotTransferError(
                snapshot.meta,
                f"snapshot {snapshot.meta.snapshot_id!r}: sha256 must be 64 lowercase hex "
                f"digits, got {expected[:80]!r}",
            )

        async def call(handler: RaftHandler) -> bytes:
            # closed in a worker thread below: closing may delete a file
            spool = cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY))  # noqa: SIM115
            try:
                digest = hashlib.sha256()
                offset = 0
                while True:  # one chunk per thread call: a cancel is seen between chunks
                    n = await asyncio.to_thread(
                        _copy_chunk, snapshot.data, spool, offset, option.chunk_size, digest
                    )
                    if n == 0:
                        break
                    offset += n
                # As the HTTP server does: the handler never sees data that fails its checksum.
                if expected is not None and digest.hexdigest() != expected:
                    # What the HTTP client raises for the server's 400 checksum_mismatch.
                    raise APIError(
                        "checksum_mismatch",
                        f"snapshot {snapshot.meta.snapshot_id!r} checksum mismatch: expected "
                        f"{expected}, the {offset} bytes sent hash to {digest.hexdigest()}",
                    )
                await asyncio.to_thread(spool.seek, 0)
                received = Snapshot(SNAPSHOT_META.decode(meta_body), spool, sha256=expected)
                reply = await handler.install_full_snapshot(VOTE.decode(vote_body), received)
                return SNAPSHOT_RESPONSE.encode(reply)
            finally:
                await asyncio.to_thread(spool.close)

        reply = await self.router._deliver(self.source, self.target, "full_snapshot", None, call)
        return SNAPSHOT_RESPONSE.decode(reply)

    def backoff(self) -> Backoff:
        return Backoff.constant(self.router.backoff_seconds)


def _closed_reason(cancel: asyncio.Future[ReplicationClosed]) -> ReplicationClosed:
    if cancel.cancelled() or cancel.exception() is not None:
        return ReplicationClosed("the cancel awaitable did not complete normally")
    return cancel.result()


def _copy_chunk(src: BinaryIO, dst: BinaryIO, offset: int, size: int, digest: hashlib._Hash) -> int:
    """Copy up to ``size`` bytes at ``offset`` (seek and read in one call: no shared position)."""
    src.seek(offset)
    data = src.read(size)
    dst.write(data)
    digest.update(data)
    return len(data)


class MemoryNetworkFactory(RaftNetworkFactory):
    """Builds ``MemoryNetwork``s from one source node."""

    def __init__(self, router: MemoryRouter, source: int) -> None:
        self.router = router
        self.source = source

    def new_client(self, target: int, node: Node) -> MemoryNetwork:
        return MemoryNetwork(self.router, self.source, target, node)


class ListStateMachine:
    """The smallest useful state machine: each command (any JSON) is appended to a list.

    The response to a command is the list's new length. It satisfies the core's
    ``StateMachine`` protocol, so tests and benchmarks can check what every node
    applied, in order.
    """

    def __init__(self) -> None:
        self.applied: list[Any] = []

    async def apply(self, entries: Sequence[Entry]) -> list[Any]:
        responses: list[Any] = []
        for entry in entries:
            if isinstance(entry.payload, Normal):
                self.applied.append(msgspec.json.decode(entry.payload.data))
                responses.append(len(self.applied))
            else:
                responses.append(None)
        return responses

    def begin_snapshot(self) -> Callable[[BinaryIO], None]:
        data = msgspec.json.encode(self.applied)

        def write(out: BinaryIO) -> None:
            out.write(data)

        return write

    async def install_snapshot(self, data: BinaryIO) -> None:
        self.applied = msgspec.json.decode(await asyncio.to_thread(data.read))
