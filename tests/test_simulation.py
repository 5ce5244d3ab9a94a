"""Deterministic simulation of Raft clusters (tests/sim/): many seeds, each checked throughout.

Each seed runs five real ``Raft`` nodes on virtual time under a nemesis (partitions,
lost, duplicated and slow messages, crashes that lose unflushed writes, restarts,
snapshots, membership changes between three and five voters) while clients write
and read three keys. Raft's invariants are checked after every event-loop step and
the clients' history is checked for linearizability at the end.

- ``RAFT_SIM_SEEDS=1234`` (or ``1,5,9`` or ``100-199``) runs just those seeds: how a
  failing seed is replayed (the failure prints the command).
- ``RAFT_SIM_SOAK=N`` runs N seeds (from ``RAFT_SIM_FIRST``, default 0) instead of
  the CI set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from raft_http.raft import node as raft_node
from raft_http.raft.engine.quorum import committed_index
from raft_http.types import LeaderId, LogId, VoteRequest
from seeds import seeds_from_env
from sim.cluster import SimOptions, Simulation, run_seed
from sim.scenarios import FIGURE_8_CONFIG, figure_8, removed_before_the_change_commits
from sim.summary import timed_run

CI_SEEDS = 500
"""Seeds CI runs: about 0.2 s of CPU each (3 s of virtual time under faults, then a heal)."""


def _seeds() -> list[int]:
    first = int(os.environ.get("RAFT_SIM_FIRST", "0"))
    count = int(os.environ.get("RAFT_SIM_SOAK", CI_SEEDS))
    return seeds_from_env("RAFT_SIM_SEEDS", list(range(first, first + count)))


@pytest.mark.parametrize("seed", _seeds())
def test_seeds(seed: int) -> None:
    report = timed_run(seed)
    assert report.violation is None, (
        f"seed {seed}: {report.violation}\nreplay: {report.replay}\n"
        f"faults: {dict(report.faults)}; messages: {dict(report.messages)}"
    )
    assert report.linearizability is not None
    assert report.linearizability.ok


def test_a_seed_replays_event_for_event() -> None:
    first, again = Simulation(7), Simulation(7)
    a, b = first.run(), again.run()
    assert a.violation is None
    assert (a.trace, a.steps, a.virtual_time) == (b.trace, b.steps, b.virtual_time)
    assert first.history == again.history
    assert a.messages == b.messages
    other = run_seed(8)
    assert other.trace != a.trace


def test_a_seed_replays_in_another_process_with_other_hash_seeds() -> None:
    """Nothing depends on str hashing or object addresses (sets of tasks iterate in order)."""
    code = "from sim.cluster import run_seed; print(run_seed(11).trace)"
    tests = Path(__file__).parent
    traces = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tests,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        traces.add(out.stdout.strip())
    assert traces == {run_seed(11).trace}


def test_a_run_without_faults_loses_nothing_and_times_out_nothing() -> None:
    report = Simulation(3, SimOptions(faults=False)).run()
    assert report.violation is None
    assert report.unknown_writes == 0
    assert report.acked_writes > 100
    assert report.reads > 50
    assert not report.faults


def test_the_nemesis_injects_every_kind_of_fault() -> None:
    kinds: set[str] = set()
    messages: set[str] = set()
    for seed in range(12):
        report = run_seed(seed)
        kinds |= set(report.faults)
        messages |= set(report.messages)
    assert kinds >= {
        "partition",
        "one_way",
        "isolate",
        "heal",
        "flaky",
        "crash",
        "crash_leader",
        "bounce",
        "restart",
        "snapshot",
        "membership",
        "transfer",
    }
    assert messages >= {"dropped", "duplicated", "refused", "full_snapshot", "vote"}


# --- the simulation catches known-bad behaviour -------------------------------------------


def _first_violation(seeds: range) -> str:
    for seed in seeds:
        report = run_seed(seed)
        if report.violation:
            return f"seed {seed}: {report.violation}"
    raise AssertionError(f"no seed in {seeds} found the mutant")


@pytest.fixture
def mutate(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Any], None]:
    def apply(name: str, replacement: Any) -> None:
        monkeypatch.setattr(raft_node.Raft, name, replacement)

    return apply


def test_a_vote_granted_without_the_up_to_date_check_is_caught(
    mutate: Callable[[str, Any], None],
) -> None:
    """Raft §5.4.1: a voter refuses a candidate whose log is behind its own."""
    handle_vote = raft_node.Raft._handle_vote

    async def vote_blindly(self: raft_node.Raft, rpc: VoteRequest) -> Any:
        beyond = LogId(LeaderId(10**9, 0), 10**9)  # every log looks behind the candidate's
        return await handle_vote(self, VoteRequest(rpc.vote, beyond, rpc.pre_vote))

    mutate("_handle_vote", vote_blindly)
    violation = _first_violation(range(20))
    assert any(
        words in violation
        for words in ("leader completeness", "commits", "lost", "applied", "linearizable")
    ), violation


def test_a_read_without_confirming_leadership_is_caught(
    mutate: Callable[[str, Any], None],
) -> None:
    """A node that answers from its own state machine at once serves stale reads."""

    async def read_locally(self: raft_node.Raft) -> LogId | None:
        self._check_running()
        return self._last_applied

    mutate("ensure_linearizable", read_locally)
    violation = _first_violation(range(20))
    assert "not linearizable" in violation, violation


def test_an_acknowledgement_before_commit_is_caught(mutate: Callable[[str, Any], None]) -> None:
    """A leader that answers a write once it is in its own log loses it when deposed."""
    append_as_leader = raft_node.Raft._append_as_leader

    def ack_when_appended(self: raft_node.Raft, batch: Any) -> None:
        append_as_leader(self, batch)
        for log_id, future in self._responders.waiting():
            if not future.done():
                future.set_result(raft_node.ClientWriteResponse(log_id))

    mutate("_append_as_leader", ack_when_appended)
    violation = _first_violation(range(30))
    assert any(words in violation for words in ("lost", "linearizable", "leader completeness")), (
        violation
    )


FIVE_VOTERS = SimOptions(initial_voters=(1, 2, 3, 4, 5), faults=False, config=FIGURE_8_CONFIG)


@pytest.mark.parametrize("seed", range(3))
def test_figure_8_leaves_the_core_safe(seed: int) -> None:
    report = Simulation(seed, FIVE_VOTERS).run(figure_8)
    assert report.violation is None, report.violation


def test_figure_8_catches_a_leader_that_commits_an_old_term_by_counting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raft §5.4.2: the mutant commits the entry of an older term once it is on a quorum."""

    def count_replicas(
        configs: Any, matched: Any, term_at: Any, leader_term: int, committed: int
    ) -> int | None:
        index = committed_index(configs, matched)
        return index if index > committed else None

    monkeypatch.setattr(raft_node, "leader_commit_index", count_replicas)
    report = Simulation(0, FIVE_VOTERS).run(figure_8)
    assert report.violation is not None
    assert "leader completeness" in report.violation, report.violation


def test_voters_removed_by_an_uncommitted_change_still_let_the_cluster_elect() -> None:
    """Found by seed 309: voters an uncommitted change removes must still campaign (thesis
    4.2.2), or a joint config's other half may have no quorum without them. Fixed in d62c984."""
    options = SimOptions(faults=False, clients=0, settle=10.0)
    report = Simulation(0, options).run(removed_before_the_change_commits)
    assert report.violation is None, report.violation
