"""One replication stream from the leader to one target: heartbeats, log batches, snapshots.

Each stream keeps one request in flight, sends as soon as there is something new
(or a heartbeat is due), and reacts to each answer and error kind the way the
network contract says: back off when unreachable, shrink the batch when too large,
search back for the match point on conflict, step down on a higher vote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from ..network import Backoff, RaftNetwork, RPCOption
from ..types import (
    AppendEntriesRequest,
    Conflict,
    HigherVote,
    LogId,
    Node,
    PartialSuccess,
    Success,
    Vote,
    log_index,
)
from .engine.progress import Progress

if TYPE_CHECKING:
    from .node import Raft

log = logging.getLogger(__name__)


class Replicator:
    """The leader's view of one target (its progress) and the task that drives it."""

    def __init__(self, raft: Raft, vote: Vote, target: int, node: Node, network: RaftNetwork):
        self.raft = raft
        self.vote = vote
        self.target = target
        self.node = node
        self.network = network
        self.progress = Progress(raft.log.last_index + 1, raft.config.max_payload_entries)
        self.wake = asyncio.Event()
        self._problem: str | None = None
        self.problem: str | None = None
        """The error of the last attempt when it failed to reach the target, else None."""
        self.told_committed = -1
        """The greatest index the target acknowledged learning is committed (-1: none)."""
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
        self.task.cancel()

    async def _run(self) -> None:
        """Send until this node stops leading; a crash here stops the node (see Raft._spawn)."""
        backoff: Backoff | None = None
        heartbeat = self.raft.config.heartbeat_interval
        while self.raft.is_leader_of(self.vote):
            if not self.progress.has_more(self.raft.log.last_index):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), heartbeat)
                if not self.raft.is_leader_of(self.vote):
                    return
            self.wake.clear()
            try:
                await self._send_once()
            except Closed:
                return
            except PayloadTooLarge as e:
                self.progress.too_large(e.entries_hint)
                self._trouble(f"payload too large, now {self.entries_limit} entries per request")
            except (Unreachable, RemoteError) as e:
                self.progress.failed()
                self.problem = f"{type(e).__name__}: {e}"
                # Down, stopped (Fatal) or refusing us (token, cluster): back off.
                backoff = backoff or self.network.backoff()
                delay = next(backoff)
                self._trouble(f"{type(e).__name__}: {e}; retrying in {delay:.3f}s")
                await asyncio.sleep(delay)
            except RaftHttpError as e:  # Timeout, NetworkError, ...: the next try may work
                self.progress.failed()
                self.problem = f"{type(e).__name__}: {e}"
                self._trouble(f"{type(e).__name__}: {e}")
                await asyncio.sleep(heartbeat)
            else:
                backoff = None
                self.problem = None
                if self._problem is not None:
                    log.info("replication to node %s recovered", self.target)
                    self._problem = None

    def _trouble(self, problem: str) -> None:
        """Log a new kind of trouble once at WARNING; repeats of it only at DEBUG."""
        kind = problem.split(":", 1)[0]
        if self._problem != kind:
            log.warning("replication to node %s: %s", self.target, problem)
            self._problem = kind
        else:
            log.debug("replication to node %s: %s", self.target, problem)

    async def _send_once(self) -> None:
        raft = self.raft
        progress = self.progress
        if progress.needs_snapshot(raft.log.last_purged):
            await self._send_snapshot()
            return
        start, stop = progress.batch(raft.log.last_index)
        prev_index = start - 1
        prev_log_id = raft.log.log_id_at(prev_index)
        entries = raft.log.slice(start, stop)
        rpc = AppendEntriesRequest(self.vote, prev_log_id, entries, raft.committed)
        progress.sent(stop - 1)
        sent_at = asyncio.get_running_loop().time()
        option = RPCOption(hard_ttl=raft.config.append_timeout)
        response = await self.network.append_entries(rpc, option)
        if not raft.is_leader_of(self.vote):
            return
        match response:
            case Success():
                matched = entries[-1].log_id if entries else prev_log_id
                self._told(rpc.leader_commit, matched)
                self._matched(matched, sent_at)
            case PartialSuccess(matching=matching):
                self._told(rpc.leader_commit, matching)
                self._matched(matching, sent_at)
            case Conflict() if prev_log_id is None:
                # Every log holds the empty prefix: a peer saying otherwise is broken. Do
                # not spin on it; the heartbeat pace keeps asking.
                self._trouble("Conflict: the peer refuses even an empty prefix")
                await asyncio.sleep(raft.config.heartbeat_interval)
            case Conflict():
                progress.conflict(prev_index)
            case HigherVote(vote=vote):
                await raft.on_higher_vote(vote, f"append_entries to node {self.target}")

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
