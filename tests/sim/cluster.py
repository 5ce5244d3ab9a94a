"""A deterministic simulation of a Raft cluster: real ``Raft`` nodes on virtual time.

One seed fixes everything: network delays and faults, fsync latencies, crashes,
the nemesis schedule, the clients' operations and each node's election jitter.
Everything runs in one thread on ``VirtualTimeLoop``, so the same seed replays
the same run event for event (``SimReport.trace`` is a digest of every delivered
message and every change of a node's role, vote, log end or commit).

After every loop step the invariants of Raft are checked (``_check``): election
safety, log matching, leader completeness, state-machine safety, commit never
going back, no acknowledged write lost. Clients record a history of sets,
deletes and linearizable reads (``ensure_linearizable``, then the state
machine) that the linearizability checker checks at the end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from raft_http.errors import RaftHttpError
from raft_http.raft import (
    Config,
    ForwardToLeader,
    NotAllowed,
    Raft,
    ServerState,
    TransferFailed,
    WriteAborted,
)
from raft_http.types import Entry, EntryPayload, LogId, Node, log_index

from .linearizability import INF, CheckResult, Op, check_history
from .loop import VirtualTimeLoop, run_virtual
from .network import NetworkFaults, SimRouter
from .state_machine import SimKV, delete_command, set_command
from .storage import SimDisk, SimLogStore, SimSnapshotStore

REPLAY = "RAFT_SIM_SEEDS={seed} python -m pytest tests/test_simulation.py -k test_seeds -q"


class Violation(AssertionError):
    """An invariant of Raft or linearizability does not hold."""


@dataclass
class SimOptions:
    """The shape of a run; a seed decides everything within it."""

    node_ids: tuple[int, ...] = (1, 2, 3, 4, 5)
    initial_voters: tuple[int, ...] = (1, 2, 3)
    clients: int = 3
    keys: tuple[str, ...] = ("a", "b", "c")
    duration: float = 3.0
    """Virtual seconds of clients and faults, before the final heal and check."""
    settle: float = 30.0
    """Virtual seconds allowed, after healing, for the cluster to converge."""
    faults: bool = True
    config: Config | None = None
    """The nodes' Config; by default one drawn from the seed (batch and snapshot sizes)."""


@dataclass
class SimReport:
    seed: int
    trace: str = ""
    virtual_time: float = 0.0
    steps: int = 0
    ops: int = 0
    acked_writes: int = 0
    unknown_writes: int = 0
    reads: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    transfers: collections.Counter[str] = field(default_factory=collections.Counter)
    """Leadership transfers by target ("to" a node, or "any") and outcome."""
    log_writes: collections.Counter[str] = field(default_factory=collections.Counter)
    """Durable log writes by where they ran: ``append_inline`` or the store's awaited calls."""
    violation: str | None = None
    linearizability: CheckResult | None = None

    @property
    def replay(self) -> str:
        return REPLAY.format(seed=self.seed)


@dataclass
class _Seen:
    """What the checker last saw of one node incarnation."""

    key: tuple[Any, ...] = ()
    committed: int = -1


class Simulation:
    """N nodes, a simulated network and disks, clients, a nemesis, and the invariant checks."""

    def __init__(self, seed: int, options: SimOptions | None = None) -> None:
        self.seed = seed
        self.options = options or SimOptions()
        self.rng = random.Random(seed)
        self.router = SimRouter(self._fork_rng())
        self.report = SimReport(seed)
        self.config = self.options.config or Config(
            heartbeat_interval=0.05,
            election_timeout_min=0.15,
            election_timeout_max=0.3,
            append_timeout=1.0,
            install_snapshot_timeout=2.0,
            max_payload_entries=self.rng.choice([1, 4, 32]),
            snapshot_logs_since_last=self.rng.choice([10, 25, 60]),
            max_in_snapshot_log_to_keep=self.rng.choice([0, 3, 10]),
        )
        self.disks = {n: SimDisk() for n in self.options.node_ids}
        self.nodes: dict[int, Raft] = {}
        self.machines: dict[int, SimKV] = {}
        self.stores: dict[int, tuple[SimLogStore, SimSnapshotStore]] = {}
        self.incarnation: collections.Counter[int] = collections.Counter()
        self.history: list[Op] = []
        self._clock = itertools.count()
        self.stopping = False
        self.leader_hint: int | None = None
        # What the invariant checks remember.
        self.leaders: dict[int, int] = {}  # term -> the node that led it
        self.committed: dict[int, LogId] = {}  # index -> the entry known committed there
        self.committed_by: dict[int, int] = {}  # index -> a term by which it was committed
        self.max_committed = -1
        self.applied: dict[int, tuple[LogId, bytes | None]] = {}
        self.acked: dict[int, LogId] = {}
        self.entries: dict[LogId, tuple[LogId | None, EntryPayload]] = {}
        self._seen: dict[int, _Seen] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starting: set[int] = set()
        self.on_step: list[Callable[[], None]] = []
        """Scenario hooks, run after every loop step, after the invariant checks."""

    def _fork_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def _tick(self) -> int:
        """The logical time of a history event: the order in which the simulation saw it."""
        return next(self._clock)

    # --- running -----------------------------------------------------------------------

    def run(self, scenario: Callable[[Simulation], Awaitable[None]] | None = None) -> SimReport:
        """Run the seed's clients and nemesis, or ``scenario`` instead; then settle and check."""
        loop = VirtualTimeLoop()
        logger = logging.getLogger("raft_http")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        loop.after_step = self._check
        try:
            run_virtual(self._main(scenario), loop)
        except Violation as e:
            self.report.violation = str(e)
        finally:
            logger.setLevel(level)
            self.report.virtual_time = loop.time()
            self.report.steps = loop.steps
            self.report.trace = self.router.trace.hexdigest()
            self.report.messages = self.router.counts
            for disk in self.disks.values():
                self.report.log_writes["inline"] += disk.inline_writes
                self.report.log_writes["worker"] += disk.writes - disk.inline_writes
        return self.report

    async def _main(self, scenario: Callable[[Simulation], Awaitable[None]] | None) -> None:
        for n in self.options.node_ids:
            await self.start(n)
        first = self.options.initial_voters[0]
        await self.nodes[first].initialize({n: self.addr(n) for n in self.options.initial_voters})
        if scenario is not None:
            await scenario(self)
            await self._settle()
            self._check_history()
            return
        loop = asyncio.get_running_loop()
        clients = [
            self._spawn(self._client(c, self._fork_rng())) for c in range(self.options.clients)
        ]
        nemesis = self._spawn(self._nemesis(self._fork_rng(), loop.time() + self.options.duration))
        await nemesis
        self.stopping = True
        await asyncio.gather(*clients)
        await self._settle()
        self._check_history()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def addr(node_id: int) -> Node:
        return Node(f"sim-{node_id}")

    def _latency(self, rng: random.Random) -> Callable[[], float]:
        return lambda: rng.uniform(0.0002, 0.004)

    async def start(self, node_id: int) -> None:
        """Start a new incarnation of the node on its disk (unless it is up or starting)."""
        if node_id in self.nodes or node_id in self._starting:
            return
        self._starting.add(node_id)
        try:
            await self._start(node_id)
        finally:
            self._starting.discard(node_id)

    async def _start(self, node_id: int) -> None:
        self.incarnation[node_id] += 1
        incarnation = self.incarnation[node_id]
        disk = self.disks[node_id]
        rng = self._fork_rng()
        stores = (
            SimLogStore(disk, rng, self._latency(rng)),
            SimSnapshotStore(disk, self._latency(rng)),
        )
        machine = SimKV(lambda log_id, data: self._on_apply(node_id, log_id, data))
        raft = await Raft.create(
            node_id,
            self.config,
            self.router.factory_for(node_id, incarnation),
            stores[0],
            machine,
            stores[1],  # type: ignore[arg-type]
            rng=self._fork_rng(),
        )
        self.stores[node_id] = stores
        self.machines[node_id] = machine
        self.nodes[node_id] = raft
        self._seen[node_id] = _Seen()
        self.router.up(node_id, incarnation, raft)

    def crash(self, node_id: int) -> None:
        """Kill the node: what was not flushed is lost, and it sends and answers nothing more."""
        raft = self.nodes.pop(node_id)
        self.machines.pop(node_id)
        self._seen.pop(node_id)
        self.router.down(node_id)
        log_store, snapshot_store = self.stores.pop(node_id)
        log_store.crash()
        snapshot_store.crash()
        raft.fail("crashed by the simulation")

    # --- clients -------------------------------------------------------------------------

    def _pick(self, rng: random.Random) -> int | None:
        if self.leader_hint in self.nodes and rng.random() < 0.9:
            return self.leader_hint
        live = sorted(self.nodes)
        return rng.choice(live) if live else None

    async def _client(self, client: int, rng: random.Random) -> None:
        for n in itertools.count():
            if self.stopping:
                return
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            node_id = self._pick(rng)
            if node_id is None:
                continue
            key = rng.choice(self.options.keys)
            kind = rng.choices(["set", "read", "delete"], [5, 4, 1])[0]
            if kind == "read":
                await self._read(client, node_id, key)
            else:
                value = f"{client}.{n}" if kind == "set" else None
                await self._write(client, node_id, key, value)

    async def _read(self, client: int, node_id: int, key: str) -> None:
        raft, machine = self.nodes[node_id], self.machines[node_id]
        invoke = self._tick()
        try:
            async with asyncio.timeout(1.0):
                await raft.ensure_linearizable()
        except ForwardToLeader as e:
            self.leader_hint = e.leader_id
            return
        except (RaftHttpError, TimeoutError):
            return  # a read without an answer constrains nothing
        value = machine.data.get(key)
        self.history.append(Op(client, "read", key, value, invoke, self._tick()))
        self.report.reads += 1

    async def _write(self, client: int, node_id: int, key: str, value: str | None) -> None:
        raft = self.nodes[node_id]
        command = delete_command(key) if value is None else set_command(key, value)
        kind = "delete" if value is None else "set"
        invoke = self._tick()
        try:
            async with asyncio.timeout(1.5):
                response = await raft.client_write(command)
        except ForwardToLeader as e:  # refused before it was proposed
            self.leader_hint = e.leader_id
            return
        except (WriteAborted, NotAllowed):  # decided: another entry took its index
            return
        except (RaftHttpError, TimeoutError):
            self.history.append(Op(client, kind, key, value, invoke))
            self.report.unknown_writes += 1
            return
        self.history.append(Op(client, kind, key, value, invoke, self._tick()))
        self.report.acked_writes += 1
        log_id = response.log_id
        self.acked[log_id.index] = log_id
        known = self.committed.get(log_id.index)
        if known is not None and known != log_id:
            raise Violation(f"write acknowledged at {log_id}, but {known} is committed there")

    # --- nemesis -----------------------------------------------------------------------------

    async def _nemesis(self, rng: random.Random, until: float) -> None:
        loop = asyncio.get_running_loop()
        ids = self.options.node_ids
        changing: asyncio.Task[Any] | None = None
        transferring: asyncio.Task[Any] | None = None
        actions = {
            "partition": 3,
            "one_way": 2,
            "isolate": 2,
            "heal": 4,
            "flaky": 3,
            "calm": 2,
            "crash": 3,
            "crash_leader": 3,
            "bounce": 2,
            "restart": 4,
            "snapshot": 2,
            "membership": 8,
            "transfer": 4,
        }
        names, weights = list(actions), list(actions.values())
        while loop.time() < until:
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            if not self.options.faults:
                continue
            action = rng.choices(names, weights)[0]
            if action == "partition":
                shuffled = rng.sample(ids, len(ids))
                cut = rng.randrange(1, len(ids))
                self.router.partition(set(shuffled[:cut]), set(shuffled[cut:]))
            elif action == "one_way":
                a, b = rng.sample(ids, 2)
                self.router.set_unreachable(a, b)
            elif action == "isolate":
                self.router.isolate(rng.choice(ids))
            elif action == "heal":
                self.router.heal()
            elif action == "flaky":
                self.router.faults = NetworkFaults(
                    drop=rng.choice([0.0, 0.02, 0.1, 0.3]),
                    duplicate=rng.choice([0.0, 0.05, 0.2]),
                    slow=rng.choice([0.0, 0.02, 0.1]),
                    max_delay=rng.choice([0.002, 0.01, 0.05]),
                )
            elif action == "calm":
                self.router.faults = NetworkFaults()
            elif action == "crash":
                if not self.nodes:
                    continue
                self.crash(rng.choice(sorted(self.nodes)))
            elif action == "crash_leader":
                leader = self._leader()
                if leader is None:
                    continue
                self.crash(leader.id)
            elif action == "bounce":  # crash, and restart soon after
                if not self.nodes:
                    continue
                victim = rng.choice(sorted(self.nodes))
                self.crash(victim)
                self._spawn(self._restart_later(victim, rng.uniform(0.0, 0.3)))
            elif action == "restart":
                down = [n for n in ids if n not in self.nodes]
                if not down:
                    continue
                await self.start(rng.choice(down))
            elif action == "snapshot":
                if not self.nodes:
                    continue
                with contextlib.suppress(RaftHttpError):
                    await self.nodes[rng.choice(sorted(self.nodes))].trigger_snapshot()
            elif action == "membership":
                if changing is not None and not changing.done():
                    continue
                changing = self._spawn(self._change_membership(self._fork_rng()))
            elif action == "transfer":
                if transferring is not None and not transferring.done():
                    continue
                transferring = self._spawn(self._transfer_leader(self._fork_rng()))
            self.report.faults[action] += 1
        for task in (changing, transferring):
            if task is not None:
                await task

    async def _restart_later(self, node_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if node_id not in self.nodes and not self.stopping:
            await self.start(node_id)

    def _leader(self) -> Raft | None:
        leaders = [r for r in self.nodes.values() if r._leader is not None]
        return max(leaders, key=lambda r: r._vote.term) if leaders else None

    async def _transfer_leader(self, rng: random.Random) -> None:
        """Hand leadership to a voter drawn at random (perhaps the leader itself), or to
        whichever the leader picks; record how it ended."""
        leader = self._leader()
        if leader is None:
            return
        voters = sorted(leader.membership.membership.voter_ids())
        to = rng.choice(voters) if rng.random() < 0.5 else None
        aim = "any" if to is None else ("self" if to == leader.id else "to")
        try:
            async with asyncio.timeout(5.0):
                new = await leader.transfer_leader(to)
        except TransferFailed:
            outcome = "failed"
        except ForwardToLeader:
            outcome = "not leader"
        except NotAllowed:
            outcome = "refused"
        except (RaftHttpError, TimeoutError):
            outcome = "error"
        else:
            if new == leader.id:
                outcome = "stayed"
            else:
                if leader._leader is not None:
                    raise Violation(f"node {leader.id} handed leadership to {new} yet leads")
                outcome = "handed over" if to in (None, new) else "another took over"
        self.report.transfers[f"{aim}: {outcome}"] += 1

    async def _change_membership(self, rng: random.Random) -> None:
        """Grow the voters to five, shrink them to three (keeping the others as learners or
        dropping them), or remove the learners."""
        leader = self._leader()
        if leader is None:
            return
        membership = leader.membership.membership
        voters = membership.voter_ids()
        learners = set(membership.nodes) - voters
        try:
            async with asyncio.timeout(3.0):
                if learners and rng.random() < 0.5 and hasattr(leader, "remove_learner"):
                    await leader.remove_learner(rng.sample(sorted(learners), 1))
                    self.report.faults["remove_learner"] += 1
                    return
                if len(voters) <= 3 and rng.random() < 0.7:
                    new = set(self.options.node_ids)
                else:
                    new = set(rng.sample(self.options.node_ids, 3))
                for n in sorted(new - set(membership.nodes)):
                    await leader.add_learner(n, self.addr(n), blocking=False)
                await leader.change_membership(new, retain=rng.random() < 0.5)
        except (RaftHttpError, TimeoutError):
            pass

    # --- the end: heal, converge, read back ------------------------------------------------

    async def _settle(self) -> None:
        self.router.heal()
        self.router.faults = NetworkFaults()
        for n in self.options.node_ids:
            if n not in self.nodes:
                await self.start(n)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.settle
        while True:
            leader = self._leader()
            if leader is not None and self._converged(leader):
                reads = await self._final_reads(leader)
                if reads is not None:
                    self.history.extend(reads)
                    self.report.reads += len(reads)
                    break
            if loop.time() > deadline:
                stuck = sorted(
                    n
                    for n, r in self.nodes.items()
                    if r.metrics().state is ServerState.REMOVED
                    and log_index(r.membership.log_id) > log_index(r.committed)
                )
                if stuck:
                    raise Violation(
                        f"liveness: nodes {stuck} hold an uncommitted config that"
                        f" removes them and do not campaign; no leader {self.options.settle}s"
                        " after healing"
                    )
                raise Violation(f"no convergence {self.options.settle}s after healing")
            await asyncio.sleep(0.1)
        assert leader is not None
        for index, acked in self.acked.items():
            if self.committed.get(index) != acked:
                raise Violation(f"acknowledged write {acked} lost: {self.committed.get(index)}")
        members = leader.membership.membership.nodes
        states = {n: self.machines[n].data for n in members}
        if any(s != states[leader.id] for s in states.values()):
            raise Violation(f"members applied the same log but hold different states: {states}")

    async def _final_reads(self, leader: Raft) -> list[Op] | None:
        """A linearizable read of every key through ``leader``; None if it stopped leading."""
        reads = []
        try:
            for key in self.options.keys:
                invoke = self._tick()
                await leader.ensure_linearizable()
                value = self.machines[leader.id].data.get(key)
                reads.append(Op(-1, "read", key, value, invoke, self._tick()))
        except RaftHttpError:
            return None
        return reads

    def _converged(self, leader: Raft) -> bool:
        committed = leader.committed
        if committed is None or committed.term != leader._vote.term:
            return False
        if leader.membership.log_id is None:
            return False
        if log_index(leader.membership.log_id) > log_index(committed):
            return False
        return all(
            n in self.nodes and log_index(self.nodes[n]._last_applied) >= committed.index
            for n in leader.membership.membership.nodes
        )

    def _check_history(self) -> None:
        result = check_history(self.history)
        self.report.linearizability = result
        self.report.ops = result.ops
        if not result.ok:
            raise Violation(f"not linearizable: key {result.bad_key}: {result.problem}")

    # --- invariants ---------------------------------------------------------------------------

    def _on_apply(self, node_id: int, log_id: LogId, data: bytes | None) -> None:
        index = log_id.index
        known = self.applied.setdefault(index, (log_id, data))
        if known != (log_id, data):
            raise Violation(
                f"state-machine safety: node {node_id} applied {log_id} at {index},"
                f" another node applied {known[0]}"
            )
        raft = self.nodes.get(node_id)
        if raft is not None:  # applying is committing, as far as the node knows
            self._committed_at(node_id, index, log_id, raft._vote.term)

    def _check(self) -> None:
        """Run after every loop step; looks again only at nodes whose state changed."""
        self._check_nodes()
        for hook in self.on_step:
            hook()

    def _check_nodes(self) -> None:
        trace = self.router.trace
        for node_id, raft in self.nodes.items():
            log = raft.log
            key = (raft._state, raft._vote, raft.committed, log.last_log_id, log.last_purged)
            seen = self._seen[node_id]
            if key == seen.key:
                continue
            seen.key = key
            trace.update(repr((node_id, key)).encode())
            if raft._fatal is not None:  # it stopped of itself: the simulation crashes nodes
                raise Violation(f"node {node_id} stopped: {raft._fatal}")
            term = raft._vote.term
            if raft._leader is not None:
                leader = self.leaders.setdefault(term, node_id)
                if leader != node_id:
                    raise Violation(
                        f"election safety: nodes {leader} and {node_id} lead term {term}"
                    )
            self._check_log(node_id, raft)
            committed = log_index(raft.committed)
            if committed < seen.committed:
                raise Violation(
                    f"node {node_id}'s commit went back from {seen.committed} to {committed}"
                )
            for index in range(max(seen.committed + 1, log.first_index), committed + 1):
                self._committed_at(node_id, index, log.log_id_at(index), term)
            seen.committed = committed
            if raft._leader is not None:
                self._check_leader_completeness(node_id, raft)

    def _check_log(self, node_id: int, raft: Raft) -> None:
        """Log matching: a log id has one predecessor and one payload in every log, ever."""
        log = raft.log
        prev = log.log_id_at(log.first_held - 1)  # entries before it are on disk only
        for index in range(log.first_held, log.last_index + 1):
            entry: Entry = log.entry(index)
            known = self.entries.setdefault(entry.log_id, (prev, entry.payload))
            if known != (prev, entry.payload):
                raise Violation(
                    f"log matching: node {node_id} holds {entry.log_id} after {prev},"
                    f" another log after {known[0]} (or with another payload)"
                )
            prev = entry.log_id

    def _committed_at(self, node_id: int, index: int, log_id: LogId | None, term: int) -> None:
        assert log_id is not None
        known = self.committed.setdefault(index, log_id)
        self.max_committed = max(self.max_committed, index)
        if known != log_id:
            raise Violation(f"node {node_id} commits {log_id} at {index}, others {known}")
        self.committed_by[index] = min(self.committed_by.get(index, term), term)
        acked = self.acked.get(index)
        if acked is not None and acked != log_id:
            raise Violation(f"acknowledged write {acked} lost: {log_id} committed at {index}")
        applied = self.applied.get(index)
        if applied is not None and applied[0] != log_id:
            raise Violation(f"{applied[0]} was applied at {index}, {log_id} is committed there")

    def _check_leader_completeness(self, node_id: int, raft: Raft) -> None:
        """A leader holds every entry committed in an earlier term (beyond what it purged)."""
        term = raft._vote.term
        log = raft.log
        for index in range(log.first_index, self.max_committed + 1):
            if index not in self.committed or self.committed_by[index] >= term:
                continue
            try:
                held = log.log_id_at(index)
            except KeyError:
                held = None
            if held != self.committed[index]:
                raise Violation(
                    f"leader completeness: node {node_id}, leader of term {term}, holds {held}"
                    f" at {index}, where {self.committed[index]} was committed by term"
                    f" {self.committed_by[index]}"
                )


def run_seed(seed: int, options: SimOptions | None = None) -> SimReport:
    return Simulation(seed, options).run()


def unknown(op: Op) -> bool:
    return op.complete == INF
