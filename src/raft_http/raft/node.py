"""The Raft node: roles, elections, the log, commit and apply, membership and snapshots.

It talks to peers only through a ``RaftNetworkFactory`` and to disk only through a
``LogStore``, a ``SnapshotStore`` and the application's ``StateMachine``; it never
imports aiohttp. It implements ``RaftHandler``, so any transport's server can
hand it incoming RPCs.

Concurrency: one asyncio loop. ``_lock`` serialises every decision on the vote or the
log that awaits in its middle; the storage writes those decisions need run in order
on a ``LogWriter``, which groups appends into one fsync, and are awaited outside
``_lock`` where an answer depends on them. A decision with no await cannot interleave
with another: a follower's AppendEntries from the leader it follows, the common case,
is made in the caller's task without the lock when nothing holds it
(``_append_steady``). ``_sm_lock`` serialises the state machine (apply, snapshot capture,
snapshot install). Lock order: ``_lock`` before ``_sm_lock``.

Committed entries are applied from the in-memory log, also when this node's own copy
is not yet durable: an entry is committed only once a quorum holds it durably (every
node counts its own log, and answers ``Success``, only for entries flushed), so any
later leader holds it (Leader Completeness) and every node applies the same entry at
that index. After a crash the state machine is rebuilt from the snapshot and the
durable log: the committed id is clamped to the log, a snapshot past the log's end
replaces it, and the leader sends the lost tail again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, BinaryIO, Final, TypeVar

import msgspec

from ..errors import Fatal, InvalidRequest, RaftHttpError, SnapshotRejected
from ..network import RaftNetworkFactory, RPCOption
from ..types import (
    MAX_INDEX,
    MAX_TERM,
    AppendEntriesRequest,
    AppendEntriesResponse,
    Blank,
    Conflict,
    Entry,
    EntryPayload,
    HigherVote,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
    log_id_key,
    log_index,
)
from .config import Config
from .engine.commit import follower_commit_index, leader_commit_index
from .engine.election import (
    VoteCount,
    VoteVerdict,
    campaign_term,
    decide_vote,
    lease_holds,
    lost_quorum,
    refusal_effect,
)
from .engine.log import RaftLog, plan_append, prev_log_conflicts
from .engine.membership import (
    MembershipLog,
    plan_add_learner,
    plan_change,
    plan_remove_learners,
    voter_set,
)
from .engine.policy import purge_upto, snapshot_due
from .engine.quorum import quorum_acked_at
from .errors import (
    ForwardToLeader,
    LearnerNotCaughtUp,
    NodeRemoved,
    NotAllowed,
    Overloaded,
    QuorumNotEnough,
    TransferFailed,
)
from .heap import release_free_memory
from .log_writer import LogWriter
from .metrics import RaftMetrics, ServerState
from .replication import Replicator
from .responders import ClientWriteResponse, Responder, Responders
from .snapshot_store import SnapshotStore
from .storage import LogStore, StateMachine, StorageError
from .storage_calls import StorageCalls

log = logging.getLogger(__name__)

_RAW_JSON: Final = msgspec.json.Decoder(msgspec.Raw)
_APPLY_BATCH: Final = 1000
_COMMITTED_SAVE_INTERVAL: Final = 0.05
"""Seconds between two saves of the commit index (see ``_commit_save_loop``)."""
_T = TypeVar("_T")


class _LeaderState:
    """What only a leader has: a replication stream per target and the writes to propose."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.replicators: dict[int, Replicator] = {}
        self.pending: list[tuple[EntryPayload, Responder]] = []
        self.propose_event = asyncio.Event()
        self.appending = False
        """The proposer took a batch and has not yet put it in the in-memory log."""
        self.transfer_to: int | None = None
        """While set, leadership is being handed to this node: new writes wait."""
        self.held_bytes = 0
        """Application bytes proposed by this leader and not yet committed (back-pressure)."""
        self.uncommitted: collections.deque[tuple[int, int]] = collections.deque()
        """(index, bytes) of this leader's appended, uncommitted entries with data."""


class Raft:
    """A Raft node. Build it with ``await Raft.create(...)``; stop it with ``await shutdown()``."""

    def __init__(
        self,
        node_id: int,
        config: Config,
        network: RaftNetworkFactory,
        log_store: LogStore,
        state_machine: StateMachine,
        snapshot_store: SnapshotStore,
        rng: random.Random | None = None,
    ) -> None:
        self.id = node_id
        self.config = config
        self.network = network
        # A task is cancelled only between storage calls, and shutdown waits for the
        # calls running (see storage_calls.py).
        self.storage_calls = StorageCalls()
        self.log_store = self.storage_calls.guard(log_store)
        self.state_machine = self.storage_calls.guard(state_machine)
        self.snapshot_store = self.storage_calls.guard(snapshot_store)
        self._rng = rng
        """The source of election jitter and snapshot ids; None: the global ``random``."""

        self.log = RaftLog()
        self.committed: LogId | None = None
        self._vote = Vote(LeaderId(0, 0))
        self._last_applied: LogId | None = None
        self._snapshot: SnapshotMeta | None = None
        self._memberships = MembershipLog()
        self._state = ServerState.FOLLOWER
        self._leader_id: int | None = None
        self._leader: _LeaderState | None = None
        self._lease_until = 0.0
        self._leader_heard_at: float | None = None
        self._election_deadline = 0.0
        self._term_hint = 0
        self._fatal: str | None = None
        self._running = False
        self._snapshot_task: asyncio.Task[None] | None = None
        self._leader_rpcs = 0
        """AppendEntries / snapshots from the leader this node follows, being handled now."""
        self._appends_locked = 0
        """AppendEntries taking the locked path (``_handle_append_entries``), not yet done."""

        self._lock = asyncio.Lock()
        self._sm_lock = asyncio.Lock()
        self._membership_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        """Set, and replaced, at every change (``_notify``): what ``wait_for`` waits on."""
        self._server_changed = asyncio.Event()
        """Set, and replaced, only when a server fact changes (``wait_for_server``)."""
        self._server_facts_seen: tuple[Any, ...] = ()
        self._metrics_of_change: tuple[asyncio.Event, RaftMetrics] | None = None
        """``metrics()`` as computed after the change ``_changed`` stands for (see wait_for)."""
        self._commit_event = asyncio.Event()
        self._committed_unsaved = asyncio.Event()
        self._committed_saved: LogId | None = None
        self._responders = Responders(asyncio.get_running_loop())
        """Every client write not yet decided; the one place that decides each."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rpc_tasks: set[asyncio.Task[Any]] = set()
        """Incoming RPCs being handled: they run to their end, and shutdown waits for them."""
        self._stopped: asyncio.Task[None] | None = None
        """Set once the node stops (shutdown or fail): the task that drains what it started."""
        self._loop = asyncio.get_running_loop()
        self._writer = LogWriter(self.log_store, None, self._on_log_flushed, self.fail)
        self._writer_task: asyncio.Task[None] | None = None
        """Not cancelled on stop: ``_drain`` stops it once the snapshot build is done."""
        """Every write of the log and the vote, in order; appends grouped into one fsync."""

    # --- life cycle ------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        node_id: int,
        config: Config,
        network: RaftNetworkFactory,
        log_store: LogStore,
        state_machine: StateMachine,
        snapshot_store: SnapshotStore,
        rng: random.Random | None = None,
    ) -> Raft:
        """Load the durable state, rebuild the state machine, and start the node's timers.

        ``rng``: a seeded source of randomness, so that a simulation on virtual time
        replays the same run from the same seed.
        """
        raft = cls(node_id, config, network, log_store, state_machine, snapshot_store, rng)
        writer = raft._writer_task = raft._spawn(raft._writer.run(), "log-writer")
        try:
            await raft._load()
        except BaseException:
            await raft._writer.stop("the node did not start")
            writer.cancel()
            raise
        raft._running = True
        raft._reset_election_deadline()
        raft._spawn(raft._election_loop(), "election")
        raft._spawn(raft._apply_loop(), "apply")
        raft._spawn(raft._commit_save_loop(), "save-committed")
        raft._update_role()
        return raft

    async def _load(self) -> None:
        self._vote = await self.log_store.read_vote() or self._vote
        state = await self.log_store.get_log_state()
        first = log_index(state.last_purged_log_id) + 1
        entries = await self.log_store.read_entries(first, log_index(state.last_log_id) + 1)
        self.log = RaftLog(state.last_purged_log_id, entries)
        if self.log.last_log_id != state.last_log_id:
            raise StorageError(f"log store returned a gap: ends at {self.log.last_log_id}")
        self._writer.flushed = state.last_log_id
        self._snapshot = await self.snapshot_store.latest()
        snap_last = self._snapshot.last_log_id if self._snapshot else None
        if log_index(self.log.last_purged) > log_index(snap_last):
            raise StorageError(
                f"the log is purged up to {self.log.last_purged} but the newest valid snapshot"
                f" ends at {snap_last}: the state machine cannot be rebuilt; restore the data"
                " directory or wipe it to rejoin as a new node"
            )
        if self._snapshot is not None:
            snapshot = await self.snapshot_store.open_latest()
            assert snapshot is not None
            try:
                await self.state_machine.install_snapshot(snapshot.data)
            finally:
                await asyncio.to_thread(snapshot.data.close)
            self._memberships = MembershipLog(self._snapshot.last_membership)
            self._last_applied = snap_last
            assert snap_last is not None
            # A crash after a snapshot was saved but before the log was purged to it.
            await self._align_log_with_snapshot(snap_last, purge=False)
        base = log_index(self.membership.log_id)
        self._memberships.track(
            self.log.slice(max(self.log.first_index, base + 1), self.log.last_index + 1)
        )
        committed = self._committed_saved = await self.log_store.read_committed()
        if log_index(committed) > log_index(snap_last) and not self.log.matches(committed):
            # The log does not hold the saved id (earlier versions could save it ahead of
            # a pending truncate): what the log holds at that index may not be the
            # committed entry, so only the snapshot is known to be committed.
            log.warning(
                "node %s: the saved commit index %s is not in the log; starts from %s",
                self.id,
                committed,
                snap_last,
            )
            committed = None
        self.committed = max(committed, snap_last, key=log_id_key)
        await self._apply_committed()
        log.info(
            "node %s loaded: vote %s, log %s..%s, applied %s",
            self.id,
            self._vote,
            self.log.last_purged,
            self.log.last_log_id,
            self._last_applied,
        )

    async def shutdown(self) -> None:
        """Stop the node; return only once everything it started has ended.

        - New calls and incoming RPCs get ``Fatal("node shut down")``, and so does every
          client write not yet decided: one not yet in the log was not proposed, one in
          the log may still be committed by the other nodes.
        - RPC handlers in flight run to their end; those still waiting for the node get
          ``Fatal``. A snapshot being built is let finish. Every other task (timers,
          replication, elections, applying) is cancelled, and awaited.
        - Every storage call already started (log store, snapshot store, state machine)
          has returned, and no new one starts: the files are complete, and the storage's
          owner may close them.
        - After ``fail()`` (which stops the node at once), ``shutdown()`` still waits
          for all of the above.
        """
        self._stop("node shut down", keep_snapshot=True)
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    def fail(self, reason: str) -> None:
        """Stop the node after an error it must not continue past (storage, a bug).

        Every task is cancelled at once, a snapshot build included; ``shutdown()`` then
        waits until they and the storage calls they started have ended.
        """
        if self._fatal is None:
            log.error("node %s stops: %s", self.id, reason)
            self._fatal = reason
        self._stop(reason, keep_snapshot=False)
        for task in list(self._tasks):
            if task is not asyncio.current_task() and task is not self._writer_task:
                self.storage_calls.cancel(task)

    def _stop(self, reason: str, *, keep_snapshot: bool) -> None:
        """Stop taking work, refuse every undecided write, cancel tasks, start the drain."""
        if self._stopped is not None:
            return
        self._running = False
        self._responders.stop(reason)
        self._stop_leading(reason)
        self._state = ServerState.SHUTDOWN
        building = self._snapshot_task if keep_snapshot else None
        caller = asyncio.current_task()
        for task in list(self._tasks):
            if task not in (building, caller, self._writer_task):
                self.storage_calls.cancel(task)
        self._notify()
        self._stopped = self._loop.create_task(
            self._drain(reason, building, caller), name=f"raft-{self.id}-stop"
        )

    async def _drain(self, reason: str, building: asyncio.Task[None] | None, caller: Any) -> None:
        """Wait for the snapshot build (its purge goes through the log writer), stop the
        writer (the write in progress completes; what is queued fails), then wait for
        every task and RPC, then every storage call."""
        if building is not None:
            await asyncio.gather(building, return_exceptions=True)
        await self._writer.stop(reason)
        while True:
            tasks = [t for t in (*self._tasks, *self._rpc_tasks) if t is not caller]
            if not tasks:
                break
            for task in tasks:
                if task in self._tasks:
                    self.storage_calls.cancel(task)  # started while stopping (a vote request)
            await asyncio.wait(tasks)
        if self._fatal is None:  # a clean stop: the next start need not wait for a leader
            final = self._committed_to_save()
            if log_index(final) > log_index(self._committed_saved):
                with contextlib.suppress(StorageError, Fatal):
                    await self.log_store.save_committed(final)
        await self.storage_calls.drain("node is shut down")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._stopped is not None:
            coro.close()
            raise Fatal(self._fatal or "node is shut down")
        task = self._loop.create_task(coro, name=f"raft-{self.id}-{name}")
        self._track(task)
        return task

    def _track(self, task: asyncio.Task[Any]) -> None:
        """A task of the node's own: it stops the node if it crashes; shutdown ends it."""
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A background task that dies of an error stops the node: no zombie leader."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, Fatal):
            self.fail(f"{task.get_name()} crashed: {type(error).__name__}: {error}")

    def _check_running(self) -> None:
        if self._fatal is not None:
            raise Fatal(self._fatal)
        if not self._running:
            raise Fatal("node is shut down")

    # --- small helpers ------------------------------------------------------------------

    @property
    def membership(self) -> StoredMembership:
        """The effective membership: the last one in the log, committed or not."""
        return self._memberships.effective

    def current_vote(self) -> Vote:
        return self._vote

    def is_leader_of(self, vote: Vote) -> bool:
        return self._running and self._leader is not None and self._vote == vote

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        facts = self._server_facts()
        if facts != self._server_facts_seen:
            self._server_facts_seen = facts
            self._server_changed.set()
            self._server_changed = asyncio.Event()

    def _server_facts(self) -> tuple[Any, ...]:
        """What the metrics' server fields derive from (see ``wait_for_server``)."""
        return (
            self._vote,
            self._state,
            self._leader_id,
            self.membership,
            self._running,
            self._fatal,
        )

    def _reset_election_deadline(self) -> None:
        uniform = random.uniform if self._rng is None else self._rng.uniform
        timeout = uniform(self.config.election_timeout_min, self.config.election_timeout_max)
        self._election_deadline = self._loop.time() + timeout

    def _random_tag(self) -> str:
        """Eight hex digits that make a snapshot id unique."""
        return uuid.uuid4().hex[:8] if self._rng is None else f"{self._rng.getrandbits(32):08x}"

    def _update_role(self) -> None:
        if self._leader is not None or not self._running:
            return
        if self._state is ServerState.CANDIDATE:
            return
        if self._memberships.removed(self.id):
            self._state = ServerState.REMOVED
            return
        voter = self.membership.membership.is_voter(self.id)
        self._state = ServerState.FOLLOWER if voter else ServerState.LEARNER

    def _leader_node(self) -> Node | None:
        if self._leader_id is None:
            return None
        return self.membership.membership.nodes.get(self._leader_id)

    # --- metrics ------------------------------------------------------------------------

    def metrics(self) -> RaftMetrics:
        replication = None
        since_quorum_ack = None
        if self._leader is not None:
            replication = {t: r.matching for t, r in self._leader.replicators.items()}
            acked = max(self._quorum_acked_at(self._leader), self._leader.since)
            since_quorum_ack = round(max(0.0, self._loop.time() - acked), 3)
        state = self._state
        if (
            state in (ServerState.FOLLOWER, ServerState.LEARNER)
            and not self.membership.membership.nodes
            and self._leader_id is None
        ):
            state = ServerState.UNINITIALIZED  # no cluster, and no leader bringing one
        since_leader_heard = None
        if (
            self._leader is None
            and self._leader_id is not None
            and self._leader_heard_at is not None
            and self._state is not ServerState.REMOVED
        ):
            heard_at = self._loop.time() if self._leader_rpcs else self._leader_heard_at
            since_leader_heard = round(max(0.0, self._loop.time() - heard_at), 3)
        return RaftMetrics(
            id=self.id,
            state=state,
            current_term=self._vote.term,
            vote=self._vote,
            last_log_index=self.log.last_index,
            last_applied=self._last_applied,
            committed=self.committed,
            snapshot=self._snapshot.last_log_id if self._snapshot else None,
            purged=self.log.last_purged,
            current_leader=None if self._state is ServerState.REMOVED else self._leader_id,
            membership_config=self.membership,
            replication=replication,
            since_quorum_ack=since_quorum_ack,
            running=self._running,
            fatal=self._fatal,
            since_leader_heard=since_leader_heard,
            in_memory_log_bytes=self.log.held_bytes,
            in_memory_log_entries=self.log.held_entries,
        )

    async def wait_for(
        self, predicate: Callable[[RaftMetrics], bool], timeout: float, msg: str = ""
    ) -> RaftMetrics:
        """Wait until ``predicate(metrics)`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        return await self._wait_metrics(predicate, timeout, msg, server=False)

    async def wait_for_server(
        self, predicate: Callable[[RaftMetrics], bool], timeout: float, msg: str = ""
    ) -> RaftMetrics:
        """``wait_for`` for a predicate of the server fields only, woken only when they change.

        The server fields (Openraft's ``RaftServerMetrics``) are ``id``, ``state``,
        ``current_term``, ``vote``, ``current_leader``, ``membership_config``, ``running``
        and ``fatal``. ``wait_for`` re-checks its predicate after every change, several
        per write; a long-lived watcher of leadership or membership (an event log, a
        probe, a fatal-error watch) need not. A predicate that reads other fields is
        checked only when a server field changes, so it may see them late.
        """
        return await self._wait_metrics(predicate, timeout, msg, server=True)

    async def _wait_metrics(
        self, predicate: Callable[[RaftMetrics], bool], timeout: float, msg: str, *, server: bool
    ) -> RaftMetrics:
        try:
            async with asyncio.timeout(timeout):
                changed = self._server_changed if server else self._changed
                metrics = self.metrics()
                while True:
                    if predicate(metrics):
                        return metrics
                    if self._stopped is not None:  # its metrics change no more
                        self._check_running()
                    await changed.wait()
                    changed = self._server_changed if server else self._changed
                    metrics = self._metrics_after_change(self._changed)
        except TimeoutError:
            raise TimeoutError(
                f"node {self.id}: timed out after {timeout}s waiting for {msg or 'a condition'}"
            ) from None

    def _metrics_after_change(self, changed: asyncio.Event) -> RaftMetrics:
        """``metrics()``, computed once per change for all the waiters it wakes.

        A node has several long-lived waiters (the probes, the event log, the CLI's
        fatal watch) and changes several times per write: each recomputing the metrics
        after each change cost more than the change itself.
        """
        cached = self._metrics_of_change
        if cached is None or cached[0] is not changed:
            cached = self._metrics_of_change = (changed, self.metrics())
        return cached[1]

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._check_running()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # --- elections ----------------------------------------------------------------------

    async def _election_loop(self) -> None:
        while self._running:
            now = self._loop.time()
            if self._leader is not None:
                await self._check_quorum(self._leader, now)
                self._sync_replicators()  # stop those to removed nodes that became unreachable
                await asyncio.sleep(self.config.election_timeout_min)
                continue
            if not self.config.enable_elect:
                self._reset_election_deadline()
                await asyncio.sleep(self.config.election_timeout_min)
                continue
            if now < self._election_deadline:
                await asyncio.sleep(self._election_deadline - now)
                continue
            self._reset_election_deadline()
            if self._leader_rpcs:
                continue  # the leader's request is being handled (a slow fsync): it is alive
            if self._may_campaign():
                await self._elect()

    def _may_campaign(self) -> bool:
        """A voter of the latest membership, or of the committed one while a change is pending.

        A voter that an uncommitted change removes may still be needed to elect a leader
        until that change commits (Raft thesis, 4.2.2): in a joint config its old half may
        have no quorum without it.
        """
        if self.membership.membership.is_voter(self.id):
            return True
        committed = self._memberships.at(log_index(self.committed)).membership
        return committed.is_voter(self.id)

    def _quorum_acked_at(self, leader: _LeaderState) -> float:
        """The loop time up to which a quorum of every config has acknowledged this leader."""

        def acked_at(node_id: int) -> float:
            replicator = leader.replicators.get(node_id)
            return replicator.progress.acked_at if replicator else float("-inf")

        configs = self.membership.membership.configs
        return quorum_acked_at(configs, self.id, acked_at, self._loop.time())

    async def _check_quorum(self, leader: _LeaderState, now: float) -> None:
        """Step down after ``2 * election_timeout_max`` without a quorum's acknowledgement.

        A leader cut off in a minority would otherwise keep taking writes that cannot
        commit, and keep refusing votes, until the partition heals.
        """
        last_contact = max(self._quorum_acked_at(leader), leader.since)
        if not lost_quorum(now, last_contact, self.config.election_timeout_max):
            return
        async with self._lock:
            if self._leader is leader:
                silent = now - last_contact
                log.warning("node %s heard from no quorum for %.3fs; steps down", self.id, silent)
                self._stop_leading("lost contact with a quorum")
                self._notify()

    async def _elect(self, *, transfer: bool = False) -> None:
        """Campaign for the next term; a ``transfer`` (asked by the leader) skips pre-vote."""
        term = campaign_term(self._vote.term, self._term_hint)
        if term > MAX_TERM:
            # Only a peer that forged a huge term gets us here; campaigning would overflow.
            log.error(
                "node %s cannot campaign: term %s is past the greatest, %s", self.id, term, MAX_TERM
            )
            return
        candidate = Vote(LeaderId(term, self.id))
        heard = self._lease_until
        if not transfer and not await self._collect_votes(candidate, pre_vote=True):
            return
        async with self._lock:
            if self._leader is not None or self._vote.term >= term or not self._running:
                return
            if not transfer and self._lease_until > heard:
                # The leader's AppendEntries arrived during the pre-vote (a busy loop ran the
                # timer first): it is alive, so do not depose it.
                log.debug("node %s heard from its leader while pre-voting; stays", self.id)
                return
            await self._save_vote(candidate)
            self._state = ServerState.CANDIDATE
            self._leader_id = None
            self._reset_election_deadline()
            self._notify()
        why = " (leadership transfer)" if transfer else ""
        log.info("node %s starts election for term %s%s", self.id, term, why)
        granted = await self._collect_votes(candidate, pre_vote=False, transfer=transfer)
        async with self._lock:
            if not granted or self._vote != candidate or not self._running:
                if self._state is ServerState.CANDIDATE and self._vote != candidate:
                    self._state = ServerState.FOLLOWER
                    self._update_role()
                return
            await self._become_leader(candidate)

    async def _collect_votes(
        self, candidate: Vote, *, pre_vote: bool, transfer: bool = False
    ) -> bool:
        membership = self.membership.membership
        count = VoteCount(membership.configs, self.id)
        if count.won:
            return True
        rpc = VoteRequest(candidate, self.log.last_log_id, pre_vote=pre_vote, transfer=transfer)
        option = RPCOption(hard_ttl=self.config.election_timeout_max)
        voters = membership.voter_ids() - {self.id}

        async def ask(target: int) -> tuple[int, VoteResponse | None]:
            node = membership.nodes.get(target)
            if node is None:
                return target, None
            try:
                return target, await self.network.new_client(target, node).vote(rpc, option)
            except RaftHttpError as e:
                log.debug("vote request to %s failed: %s", target, e)
                return target, None

        pending = {self._loop.create_task(ask(t)) for t in voters}
        for task in pending:  # shutdown ends them too
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    target, response = task.result()
                    if response is None:
                        continue
                    if response.vote_granted:
                        if count.grant(target):
                            return True
                        continue
                    hint, step_down = refusal_effect(
                        candidate, response.vote, self._vote, pre_vote=pre_vote
                    )
                    if hint is not None:
                        self._term_hint = max(self._term_hint, hint)
                    if step_down:
                        await self.on_higher_vote(response.vote, f"vote from {target}")
                        return False
            return False
        finally:
            for task in pending:
                task.cancel()

    async def _become_leader(self, candidate: Vote) -> None:
        """Called with ``_lock`` held, after a quorum granted ``candidate``."""
        vote = candidate.committed_vote()
        await self._save_vote(vote)
        self._state = ServerState.LEADER
        self._leader_id = self.id
        leader = self._leader = _LeaderState(self._loop.time())
        log.info("node %s is leader of term %s", self.id, vote.term)
        self._sync_replicators()
        self._spawn(self._propose_loop(leader), "propose")
        # A blank entry of our own term lets earlier terms' entries commit.
        blank = self._responders.new()
        blank.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it
        leader.pending.insert(0, (Blank(), blank))
        leader.propose_event.set()
        self._notify()

    def _stop_leading(self, reason: str) -> None:
        leader, self._leader = self._leader, None
        if leader is None:
            return
        for replicator in leader.replicators.values():
            replicator.stop(reason)
        # The proposer is not cancelled: it may be between a durable append and the in-memory
        # one. Woken, it sees it no longer leads and ends.
        leader.propose_event.set()
        self._responders.leader_lost()
        leader.pending.clear()
        if self._state is ServerState.LEADER:
            self._state = ServerState.FOLLOWER
        self._leader_id = None
        self._update_role()

    async def on_higher_vote(self, vote: Vote, why: str) -> None:
        """A peer has a greater vote: adopt it and stop leading."""
        async with self._lock:
            if not vote > self._vote:
                return
            log.info("node %s sees higher vote %s (%s); steps down", self.id, vote, why)
            await self._save_vote(vote)
            self._stop_leading("higher vote")
            if self._state is ServerState.CANDIDATE:
                self._state = ServerState.FOLLOWER
            self._leader_id = vote.leader_id.node_id if vote.committed else None
            self._update_role()
            self._notify()

    async def _save_vote(self, vote: Vote) -> None:
        """Persist ``vote`` (after every log write queued before it), then adopt it.

        ``Fatal`` if storage failed: the writer has stopped the node.
        """
        await self._writer.save_vote(vote)
        self._vote = vote

    # --- RaftHandler: incoming RPCs ---------------------------------------------------

    # Each handler runs to completion even if its caller is cancelled (a server may cancel
    # a request whose client went away): stopping between a durable write and the matching
    # in-memory update would leave the two disagreeing.

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        self._check_running()
        return await self._uncancellable(self._handle_vote(rpc))

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        self._check_running()
        if self._steady(rpc.vote):
            return await self._append_steady(rpc)
        self._appends_locked += 1
        try:
            return await self._uncancellable(
                self._hearing_leader(rpc.vote, self._handle_append_entries(rpc))
            )
        finally:
            self._appends_locked -= 1

    def _steady(self, vote: Vote) -> bool:
        """The common case: from the leader this node follows, with nothing else deciding.

        Then the decision needs no await (no vote to save), so it is made at once in the
        caller's task: no task, no lock. Not while another AppendEntries waits for the
        lock, which would let this one overtake it.
        """
        return (
            vote == self._vote
            and vote.committed
            and self._leader is None
            and self._stopped is None
            and not self._appends_locked
            and not self._lock.locked()
        )

    async def _append_steady(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        """``_handle_append_entries`` without the lock or a task: see ``_steady``.

        Cancelling the caller cancels only its wait: the decision is already made and
        the write queued. Shutdown waits for the writer, so this call has its answer, or
        ``Fatal`` for a write the writer dropped, before shutdown returns.
        """
        if (malformed := rpc.shape_error()) is not None:
            raise InvalidRequest(malformed)
        self._follow(rpc.vote)
        decided = self._decide_append(rpc)
        if not isinstance(decided, asyncio.Future):
            return decided
        self._leader_rpcs += 1
        try:
            await asyncio.shield(decided)  # shared by every request the write covers
        finally:
            self._leader_rpcs -= 1
            self._heard_leader(rpc.vote)
        return Success()

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        """``snapshot.data`` stays the caller's: this returns, even when cancelled, only
        once nothing reads it any more (the caller then closes or deletes it)."""
        self._check_running()
        return await self._uncancellable(
            self._hearing_leader(vote, self._handle_install_snapshot(vote, snapshot)),
            wait_when_cancelled=True,
        )

    async def _hearing_leader(self, vote: Vote, work: Coroutine[Any, Any, _T]) -> _T:
        """Run an RPC; if it comes from the leader we follow, that leader counts as heard
        from while it runs and when it ends, not only when it arrived.

        The leader keeps one request in flight per follower: when a follower's fsync (or
        a snapshot install) takes longer than an election timeout, it would otherwise
        campaign, and grant votes past its lease, while handling its live leader's
        request. Under load that alone caused elections (issue #9, item 8).
        """
        if vote != self._vote or not vote.committed:
            return await work
        self._leader_rpcs += 1
        try:
            return await work
        finally:
            self._leader_rpcs -= 1
            self._heard_leader(vote)

    def _heard_leader(self, vote: Vote) -> None:
        if self._vote == vote and self._leader is None:
            self._leader_heard_at = self._loop.time()
            self._lease_until = self._leader_heard_at + self.config.election_timeout_min
            self._reset_election_deadline()

    async def handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        """The leader hands over: once the log holds ``rpc.last_log_id``, campaign at once."""
        self._check_running()
        await self._uncancellable(self._handle_transfer_leader(rpc))

    async def _handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        self._check_running()
        if rpc.to_node_id != self.id:
            raise NotAllowed(f"this is node {self.id}, not node {rpc.to_node_id}")
        if rpc.from_leader.leader_id != self._vote.leader_id or not self._vote.committed:
            raise NotAllowed(
                f"node {self.id} follows {self._vote}, not the sender's {rpc.from_leader}"
            )
        if not self.membership.membership.is_voter(self.id):
            raise NotAllowed(f"node {self.id} is not a voter")
        last = rpc.last_log_id
        if not await self._wait_until(
            lambda: self.log.matches(last) or log_index(self.log.last_purged) > log_index(last),
            self.config.election_timeout_max,
        ):
            raise NotAllowed(f"node {self.id}'s log does not hold {last}")
        if self._vote.leader_id != rpc.from_leader.leader_id:
            return  # another election already moved on
        self._spawn(self._elect(transfer=True), "transfer-election")

    async def _uncancellable(
        self, coro: Coroutine[Any, Any, _T], *, wait_when_cancelled: bool = False
    ) -> _T:
        """Run an incoming RPC in a task of its own that shutdown waits for.

        A cancelled caller gets ``CancelledError`` at once, or, ``wait_when_cancelled``,
        once the task has ended (it uses something the caller owns).
        """
        if self._stopped is not None:
            coro.close()
            raise Fatal(self._fatal or "node is shut down")
        task = self._loop.create_task(coro)
        self._rpc_tasks.add(task)
        task.add_done_callback(self._rpc_done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while wait_when_cancelled and not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
            raise

    def _rpc_done(self, task: asyncio.Task[Any]) -> None:
        self._rpc_tasks.discard(task)
        if not task.cancelled():
            task.exception()  # its caller may be gone: the error is not "never retrieved"

    async def _handle_vote(self, rpc: VoteRequest) -> VoteResponse:
        self._check_running()
        async with self._lock:
            self._check_running()
            now = self._loop.time()
            mine = self._vote
            last = self.log.last_log_id

            def answer(granted: bool) -> VoteResponse:
                return VoteResponse(self._vote, granted, last)

            leased = lease_holds(
                leading=self._leader is not None,
                vote=mine,
                now=now,
                lease_until=math.inf if self._leader_rpcs else self._lease_until,
            )
            verdict = decide_vote(rpc, mine=mine, last_log_id=last, leased=leased)
            if verdict is VoteVerdict.REFUSE:
                return answer(False)
            if rpc.pre_vote:
                return answer(True)
            if verdict is VoteVerdict.GRANT_AND_SAVE:
                await self._save_vote(rpc.vote)
                self._stop_leading("granted a vote")
                self._state = ServerState.FOLLOWER
                self._leader_id = None
                self._update_role()
                self._notify()
            self._reset_election_deadline()
            return answer(True)

    async def _handle_append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        """Decide under ``_lock``; answer ``Success`` once the log it vouches for is durable.

        The wait is outside the lock, so the next request of a pipelined stream is decided
        while this one's write is in progress, and the two are written in one fsync.
        """
        self._check_running()
        async with self._lock:
            self._check_running()
            if (malformed := rpc.shape_error()) is not None:
                raise InvalidRequest(malformed)
            if not await self._accept_leader(rpc.vote):
                return HigherVote(self._vote)
            decided = self._decide_append(rpc)
        if not isinstance(decided, asyncio.Future):
            return decided
        await decided
        return Success()

    def _decide_append(
        self, rpc: AppendEntriesRequest
    ) -> AppendEntriesResponse | asyncio.Future[None]:
        """Reconcile the log with the leader's (no await: nothing can interleave).

        Returns the answer, or the future to await before answering ``Success``: the
        whole log up to the request's last entry durable, so the leader may count it.
        """
        prev = rpc.prev_log_id
        if prev_log_conflicts(self.log, prev):
            return Conflict()
        self._append_from_leader(rpc.entries)
        last_matching = rpc.entries[-1].log_id if rpc.entries else prev
        upto = follower_commit_index(rpc.leader_commit, last_matching, log_index(self.committed))
        if upto is not None:
            self.committed = self.log.log_id_at(upto)
            self._commit_event.set()
        self._notify()
        return self._writer.sync()

    async def _accept_leader(self, vote: Vote) -> bool:
        """With ``_lock`` held: follow the sender of ``vote`` unless ours is greater."""
        if not vote >= self._vote:
            return False
        if vote != self._vote:
            await self._save_vote(vote)
        if self._leader is not None and vote.leader_id.node_id != self.id:
            self._stop_leading("another leader")
        self._follow(vote)
        return True

    def _follow(self, vote: Vote) -> None:
        """Follow the sender of ``vote``, already this node's vote (saved or being saved)."""
        if self._state is ServerState.CANDIDATE:
            self._state = ServerState.FOLLOWER
        self._leader_id = vote.leader_id.node_id
        self._leader_heard_at = self._loop.time()
        self._lease_until = self._leader_heard_at + self.config.election_timeout_min
        self._reset_election_deadline()
        self._update_role()

    def _append_from_leader(self, entries: list[Entry]) -> None:
        """Skip what we hold, truncate at the first conflict, append the rest (queued writes)."""
        conflict, new = plan_append(self.log, entries)
        if conflict is not None:
            if conflict <= log_index(self.committed):
                # No honest leader does this (Leader Completeness): refuse, keep running.
                log.error(
                    "node %s refused an append that replaces committed entry %s with %s",
                    self.id,
                    self.log.log_id_at(conflict),
                    new[0].log_id,
                )
                raise InvalidRequest(
                    f"entry {new[0].log_id} would replace committed entry"
                    f" {self.log.log_id_at(conflict)}"
                )
            self.log.truncate(conflict)
            self._writer.truncate(conflict, self.log.last_log_id)
            self._memberships.forget_since(conflict)
            # Waiters for the removed entries stay: another node may still hold such an entry
            # and commit it as a later leader. Their fate is known when the index is applied.
        if not new:
            return
        self._writer.append(new, inline=True)  # our answer to the leader waits on it
        self.log.append(new)
        self._memberships.track(new)
        self._update_role()

    async def _handle_install_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        self._check_running()
        async with self._lock:
            self._check_running()
            if not await self._accept_leader(vote):
                return SnapshotResponse(self._vote)
            meta = snapshot.meta
            if log_id_key(meta.last_log_id) <= log_id_key(self.committed):
                return SnapshotResponse(self._vote)
            # _sm_lock: no snapshot build of our own may start while this one lands.
            async with self._sm_lock:
                self._check_running()
                # The state machine first: data it refuses must change nothing, neither
                # the snapshot files (a restart would load them) nor the log.
                await self._install_state_machine(meta, snapshot.data)
                try:
                    await self.snapshot_store.save_from(meta, snapshot.data)
                    await self._adopt_snapshot(meta)
                except StorageError as e:
                    self.fail(f"installing snapshot {meta.snapshot_id} failed: {e}")
                    raise Fatal(str(e)) from e
            self._notify()
            return SnapshotResponse(self._vote)

    async def _install_state_machine(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """With both locks held: load ``data`` into the state machine, or change nothing."""
        try:
            if data.seekable():
                data.seek(0)  # a cheap lseek: the reader may have left it anywhere
            await self.state_machine.install_snapshot(data)
        except Exception as exc:
            log.warning(
                "node %s: the state machine refused snapshot %s: %r", self.id, meta.snapshot_id, exc
            )
            raise SnapshotRejected(
                f"snapshot {meta.snapshot_id!r}: the state machine refused its data: {exc}"
            ) from exc

    async def _adopt_snapshot(self, meta: SnapshotMeta) -> None:
        """With both locks held, the state machine installed and ``meta`` saved: follow it."""
        last = meta.last_log_id
        assert last is not None
        if await self.snapshot_store.latest() != meta:
            raise StorageError(f"snapshot {meta.snapshot_id} not found after saving it")
        await self._align_log_with_snapshot(
            last, purge=True, why=f"installing snapshot {meta.snapshot_id}"
        )
        self._responders.snapshot_installed(last)
        self._memberships.rebase(meta.last_membership, last.index)
        self.committed = last
        self._last_applied = last
        self._snapshot = meta
        await self.log_store.save_committed(last)
        self._committed_saved = last
        self._update_role()
        log.info("node %s installed snapshot %s up to %s", self.id, meta.snapshot_id, last)

    async def _align_log_with_snapshot(self, last: LogId, *, purge: bool, why: str = "") -> None:
        """Drop a log tail that does not follow ``last``; with ``purge``, drop what it covers.

        After this the log holds ``last`` (as an entry or as the last purged id), so a
        leader's next AppendEntries, whose prev_log_id is ``last``, matches.
        """
        if not self.log.matches(last):
            self.log.truncate(last.index + 1)
            self._writer.truncate(last.index + 1, self.log.last_log_id)
            self._memberships.forget_since(last.index + 1)
            purge = True
        if purge:
            self._writer.purge(last, why)
            self.log.purge(last)
        await self._writer.sync()

    # --- leader: proposing, replicating, committing --------------------------------------

    def _sync_replicators(self) -> None:
        leader = self._leader
        if leader is None:
            return
        nodes = self.membership.membership.nodes
        # A node the effective membership removes keeps its stream until that membership
        # is committed and the node was told so (or cannot be reached): it then knows it
        # was removed and stops campaigning (it campaigns while its removal may still be
        # uncommitted, see _may_campaign), and the leader does not retry it forever.
        removal = log_index(self.membership.log_id)
        removal_committed = removal <= log_index(self.committed)
        for target, replicator in list(leader.replicators.items()):
            if target in nodes or not removal_committed:
                continue
            if replicator.told_committed >= removal or replicator.failing:
                leader.replicators.pop(target).stop("removed from membership")
        for target, node in nodes.items():
            if target != self.id and target not in leader.replicators:
                network = self.network.new_client(target, node)
                replicator = Replicator(self, self._vote, target, node, network)
                leader.replicators[target] = replicator
                self._tasks.add(replicator.task)
                replicator.task.add_done_callback(self._task_done)

    async def _propose_loop(self, leader: _LeaderState) -> None:
        while self._leader is leader:
            await leader.propose_event.wait()
            leader.propose_event.clear()
            async with self._lock:
                if self._leader is not leader or not leader.pending:
                    continue
                batch, leader.pending = leader.pending, []
                leader.appending = True
                try:
                    self._append_as_leader(batch)
                finally:
                    leader.appending = False
                    del batch  # do not pin the last batch's data while waiting for the next
                    self._notify()

    def _append_as_leader(self, batch: list[tuple[EntryPayload, Responder]]) -> None:
        leader_id = self._vote.leader_id
        first = self.log.last_index + 1
        if first + len(batch) - 1 > MAX_INDEX:
            self._responders.log_full([future for _, future in batch], MAX_INDEX)
            return
        entries = [Entry(LogId(leader_id, first + i), p) for i, (p, _) in enumerate(batch)]
        # In memory and on the wire first, then on our own disk: followers write in parallel
        # with us. The write is queued at once, so it precedes every later store operation
        # (a purge after a snapshot of these entries included); the leader counts itself
        # toward a quorum once it is flushed (``_self_matched``; etcd does the same).
        self._writer.append(entries)
        self.log.append(entries)
        if self._leader is not None:
            uncommitted = self._leader.uncommitted
            for entry in entries:
                if isinstance(entry.payload, Normal):
                    uncommitted.append((entry.log_id.index, len(entry.payload.data)))
        for entry, (_, future) in zip(entries, batch, strict=True):
            self._responders.in_log(entry.log_id, future)
        if self._memberships.track(entries):
            self._sync_replicators()
        leader = self._leader
        if leader is not None:
            for replicator in leader.replicators.values():
                replicator.wake.set()
        self._notify()

    def _on_log_flushed(self) -> None:
        """The writer made more of the log durable: as leader, this node's own vote grew.

        What is durable (and applied) may now leave memory (``_evict_applied``).
        """
        self.log.mark_durable(self._self_matched())
        self._evict_applied()
        if self._leader is not None:
            self._update_commit()
            self._notify()

    def _self_matched(self) -> int:
        """How far this node's durable log agrees with its in-memory log (-1: not at all).

        The durable log is the in-memory log as it was some writes ago. Where both hold
        the same log id, they agree on everything before it too (Log Matching); where a
        truncate is still queued, they may not, and the node does not count itself.
        """
        flushed = self._writer.flushed
        return log_index(flushed) if flushed is not None and self.log.matches(flushed) else -1

    def on_replicated(self, replicator: Replicator) -> None:
        """A target acknowledged entries or a heartbeat: maybe commit, wake read-index waiters."""
        self._update_commit()
        self._notify()

    def _update_commit(self) -> None:
        leader = self._leader
        if leader is None:
            return

        def matched(node_id: int) -> int:
            if node_id == self.id:
                return self._self_matched()
            replicator = leader.replicators.get(node_id)
            return log_index(replicator.progress.matching) if replicator else -1

        def term_at(index: int) -> int:
            log_id = self.log.log_id_at(index)
            return -1 if log_id is None else log_id.term

        index = leader_commit_index(
            self.membership.membership.configs,
            matched,
            term_at,
            self._vote.term,
            log_index(self.committed),
        )
        if index is not None:
            self.committed = self.log.log_id_at(index)
            self._commit_event.set()
            if leader.replicators.keys() - self.membership.membership.nodes.keys():
                self._sync_replicators()
            uncommitted = leader.uncommitted
            while uncommitted and uncommitted[0][0] <= index:
                leader.held_bytes -= uncommitted.popleft()[1]

    # --- applying committed entries -----------------------------------------------------

    async def _apply_loop(self) -> None:
        while self._running:
            await self._commit_event.wait()
            self._commit_event.clear()
            await self._apply_committed()
            committed = self.committed
            if self._leader is not None and not self._memberships.at(
                log_index(committed)
            ).membership.is_voter(self.id):
                async with self._lock:
                    log.info("node %s is no longer a voter; steps down", self.id)
                    self._stop_leading("removed from the voters")
                    self._notify()
            self._committed_unsaved.set()

    async def _commit_save_loop(self) -> None:
        """Save the commit index, at most every ``_COMMITTED_SAVE_INTERVAL``.

        It only spares a restart the wait for a leader to say what is committed, so it
        need not follow every apply: saved after each one, it cost a storage call per
        applied batch, queued on the store's thread ahead of the next log append.
        What is saved is also held by this node's durable log (``_committed_to_save``).
        """
        while self._running:
            await self._committed_unsaved.wait()
            self._committed_unsaved.clear()
            committed = self._committed_to_save()
            if log_index(committed) <= log_index(self._committed_saved):
                continue
            with contextlib.suppress(StorageError):
                await self.log_store.save_committed(committed)
                self._committed_saved = committed
            await asyncio.sleep(_COMMITTED_SAVE_INTERVAL)
            self._committed_unsaved.set()  # whatever was applied meanwhile

    def _committed_to_save(self) -> LogId | None:
        """The commit index, but no further than this node's own durable log agrees with
        its log: after a crash the saved id must name the entry the disk holds there (a
        committed entry replaced in memory may still be the old one on disk while the
        truncate is queued)."""
        upto = min(log_index(self.committed), self._self_matched())
        try:
            return self.log.log_id_at(upto)
        except KeyError:  # purged past it meanwhile: the snapshot covers it
            return self._committed_saved

    async def _apply_committed(self) -> None:
        async with self._sm_lock:
            while log_index(self._last_applied) < log_index(self.committed):
                start = log_index(self._last_applied) + 1
                stop = min(log_index(self.committed) + 1, start + _APPLY_BATCH)
                entries = self.log.slice(start, stop)
                responses = await self.state_machine.apply(entries)
                self._last_applied = entries[-1].log_id
                for entry, response in zip(entries, responses, strict=True):
                    self._responders.applied(entry.log_id, response)
                self._evict_applied()
                self._notify()
            due = snapshot_due(
                log_index(self._last_applied),
                log_index(self._snapshot_last()),
                self.config.snapshot_logs_since_last,
            )
            if due and not self._building_snapshot() and self._stopped is None:
                self._begin_snapshot()

    def _evict_applied(self) -> None:
        """Keep at most ``max_in_memory_log_bytes`` of applied, durable entries in memory."""
        self.log.evict(log_index(self._last_applied), self.config.max_in_memory_log_bytes)

    def _building_snapshot(self) -> bool:
        return self._snapshot_task is not None and not self._snapshot_task.done()

    def _snapshot_last(self) -> LogId | None:
        return self._snapshot.last_log_id if self._snapshot else None

    # --- snapshots ------------------------------------------------------------------------

    def _begin_snapshot(self) -> None:
        """With ``_sm_lock`` held: capture the state now, write and purge in the background."""
        last = self._last_applied
        assert last is not None
        meta = SnapshotMeta(
            last_log_id=last,
            last_membership=self._memberships.at(last.index),
            snapshot_id=f"{last.leader_id.term}-{last.leader_id.node_id}-{last.index}-"
            f"{self._random_tag()}",
        )
        writer = self.state_machine.begin_snapshot()
        self._snapshot_task = self._spawn(self._finish_snapshot(meta, writer), "snapshot")

    async def _finish_snapshot(
        self, meta: SnapshotMeta, writer: Callable[[BinaryIO], None]
    ) -> None:
        try:
            await self.snapshot_store.save(meta, writer)
            last = meta.last_log_id
            assert last is not None
            purged: asyncio.Future[None] | None = None
            async with self._lock:
                if log_index(last) > log_index(self._snapshot_last()):
                    self._snapshot = meta
                keep = self.config.max_in_snapshot_log_to_keep
                upto = purge_upto(last.index, keep, log_index(self.log.last_purged))
                if upto is not None:
                    purge_id = self.log.log_id_at(upto)
                    assert purge_id is not None
                    purged = self._writer.purge(purge_id)  # after every append queued before
                    self.log.purge(purge_id)
                    self._memberships.compact(upto)
            if purged is not None:
                await purged
                # Memory was just freed in bulk: hand it back to the OS.
                await asyncio.to_thread(release_free_memory)
            log.info("node %s built snapshot %s", self.id, meta.snapshot_id)
            self._notify()
        finally:
            self._commit_event.set()  # the apply loop checks whether another one is due

    async def trigger_snapshot(self) -> None:
        """Build a snapshot of what is applied now (Openraft's ``trigger().snapshot()``)."""
        self._check_running()
        async with self._sm_lock:
            if self._last_applied is None or self._building_snapshot():
                return
            self._begin_snapshot()

    # --- client API -----------------------------------------------------------------------

    def _require_leader(self) -> _LeaderState:
        self._check_running()
        if self._leader is None:
            if self._state is ServerState.REMOVED:
                raise NodeRemoved(self.id)
            raise ForwardToLeader(self._leader_id, self._leader_node())
        return self._leader

    async def client_write(self, data: bytes) -> ClientWriteResponse:
        """Propose one application command (JSON); return once it is committed and applied."""
        try:
            raw = _RAW_JSON.decode(data)
        except msgspec.DecodeError as e:
            raise ValueError(f"a command must be one JSON value: {e}") from e
        return await self._propose(Normal(raw), bounded=True)

    async def _propose(self, payload: EntryPayload, bounded: bool = False) -> ClientWriteResponse:
        """Queue ``payload`` for the proposer; ``bounded`` writes obey the back-pressure limits."""
        leader = self._require_leader()
        while leader.transfer_to is not None:
            leader = await self._wait_transfer(leader)
        size = len(payload.data) if isinstance(payload, Normal) else 0
        if bounded:
            self._check_room(leader, size)
        future = self._responders.new()
        leader.pending.append((payload, future))
        leader.held_bytes += size
        leader.propose_event.set()
        return await future

    def _check_room(self, leader: _LeaderState, size: int) -> None:
        """Refuse a write the leader has no room for (``Overloaded``), before proposing it."""
        entries = self.log.last_index - log_index(self.committed) + len(leader.pending)
        config = self.config
        if entries >= config.max_uncommitted_entries:
            raise Overloaded(
                f"{entries} entries are not committed yet (limit"
                f" {config.max_uncommitted_entries}); retry shortly"
            )
        if leader.held_bytes and leader.held_bytes + size > config.max_uncommitted_bytes:
            raise Overloaded(
                f"{leader.held_bytes} bytes are not committed yet (limit"
                f" {config.max_uncommitted_bytes}); retry shortly"
            )

    async def _wait_transfer(self, leader: _LeaderState) -> _LeaderState:
        """Hold a write while leadership is handed over; then lead on, or name the new leader."""
        timeout = self.config.transfer_leader_timeout * 2  # the transfer itself is bounded
        await self._wait_until(
            lambda: self._leader is not leader or leader.transfer_to is None, timeout
        )
        if self._leader is leader and leader.transfer_to is None:
            return leader
        # Wait for the new leader's first AppendEntries, so the write can be sent there.
        await self._wait_until(
            lambda: self._leader_id is not None, self.config.election_timeout_max
        )
        return self._require_leader()

    async def transfer_leader(self, to: int | None = None, timeout: float | None = None) -> int:
        """Hand leadership to voter ``to`` (None: the most up-to-date one); return the new leader.

        New writes wait meanwhile (then go on here, or get ``ForwardToLeader`` naming the
        new leader). The target is brought up to date, told to campaign at once, and its
        vote request is marked as a transfer so that voters grant it despite the leader
        lease: no election timeout passes. ``TransferFailed`` after ``timeout`` (default
        ``Config.transfer_leader_timeout``); if this node still leads, it takes writes again.
        """
        leader = self._require_leader()
        if leader.transfer_to is not None:
            raise NotAllowed(f"a leadership transfer to node {leader.transfer_to} is under way")
        target = self._transfer_target(leader, to)
        if target == self.id:
            return self.id
        limit = self.config.transfer_leader_timeout if timeout is None else timeout
        leader.transfer_to = target
        log.info("node %s transfers leadership to node %s", self.id, target)
        try:
            async with asyncio.timeout(limit):
                await self._transfer(leader, target, limit)
        except TimeoutError:
            still = self._leader is leader
            log.warning(
                "node %s: transfer of leadership to node %s timed out after %gs%s",
                self.id,
                target,
                limit,
                "; leads on" if still else "",
            )
            raise TransferFailed(
                f"node {target} did not take over within {limit:g}s"
                + ("; this node leads on" if still else "")
            ) from None
        finally:
            if self._leader is leader:
                leader.transfer_to = None
                leader.propose_event.set()
            self._notify()
        new_leader = self._leader_id
        assert new_leader is not None
        log.info("node %s handed leadership to node %s", self.id, new_leader)
        return new_leader

    def _transfer_target(self, leader: _LeaderState, to: int | None) -> int:
        voters = self.membership.membership.voter_ids()
        if to is not None:
            if to not in voters:
                raise NotAllowed(f"node {to} is not a voter; leadership goes only to a voter")
            return to
        candidates = [t for t in voters if t != self.id and t in leader.replicators]
        if not candidates:
            raise NotAllowed("there is no other voter to hand leadership to")

        def up_to_date(target: int) -> tuple[int, float]:
            replicator = leader.replicators[target]
            return log_index(replicator.progress.matching), replicator.progress.acked_at

        return max(candidates, key=up_to_date)

    async def _transfer(self, leader: _LeaderState, target: int, limit: float) -> None:
        """Catch ``target`` up, tell it to campaign, and wait until a new leader is known."""
        replicator = leader.replicators[target]

        def caught_up() -> bool:
            if self._leader is not leader:
                raise TransferFailed("this node stopped leading before the target caught up")
            # Nothing waits to be appended, and the target holds the whole log.
            idle = not leader.pending and not leader.appending
            return idle and log_index(replicator.matching) >= self.log.last_index

        replicator.wake.set()
        if not await self._wait_until(caught_up, limit):
            raise TimeoutError
        rpc = TransferLeaderRequest(self._vote, target, self.log.last_log_id)
        option = RPCOption(hard_ttl=limit)
        try:
            await replicator.network.transfer_leader(rpc, option)
        except RaftHttpError as e:
            raise TransferFailed(f"node {target} did not take the transfer: {e}") from e
        if not await self._wait_until(
            lambda: self._leader is not leader and self._leader_id not in (None, self.id), limit
        ):
            raise TimeoutError

    async def initialize(self, nodes: dict[int, Node]) -> None:
        """Make this node's log start with ``nodes`` as the voters; only on a pristine node."""
        self._check_running()
        if self.id not in nodes:
            raise NotAllowed(f"node {self.id} must be one of the initial members {sorted(nodes)}")
        async with self._lock:
            if self.log.last_log_id is not None or self._vote.term != 0:
                raise NotAllowed(f"node {self.id} is already initialized")
            membership = Membership([sorted(nodes)], dict(nodes))
            entry = Entry(LogId(LeaderId(0, 0), 0), MembershipChange(membership))
            await self._writer.append([entry])
            self.log.append([entry])
            self.log.mark_durable(entry.log_id.index)
            self._memberships.track([entry])
            self._update_role()
            self._election_deadline = self._loop.time()  # elect now, not after a timeout
            self._notify()
        log.info("node %s initialized with %s", self.id, sorted(nodes))

    async def ensure_linearizable(self) -> LogId | None:
        """Confirm leadership with a quorum and wait until the read index is applied.

        A read served after this returns sees every write acknowledged before it began.
        """
        leader = self._require_leader()
        deadline = self.config.election_timeout_max * 4
        term = self._vote.term
        if not await self._wait_until(
            lambda: self.committed is not None and self.committed.term == term, deadline
        ):
            raise QuorumNotEnough("the leader's first entry did not commit in time")
        read_index = self.committed
        started = self._loop.time()
        for replicator in leader.replicators.values():
            replicator.wake.set()

        def confirmed() -> bool:
            if self._leader is not leader:
                raise ForwardToLeader(self._leader_id, self._leader_node())
            return self._quorum_acked_at(leader) >= started

        if not await self._wait_until(confirmed, deadline):
            raise QuorumNotEnough("a quorum did not confirm the leader in time")
        if not await self._wait_until(
            lambda: log_index(self._last_applied) >= log_index(read_index), deadline
        ):
            raise QuorumNotEnough("the read index was not applied in time")
        return read_index

    async def add_learner(
        self, node_id: int, node: Node, blocking: bool = True, timeout: float = 60.0
    ) -> ClientWriteResponse:
        """Add a non-voting member; with ``blocking``, return once it has caught up.

        If it has not caught up within ``timeout`` seconds, ``LearnerNotCaughtUp`` says
        so, and whether it is unreachable: it is a member all the same (the leader keeps
        replicating to it) until ``remove_learner`` takes it out.
        """
        self._require_leader()
        async with self._membership_lock:
            await self._wait_membership_committed()
            current = self.membership
            membership = plan_add_learner(current.membership, node_id, node)
            if membership is None:
                assert current.log_id is not None
                response = ClientWriteResponse(current.log_id)
            else:
                response = await self._propose(MembershipChange(membership))
        if blocking:
            target = response.log_id.index
            try:
                await self.wait_for(
                    lambda m: (
                        m.replication is None or log_index(m.replication.get(node_id)) >= target
                    ),
                    timeout,
                    f"learner {node_id} to catch up",
                )
            except TimeoutError:
                leader = self._require_leader()
                replicator = leader.replicators.get(node_id)
                matched = replicator.matching if replicator else None
                problem = replicator.problem if replicator else None
                raise LearnerNotCaughtUp(
                    node_id, response.log_id, matched, problem, timeout
                ) from None
            self._require_leader()
        return response

    async def remove_learner(self, node_ids: Iterable[int]) -> ClientWriteResponse:
        """Take learners out of the membership (Openraft's ``ChangeMembers::RemoveNodes``).

        Voters cannot be removed this way (``NotAllowed``): ``change_membership`` without
        them first. Ids that are not members are ignored; with none left, nothing is
        proposed and the current membership's log id is returned.
        """
        ids = set(node_ids)
        self._require_leader()
        async with self._membership_lock:
            await self._wait_membership_committed()
            current = self.membership
            membership = plan_remove_learners(current.membership, ids)
            if membership is None:
                assert current.log_id is not None
                return ClientWriteResponse(current.log_id)
            return await self._propose(MembershipChange(membership))

    async def change_membership(
        self, voters: Iterable[int], retain: bool = False
    ) -> ClientWriteResponse:
        """Make ``voters`` the voters via a joint config (see ``engine.membership.plan_change``).

        Learners stay learners. A voter not in ``voters`` leaves the membership, unless
        ``retain``: then it stays on as a learner (``remove_learner`` removes it later).
        """
        new_voters = voter_set(voters)
        self._require_leader()
        async with self._membership_lock:
            await self._wait_membership_committed()
            *steps, final = plan_change(self.membership.membership, new_voters, retain=retain)
            for step in steps:
                await self._propose(MembershipChange(step))
            return await self._propose(MembershipChange(final))

    async def _wait_membership_committed(self) -> None:
        def committed() -> bool:
            self._require_leader()
            return log_index(self.membership.log_id) <= log_index(self.committed)

        if not await self._wait_until(committed, self.config.election_timeout_max * 10):
            raise QuorumNotEnough("the current membership did not commit in time")
