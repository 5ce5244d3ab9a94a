"""The network contract a Raft core asks of any transport, after Openraft's ``RaftNetwork``.

One ``RaftNetwork`` talks to one target node; a ``RaftNetworkFactory`` builds them.
The HTTP transport (``raft_http.client``) implements it, and so does the in-memory
network in ``raft_http.testing``: the core knows nothing else about the wire.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import math
import random
import warnings
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .errors import NetworkError, PayloadTooLarge, RemoteError, ReplicationClosed, Unreachable
from .types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    Node,
    Snapshot,
    SnapshotResponse,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
)

DEFAULT_SNAPSHOT_CHUNK_SIZE = 3 * 1024 * 1024
"""Openraft's default ``snapshot_max_chunk_size``: 3 MiB."""


@dataclass(frozen=True, slots=True)
class RPCOption:
    """Per-call options: the hard deadline (seconds) and the snapshot fragment size.

    ``soft_ttl`` (3/4 of ``hard_ttl``) is the time a transport may spend before it
    should give up on a step that can be retried within the same call.
    """

    hard_ttl: float
    snapshot_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.hard_ttl < math.inf:
            raise ValueError(f"hard_ttl must be finite and > 0 seconds, got {self.hard_ttl!r}")
        if self.snapshot_chunk_size is not None and self.snapshot_chunk_size <= 0:
            raise ValueError(f"snapshot_chunk_size must be > 0, got {self.snapshot_chunk_size!r}")

    @property
    def soft_ttl(self) -> float:
        return self.hard_ttl * 3 / 4

    @property
    def chunk_size(self) -> int:
        """The snapshot fragment size in force: the option's, or 3 MiB."""
        return self.snapshot_chunk_size or DEFAULT_SNAPSHOT_CHUNK_SIZE


@dataclass(slots=True)
class Backoff:
    """An infinite iterator of sleep durations (seconds) before each retry of an unreachable node.

    Build one with ``Backoff.constant`` or ``Backoff.exponential``; the core builds a
    fresh one after every success, so the sequence restarts.
    """

    _durations: Iterator[float] = field(repr=False)

    def __iter__(self) -> Iterator[float]:
        return self

    def __next__(self) -> float:
        return next(self._durations)

    @classmethod
    def constant(cls, seconds: float = 0.5) -> Backoff:
        if not 0 <= seconds < math.inf:
            raise ValueError(f"a backoff must be finite and not negative, got {seconds!r}")
        return cls(itertools.repeat(seconds))

    @classmethod
    def exponential(
        cls,
        initial: float = 0.05,
        cap: float = 5.0,
        *,
        multiplier: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> Backoff:
        """``initial * multiplier**i``, capped at ``cap``, each shortened by up to ``jitter`` of it.

        Jitter keeps the followers of a restarted leader from retrying in lockstep.
        """
        finite = all(math.isfinite(x) for x in (initial, cap, multiplier, jitter))
        if not (finite and 0 < initial <= cap and multiplier >= 1 and 0 <= jitter <= 1):
            raise ValueError("need finite 0 < initial <= cap, multiplier >= 1 and 0 <= jitter <= 1")
        rand = rng or random.Random()

        def durations() -> Iterator[float]:
            delay = initial
            while True:
                yield delay * (1 - jitter * rand.random())
                delay = min(cap, delay * multiplier)

        return cls(durations())


class AppendStream(abc.ABC):
    """An ordered channel of AppendEntries to one target, after Openraft 0.10's ``stream_append``.

    ``send`` puts a request behind every request sent before it and returns a future of
    its answer. The target receives the requests in send order (some may be lost after
    a failure, none overtakes another), and the futures complete in send order. A
    request may still reach the target after its future failed, as with
    ``append_entries``.

    A future fails with the errors ``append_entries`` raises. An answer of the target's
    own (``RemoteError``, ``PayloadTooLarge``) fails that request only; any other failure
    (``Timeout``, ``Unreachable``, ``NetworkError``) fails it, and every request still
    pending with ``NetworkError``: the channel is reset, and the next ``send`` opens a
    fresh one.

    ``aclose()`` (or leaving ``async with``) cancels every pending future and releases
    the channel; a ``send`` after it raises ``RuntimeError``. Cancelling one future only
    discards its answer.
    """

    @abc.abstractmethod
    def send(self, rpc: AppendEntriesRequest) -> asyncio.Future[AppendEntriesResponse]:
        """Queue ``rpc`` after the requests sent before it; the future gets its answer."""

    @property
    def pipelined(self) -> bool:
        """True if a request travels before the earlier ones are answered.

        The Raft core keeps several requests in flight only on a pipelined stream: on a
        serial one, a request built later carries more entries for the same round trip.
        """
        return False

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Cancel what is pending and release the channel; idempotent."""

    async def __aenter__(self) -> AppendStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


ANSWER_ERRORS = (RemoteError, PayloadTooLarge)
"""Answer-level errors: they fail one request of a stream and keep the rest."""


class SerialAppendStream(AppendStream):
    """The default ``AppendStream``: one ``append_entries`` call at a time, in order.

    Any ``RaftNetwork`` gets ordering for free this way (one request is in flight, so
    none can overtake another); a transport with an ordered channel does better.
    """

    def __init__(self, network: RaftNetwork, option: RPCOption) -> None:
        self._network = network
        self._option = option
        self._queue: deque[tuple[AppendEntriesRequest, asyncio.Future[AppendEntriesResponse]]] = (
            deque()
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, rpc: AppendEntriesRequest) -> asyncio.Future[AppendEntriesResponse]:
        if self._closed:
            raise RuntimeError("send on a closed AppendStream")
        future: asyncio.Future[AppendEntriesResponse] = asyncio.get_running_loop().create_future()
        self._queue.append((rpc, future))
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"append-stream-{self._network!r}")
        return future

    async def _pump(self) -> None:
        try:
            while self._queue:
                rpc, future = self._queue[0]
                try:
                    answer = await self._network.append_entries(rpc, self._option)
                except ANSWER_ERRORS as e:
                    self._queue.popleft()
                    if not future.done():
                        future.set_exception(e)
                except Exception as e:  # the channel failed: so does everything behind it
                    failed = list(self._queue)
                    self._queue.clear()
                    for _, f in failed:
                        if not f.done():
                            f.set_exception(e if f is future else reset_error(e))
                else:
                    self._queue.popleft()
                    if not future.done():
                        future.set_result(answer)
        finally:
            self._task = None

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while self._queue:
            self._queue.popleft()[1].cancel()


def reset_error(cause: BaseException) -> NetworkError:
    """The error of a request that was behind a failed one on an ``AppendStream``."""
    return NetworkError(f"the stream was reset: an earlier request failed: {cause}")


class RaftNetwork(abc.ABC):
    """The connection to one target node.

    Every method raises the errors of ``raft_http.errors``; none raises a
    transport library's own exception. Cancelling the calling task cancels the
    RPC and leaves the network usable.
    """

    @abc.abstractmethod
    async def append_entries(
        self, rpc: AppendEntriesRequest, option: RPCOption
    ) -> AppendEntriesResponse:
        """Send an AppendEntries RPC (raises ``RPCError``)."""

    @abc.abstractmethod
    async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
        """Send a RequestVote RPC (raises ``RPCError``)."""

    @abc.abstractmethod
    async def full_snapshot(
        self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: Awaitable[ReplicationClosed],
        option: RPCOption,
    ) -> SnapshotResponse:
        """Send a whole snapshot, fragmented, and return once the target installed it.

        Returns early with the target's vote if that vote is greater than ``vote``.
        When ``cancel`` completes first the transfer stops and ``Closed`` is raised.
        Other failures raise ``StreamingError`` subclasses.
        """

    async def install_snapshot(
        self, rpc: InstallSnapshotRequest, option: RPCOption
    ) -> InstallSnapshotResponse:
        """Send one snapshot fragment (deprecated: use ``full_snapshot``)."""
        warnings.warn(
            "install_snapshot is deprecated; use full_snapshot",
            DeprecationWarning,
            stacklevel=2,
        )
        raise NotImplementedError(f"{type(self).__name__} does not implement install_snapshot")

    async def transfer_leader(self, rpc: TransferLeaderRequest, option: RPCOption) -> None:
        """Ask the target to take over leadership (raises ``RPCError``).

        Optional, as in Openraft: a network without it raises ``Unreachable``, and
        the leader's ``transfer_leader`` then fails and it keeps leading.
        """
        raise Unreachable(f"{type(self).__name__} does not implement transfer_leader")

    def stream_append(self, option: RPCOption) -> AppendStream:
        """An ordered channel for pipelined AppendEntries (Openraft 0.10's ``stream_append``).

        ``option`` bounds each request. The default sends one request at a time through
        ``append_entries``; a transport with an ordered channel overrides it.
        """
        return SerialAppendStream(self, option)

    def backoff(self) -> Backoff:
        """How long to sleep before each retry after ``Unreachable``; constant 500 ms by default."""
        return Backoff.constant(0.5)


class RaftNetworkFactory(abc.ABC):
    """Builds one ``RaftNetwork`` per target node; must not connect (connections are lazy)."""

    @abc.abstractmethod
    def new_client(self, target: int, node: Node) -> RaftNetwork:
        """A network to ``target`` at ``node``; no I/O happens until the first RPC."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the factory holds (sessions, sockets)."""


class RaftHandler(Protocol):
    """The receiving side: what a transport's server hands incoming RPCs to.

    The Raft core implements it. Handlers raise ``raft_http.errors.Fatal`` when
    the node has stopped; transports report that to the caller as a
    ``RemoteError``.
    """

    def current_vote(self) -> Vote:
        """The node's vote now; lets a server refuse a stale snapshot before reading its body."""
        ...

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse: ...

    async def vote(self, rpc: VoteRequest) -> VoteResponse: ...

    async def handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        """Take over leadership from ``rpc.from_leader``: campaign once the log holds
        ``rpc.last_log_id``; returns before the election ends."""
        ...

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        """Install a complete snapshot received from the leader of ``vote``.

        ``snapshot.data`` is only valid during the call: the handler copies what it keeps.
        Cancelled, the call must still return only once nothing reads ``data``: the
        server closes and deletes it then.
        Answers its own vote; a vote greater than ``vote`` means the snapshot was refused.
        """
        ...
