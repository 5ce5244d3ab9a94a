"""One replication stream from the leader to one target: heartbeats, log batches, snapshots.

Each stream sends as soon as there is something new (or a heartbeat is due), and reacts
to each answer and error kind the way the network contract says: back off when
unreachable, shrink the batch when too large, search back for the match point on
conflict, step down on a higher vote.

Requests go through the network's ``stream_append`` channel, whose answers come back in
send order. When that channel is pipelined, up to ``Config.max_inflight_appends``
requests (and about ``max_inflight_bytes``) are in flight once the follower is in the
replicate state; while probing, one at a time (etcd's progress does the same). Answers
are learnt from in order; a conflict or an error drops the window and probes again from
what the follower confirmed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from ..errors import (
    APIError,
    Closed,
    NetworkError,
    PayloadTooLarge,
    RaftHttpError,
    RemoteError,
    ReplicationClosed,
    Unreachable,
)
from ..network import AppendStream, Backoff, RaftNetwork, RPCOption
from ..types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Conflict,
    Entry,
    HigherVote,
    LogId,
    Node,
    Normal,
    PartialSuccess,
    Success,
    Vote,
    log_index,
)
from .engine.progress import Progress
from .storage import StorageError

if TYPE_CHECKING:
    from .node import Raft

log = logging.getLogger(__name__)

ENTRY_OVERHEAD_BYTES = 96
"""About what an entry's log id and payload tag add to its data on the wire (JSON)."""


class _InFlight:
    """One AppendEntries sent and not yet learnt from."""

    __slots__ = ("answer", "last", "leader_commit", "prev_index", "prev_log_id", "sent_at", "size")

    def __init__(
        self,
        answer: asyncio.Future[AppendEntriesResponse],
        rpc: AppendEntriesRequest,
        prev_index: int,
        sent_at: float,
    ) -> None:
        self.answer = answer
        self.prev_index = prev_index
        self.prev_log_id = rpc.prev_log_id
        self.leader_commit = rpc.leader_commit
        self.last = rpc.entries[-1].log_id if rpc.entries else rpc.prev_log_id
        self.sent_at = sent_at
        self.size = _wire_size(rpc.entries)


class _Wake:
    """The flag that tells a replicator there is more to send (an ``asyncio.Event``
    without a task per wait): ``set`` completes the replicator's waiting future, if any."""

    __slots__ = ("_set", "waiter")

    def __init__(self) -> None:
        self._set = False
        self.waiter: asyncio.Future[bool] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def clear(self) -> None:
        self._set = False


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _wire_size(entries: list[Entry]) -> int:
    return sum(
        ENTRY_OVERHEAD_BYTES + (len(e.payload.data) if isinstance(e.payload, Normal) else 0)
        for e in entries
    )


class Replicator:
    """The leader's view of one target (its progress) and the task that drives it."""

    def __init__(self, raft: Raft, vote: Vote, target: int, node: Node, network: RaftNetwork):
        self.raft = raft
        self.vote = vote
        self.target = target
        self.node = node
        self.network = network
        self.progress = Progress(raft.log.last_index + 1, raft.config.max_payload_entries)
        self.wake = _Wake()
        self._problem: str | None = None
        self.problem: str | None = None
        """The error of the last attempt when it failed to reach the target, else None."""
        self.told_committed = -1
        """The greatest index the target acknowledged learning is committed (-1: none)."""
        self._stream: AppendStream | None = None
        self._window: deque[_InFlight] = deque()
        self._window_bytes = 0
        self.most_in_flight = 0
        """The most AppendEntries in flight at once to this target (tests, diagnostics)."""
        self.stored_reads = 0
        """Batches read back from the log store, evicted from memory (tests, diagnostics)."""
        self.closed: asyncio.Future[ReplicationClosed] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._run(), name=f"raft-{raft.id}-replicate-{target}")

    @property
    def matching(self) -> LogId | None:
        return self.progress.matching

    @property
    def failing(self) -> bool:
        """The last attempt to reach the target failed (unreachable, refused, timed out)."""
        return self.problem is not None

    @property
    def entries_limit(self) -> int:
        return self.progress.entries_limit

    def stop(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(ReplicationClosed(reason))
        self.raft.storage_calls.cancel(self.task)  # not inside a storage call

    async def _run(self) -> None:
        """Send until this node stops leading; a crash here stops the node (see Raft._spawn)."""
        try:
            await self._replicate()
        finally:
            await self._drop_window(close=True)

    async def _replicate(self) -> None:
        backoff: Backoff | None = None
        heartbeat = self.raft.config.heartbeat_interval
        while self.raft.is_leader_of(self.vote):
            try:
                answered = await self._step(heartbeat)
            except Closed:
                return
            except PayloadTooLarge as e:
                await self._drop_window()
                self.progress.too_large(e.entries_hint)
                self._trouble(f"payload too large, now {self.entries_limit} entries per request")
            except (Unreachable, RemoteError) as e:
                await self._drop_window()
                self.progress.failed()
                self.problem = f"{type(e).__name__}: {e}"
                # Down, stopped (Fatal) or refusing us (token, cluster): back off.
                backoff = backoff or self.network.backoff()
                delay = next(backoff)
                self._trouble(f"{type(e).__name__}: {e}; retrying in {delay:.3f}s")
                await asyncio.sleep(delay)
            except RaftHttpError as e:  # Timeout, NetworkError, ...: the next try may work
                await self._drop_window()
                self.progress.failed()
                self.problem = f"{type(e).__name__}: {e}"
                self._trouble(f"{type(e).__name__}: {e}")
                await asyncio.sleep(heartbeat)
            else:
                if answered is None:
                    return
                if answered:
                    backoff = None
                    self.problem = None
                    if self._problem is not None:
                        log.info("replication to node %s recovered", self.target)
                        self._problem = None

    async def _step(self, heartbeat: float) -> bool | None:
        """Send what the window allows, or wait; then learn from the answers that are in.

        Returns True when the target answered, False when it did not yet, None when
        this node stopped leading. Raises the error of a failed request.
        """
        raft = self.raft
        progress = self.progress
        if progress.needs_snapshot(raft.log.last_purged):
            if not self._window:  # what is in flight is answered first
                self.wake.clear()
                await self._send_snapshot()
                return raft.is_leader_of(self.vote) or None
        elif self._may_send() and (self.wake.is_set() or progress.has_more(raft.log.last_index)):
            self.wake.clear()
            if not await self._send_append():
                return False if raft.is_leader_of(self.vote) else None
            return await self._settle()
        if not await self._wait(heartbeat):
            if not raft.is_leader_of(self.vote):
                return None
            if self._may_send():
                self.wake.set()  # quiet for a heartbeat interval: send a heartbeat
        return await self._settle()

    async def _wait(self, timeout: float) -> bool:
        """Until the oldest answer or a wake-up; False if neither came within ``timeout``.

        A wake-up counts only when something could be sent on it: with the window full
        (or a snapshot waiting for it to drain), a set ``wake`` would return at once and
        the task would spin until the oldest answer came. One future and one timer per
        wait, no task: the task-per-wait this replaced ran a third of the leader's
        event-loop callbacks per sequential write.
        """
        answer = self._window[0].answer if self._window else None
        listen = answer is None or (
            self._may_send() and not self.progress.needs_snapshot(self.raft.log.last_purged)
        )
        if answer is not None and answer.done():
            return True
        if not (listen and self.wake.is_set()):
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()

            def answered(_: object) -> None:
                if not waiter.done():
                    waiter.set_result(True)

            if answer is not None:
                answer.add_done_callback(answered)
            if listen:
                self.wake.waiter = waiter
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                if not await waiter:
                    return False
            finally:
                timer.cancel()
                if answer is not None:
                    answer.remove_done_callback(answered)
                if listen:
                    self.wake.waiter = None
            if answer is not None and answer.done():
                return True
        # Woken to send: two loop turns first, so that a batch the proposer appends
        # meanwhile joins this request. The task-based wait took as long; without them
        # requests carried fewer entries and a follower's CPU per write rose 1.31x at
        # 64 clients (it pays per request, not per entry).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return True

    def _may_send(self) -> bool:
        """Etcd's flow control: one request while probing; a window once replicating."""
        if not self._window:
            return True
        if self._stream is None or not self._stream.pipelined:
            return False
        config = self.raft.config
        return (
            len(self._window) < self.progress.window(config.max_inflight_appends)
            and self._window_bytes < config.max_inflight_bytes
        )

    async def _send_append(self) -> bool:
        """Send the next batch; False if the log moved past it while it was read from disk."""
        raft = self.raft
        progress = self.progress
        start, stop = progress.batch(raft.log.last_index)
        prev_index = start - 1
        if start < min(stop, raft.log.first_held):
            entries = await self._read_stored(start, min(stop, raft.log.first_held))
            if entries is None:
                return False
        else:
            entries = raft.log.slice(start, stop)
        rpc = AppendEntriesRequest(
            self.vote, raft.log.log_id_at(prev_index), entries, raft.committed
        )
        if self._stream is None:
            option = RPCOption(hard_ttl=raft.config.append_timeout)
            self._stream = self.network.stream_append(option)
        sent_at = asyncio.get_running_loop().time()
        sent = _InFlight(self._stream.send(rpc), rpc, prev_index, sent_at)
        progress.sent(stop - 1)
        self._window.append(sent)
        self._window_bytes += sent.size
        self.most_in_flight = max(self.most_in_flight, len(self._window))
        return True

    async def _read_stored(self, start: int, stop: int) -> list[Entry] | None:
        """Entries ``start <= i < stop`` evicted from memory, read back from the log store.

        None when, during the read, this node stopped leading or the log was purged past
        ``start - 1`` (the next step sends a snapshot instead).
        """
        raft = self.raft
        entries = await raft.log_store.read_entries(start, stop)
        if not raft.is_leader_of(self.vote) or start - 1 < log_index(raft.log.last_purged):
            return None
        if len(entries) != stop - start or any(
            e.log_id != raft.log.log_id_at(start + i) for i, e in enumerate(entries)
        ):
            # A leader's log never changes under it: the store lost what it said it held.
            raise StorageError(
                f"the log store returned {len(entries)} entries for {start}..{stop - 1},"
                " not the ones the log holds"
            )
        self.stored_reads += 1
        return entries

    async def _settle(self) -> bool | None:
        """Learn from the answers in, oldest first (see ``_step`` for the result)."""
        answered = False
        while self._window and self._window[0].answer.done():
            sent = self._window.popleft()
            self._window_bytes -= sent.size
            if sent.answer.cancelled():  # only a closed stream does that; ours are not
                raise NetworkError(f"the append stream to node {self.target} dropped an answer")
            response = sent.answer.result()  # a failure drops the window (``_replicate``)
            answered = True
            if not self.raft.is_leader_of(self.vote):
                return None
            if not await self._learn(sent, response):
                return None
        return answered

    async def _learn(self, sent: _InFlight, response: AppendEntriesResponse) -> bool:
        """One answer, in send order; False when this node stopped leading."""
        raft = self.raft
        match response:
            case Success():
                self._told(sent.leader_commit, sent.last)
                self._matched(sent.last, sent.sent_at)
            case PartialSuccess(matching=matching):
                self._told(sent.leader_commit, matching)
                self._matched(matching, sent.sent_at)
                if log_index(matching) < log_index(sent.last):
                    # The target kept less than was sent: what follows cannot match.
                    await self._drop_window()
                    self.progress.failed()
            case Conflict() if sent.prev_log_id is None:
                # Every log holds the empty prefix: a peer saying otherwise is broken. Do
                # not spin on it; the heartbeat pace keeps asking.
                await self._drop_window()
                self.progress.failed()
                self._trouble("Conflict: the peer refuses even an empty prefix")
                await asyncio.sleep(raft.config.heartbeat_interval)
            case Conflict():
                await self._drop_window()
                self.progress.conflict(sent.prev_index)
            case HigherVote(vote=vote):
                await self._drop_window()
                await raft.on_higher_vote(vote, f"append_entries to node {self.target}")
                return False
        return True

    async def _drop_window(self, *, close: bool = False) -> None:
        """Forget the requests in flight; the channel they were on goes with them."""
        window, self._window = self._window, deque()
        self._window_bytes = 0
        for sent in window:
            if sent.answer.done() and not sent.answer.cancelled():
                sent.answer.exception()  # retrieved: a dropped answer is no news
        if self._stream is not None and (window or close):
            stream, self._stream = self._stream, None
            await stream.aclose()

    def _trouble(self, problem: str) -> None:
        """Log a new kind of trouble once at WARNING; repeats of it only at DEBUG."""
        kind = problem.split(":", 1)[0]
        if self._problem != kind:
            log.warning("replication to node %s: %s", self.target, problem)
            self._problem = kind
        else:
            log.debug("replication to node %s: %s", self.target, problem)

    def _told(self, leader_commit: LogId | None, matching: LogId | None) -> None:
        """A follower commits ``min(leader_commit, what it matched)`` of each request."""
        told = min(log_index(leader_commit), log_index(matching))
        self.told_committed = max(self.told_committed, told)

    def _matched(self, matching: LogId | None, sent_at: float) -> None:
        self.progress.matched(matching, sent_at)
        self.raft.on_replicated(self)

    async def _send_snapshot(self) -> None:
        raft = self.raft
        snapshot = await raft.snapshot_store.open_latest()
        if snapshot is None:
            raise NetworkError(f"no snapshot to send to node {self.target} yet")
        try:
            option = RPCOption(
                hard_ttl=raft.config.install_snapshot_timeout,
                snapshot_chunk_size=raft.config.snapshot_max_chunk_size,
            )
            sent_at = asyncio.get_running_loop().time()
            self.progress.sending_snapshot()
            log.info("sending snapshot %s to node %s", snapshot.meta.snapshot_id, self.target)
            response = await self.network.full_snapshot(self.vote, snapshot, self.closed, option)
        except RemoteError as e:
            if isinstance(e.source, APIError) and e.source.kind == "checksum_mismatch":
                # Our file no longer matches the digest taken when it was written (bit rot):
                # build a fresh snapshot of the same state, which replaces it.
                log.error("snapshot %s is damaged (%s); rebuilding", snapshot.meta.snapshot_id, e)
                await raft.trigger_snapshot()
            raise
        finally:
            await asyncio.to_thread(snapshot.data.close)
        if not raft.is_leader_of(self.vote):
            return
        if response.vote > self.vote:
            await raft.on_higher_vote(response.vote, f"snapshot to node {self.target}")
            return
        self._matched(snapshot.meta.last_log_id, sent_at)
