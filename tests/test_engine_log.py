"""Log reconciliation on a follower (5.3): the prev_log_id check and maybe-append."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from engine_helpers import entry, lid, log_of
from raft_http.raft.engine.log import RaftLog, plan_append, prev_log_conflicts
from raft_http.types import Entry, LogId


@pytest.mark.parametrize(
    ("log", "prev", "conflicts"),
    [
        (partial(log_of, []), None, False),  # the empty prefix always matches
        (partial(log_of, [1, 1, 2]), None, False),
        (partial(log_of, [1, 1, 2]), lid(2, 2), False),
        (partial(log_of, [1, 1, 2]), lid(1, 2), True),  # same index, other term
        (partial(log_of, [1, 1, 2]), lid(2, 3), True),  # beyond the log
        (partial(log_of, [1, 1, 2]), lid(1, 2, leader=2), True),  # same term, other leader
        (partial(log_of, [3, 3], purged=lid(2, 4)), lid(2, 4), False),  # the last purged id
        (partial(log_of, [3, 3], purged=lid(2, 4)), lid(1, 4), False),  # at the purge: committed
        (
            partial(log_of, [3, 3], purged=lid(2, 4)),
            lid(1, 3),
            False,
        ),  # purged: committed, taken as held
        (partial(log_of, [3, 3], purged=lid(2, 4)), lid(3, 6), False),
        (partial(log_of, [3, 3], purged=lid(2, 4)), lid(4, 6), True),
        (partial(log_of, [3, 3], purged=lid(2, 4)), lid(3, 7), True),
    ],
)
def test_prev_log_conflicts(
    log: Callable[[], RaftLog], prev: LogId | None, conflicts: bool
) -> None:
    assert prev_log_conflicts(log(), prev) is conflicts


def es(start: int, *terms: int) -> list[Entry]:
    return [entry(t, start + i) for i, t in enumerate(terms)]


@pytest.mark.parametrize(
    ("case", "log", "entries", "truncate_at", "new"),
    [
        ("append-to-empty", partial(log_of, []), es(0, 1, 1), None, es(0, 1, 1)),
        ("heartbeat", partial(log_of, [1, 1]), [], None, []),
        ("all-held", partial(log_of, [1, 1, 2]), es(1, 1, 2), None, []),
        ("extend", partial(log_of, [1, 1]), es(1, 1, 2, 2), None, es(2, 2, 2)),
        # A stale, reordered request that agrees with a longer log must not cut it.
        ("stale-shorter", partial(log_of, [1, 1, 2, 2]), es(1, 1), None, []),
        ("conflict-at-tail", partial(log_of, [1, 1, 2]), es(2, 3), 2, es(2, 3)),
        ("conflict-mid", partial(log_of, [1, 1, 2, 2, 2]), es(1, 1, 3, 3), 2, es(2, 3, 3)),
        ("conflict-first", partial(log_of, [1, 2]), es(1, 3, 3, 3), 1, es(1, 3, 3, 3)),
        (
            "purged-taken-as-held",
            partial(log_of, [3], purged=lid(2, 4)),
            es(3, 2, 2, 3, 4),
            None,
            es(6, 4),
        ),
        ("at-purged-taken-as-held", partial(log_of, [3], purged=lid(2, 4)), es(4, 1, 3), None, []),
        (
            "conflict-after-purged",
            partial(log_of, [3, 3], purged=lid(2, 4)),
            es(4, 2, 3, 4),
            6,
            es(6, 4),
        ),
    ],
)
def test_plan_append(
    case: str,
    log: Callable[[], RaftLog],
    entries: list[Entry],
    truncate_at: int | None,
    new: list[Entry],
) -> None:
    plan = plan_append(log(), entries)
    assert (plan.truncate_at, plan.new) == (truncate_at, new), case


def test_plan_append_detects_another_leader_in_the_same_term() -> None:
    log = log_of([1, 1])
    other = [Entry(lid(1, 1, leader=2), entry(1, 1).payload)]
    assert plan_append(log, other).truncate_at == 1
