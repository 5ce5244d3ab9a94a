"""Log reconciliation on a follower (5.3): the prev_log_id check and maybe-append."""

from __future__ import annotations

import pytest

from engine_helpers import entry, lid, log_of
from raft_http.raft.engine.log import RaftLog, plan_append, prev_log_conflicts
from raft_http.types import Entry, LogId


@pytest.mark.parametrize(
    ("log", "prev", "conflicts"),
    [
        (log_of([]), None, False),  # the empty prefix always matches
        (log_of([1, 1, 2]), None, False),
        (log_of([1, 1, 2]), lid(2, 2), False),
        (log_of([1, 1, 2]), lid(1, 2), True),  # same index, other term
        (log_of([1, 1, 2]), lid(2, 3), True),  # beyond the log
        (log_of([1, 1, 2]), lid(1, 2, leader=2), True),  # same term, other leader
        (log_of([3, 3], purged=lid(2, 4)), lid(2, 4), False),  # the last purged id
        (log_of([3, 3], purged=lid(2, 4)), lid(1, 3), False),  # purged: committed, taken as held
        (log_of([3, 3], purged=lid(2, 4)), lid(3, 6), False),
        (log_of([3, 3], purged=lid(2, 4)), lid(4, 6), True),
        (log_of([3, 3], purged=lid(2, 4)), lid(3, 7), True),
    ],
)
def test_prev_log_conflicts(log: RaftLog, prev: LogId | None, conflicts: bool) -> None:
    assert prev_log_conflicts(log, prev) is conflicts


def es(start: int, *terms: int) -> list[Entry]:
    return [entry(t, start + i) for i, t in enumerate(terms)]


@pytest.mark.parametrize(
    ("case", "log", "entries", "truncate_at", "new"),
    [
        ("append-to-empty", log_of([]), es(0, 1, 1), None, es(0, 1, 1)),
        ("heartbeat", log_of([1, 1]), [], None, []),
        ("all-held", log_of([1, 1, 2]), es(1, 1, 2), None, []),
        ("extend", log_of([1, 1]), es(1, 1, 2, 2), None, es(2, 2, 2)),
        # A stale, reordered request that agrees with a longer log must not cut it.
        ("stale-shorter", log_of([1, 1, 2, 2]), es(1, 1), None, []),
        ("conflict-at-tail", log_of([1, 1, 2]), es(2, 3), 2, es(2, 3)),
        ("conflict-mid", log_of([1, 1, 2, 2, 2]), es(1, 1, 3, 3), 2, es(2, 3, 3)),
        ("conflict-first", log_of([1, 2]), es(1, 3, 3, 3), 1, es(1, 3, 3, 3)),
        ("purged-taken-as-held", log_of([3], purged=lid(2, 4)), es(3, 2, 2, 3, 4), None, es(6, 4)),
        ("conflict-after-purged", log_of([3, 3], purged=lid(2, 4)), es(4, 2, 3, 4), 6, es(6, 4)),
    ],
)
def test_plan_append(
    case: str, log: RaftLog, entries: list[Entry], truncate_at: int | None, new: list[Entry]
) -> None:
    plan = plan_append(log, entries)
    assert (plan.truncate_at, plan.new) == (truncate_at, new), case


def test_plan_append_detects_another_leader_in_the_same_term() -> None:
    log = log_of([1, 1])
    other = [Entry(lid(1, 1, leader=2), entry(1, 1).payload)]
    assert plan_append(log, other).truncate_at == 1
