"""Quorum arithmetic, simple and joint (Raft paper section 6), and the Figure 8 commit rule."""

from __future__ import annotations

import math

import pytest

from engine_helpers import lid
from raft_http.raft.engine.commit import follower_commit_index, leader_commit_index
from raft_http.raft.engine.quorum import committed_index, is_quorum, quorum_acked_at, quorum_value
from raft_http.types import LogId


@pytest.mark.parametrize(
    ("configs", "granted", "expected"),
    [
        ([[1]], {1}, True),
        ([[1]], set(), False),
        ([[1, 2]], {1}, False),  # half is not a majority
        ([[1, 2]], {1, 2}, True),
        ([[1, 2, 3]], {1}, False),
        ([[1, 2, 3]], {2, 3}, True),
        ([[1, 2, 3]], {1, 4, 5}, False),  # non-members do not count
        ([[1, 2, 3, 4]], {1, 2}, False),
        ([[1, 2, 3, 4]], {1, 2, 3}, True),
        ([[1, 2, 3, 4, 5]], {1, 2, 3}, True),
        ([[1, 2, 3, 4, 5]], {4, 5}, False),
        ([[]], set(), False),  # a config without voters never agrees
        ([], set(), True),  # no config at all (before initialization): nobody needed
        # joint: a majority of each config, not of their union
        ([[1, 2, 3], [3, 4, 5]], {1, 2, 3}, False),
        ([[1, 2, 3], [3, 4, 5]], {3, 4, 5}, False),
        ([[1, 2, 3], [3, 4, 5]], {1, 3, 4}, True),
        ([[1, 2, 3], [3, 4, 5]], {1, 2, 4, 5}, True),
        ([[1, 2, 3], [4]], {1, 2}, False),
        ([[1, 2, 3], [4]], {1, 2, 4}, True),
        ([[1], [2, 3]], {1, 2}, False),
    ],
)
def test_is_quorum(configs: list[list[int]], granted: set[int], expected: bool) -> None:
    assert is_quorum(configs, granted) is expected


@pytest.mark.parametrize(
    ("configs", "matched", "expected"),
    [
        ([[1]], {1: 7}, 7),
        ([[1, 2, 3]], {1: 5, 2: 3, 3: 1}, 3),
        ([[1, 2, 3]], {1: 5, 2: 5, 3: -1}, 5),
        ([[1, 2, 3]], {1: 5, 2: -1, 3: -1}, -1),
        ([[1, 2, 3, 4]], {1: 9, 2: 8, 3: 2, 4: 1}, 2),  # 3 of 4 needed
        ([[1, 2, 3, 4, 5]], {1: 9, 2: 8, 3: 7, 4: 1, 5: 0}, 7),
        ([[1, 2, 3], [3, 4, 5]], {1: 9, 2: 9, 3: 4, 4: 2, 5: 1}, 2),
        ([[1, 2, 3], [4, 5, 6]], {1: 9, 2: 9, 3: 9, 4: 6, 5: 5, 6: 4}, 5),
        ([[4, 5, 6], [1, 2, 3]], {1: 9, 2: 9, 3: 9, 4: 6, 5: 5, 6: 4}, 5),  # either order
        ([[1, 2, 3], [3]], {1: 9, 2: 9, 3: 1}, 1),
        ([[]], {}, -1),
        ([], {}, -1),
    ],
)
def test_committed_index(configs: list[list[int]], matched: dict[int, int], expected: int) -> None:
    assert committed_index(configs, lambda n: matched.get(n, -1)) == expected


def test_quorum_value_skips_empty_configs_and_is_none_when_all_are() -> None:
    assert quorum_value([[], [1, 2, 3]], {1: 3.0, 2: 2.0, 3: 1.0}.__getitem__) == 2.0
    assert quorum_value([[], []], lambda n: 1.0) is None


@pytest.mark.parametrize(
    ("configs", "acked", "expected"),
    [
        ([[1]], {}, 100.0),  # alone, the leader is its own quorum, now
        ([[1, 2, 3]], {2: 90.0, 3: 80.0}, 90.0),  # itself (now) plus the fresher peer
        ([[1, 2, 3]], {}, -math.inf),
        ([[1, 2, 3], [2, 3, 4]], {2: 90.0, 3: 80.0, 4: 95.0}, 90.0),
        ([[1, 2, 3], [4, 5, 6]], {2: 90.0, 4: 70.0, 5: 60.0, 6: 50.0}, 60.0),
        ([], {}, 100.0),
    ],
)
def test_quorum_acked_at(
    configs: list[list[int]], acked: dict[int, float], expected: float
) -> None:
    assert quorum_acked_at(configs, 1, lambda n: acked.get(n, -math.inf), 100.0) == expected


# --- commit: Figure 8 -------------------------------------------------------------


def terms(*by_index: int) -> dict[int, int]:
    return dict(enumerate(by_index))


@pytest.mark.parametrize(
    ("case", "log_terms", "matched", "leader_term", "committed", "expected"),
    [
        # Figure 8 (c): S1 leads term 4; its entry of term 2 at index 1 is on S1, S2, S3,
        # a majority of five, but its own term-4 entry at 2 is on S1 alone. Counting
        # replicas would commit index 1, which S5 (term 3) may still overwrite in (d).
        ("fig8-c", terms(0, 2, 4), {1: 2, 2: 1, 3: 1, 4: -1, 5: -1}, 4, 0, None),
        # Figure 8 (e): the term-4 entry reaches a majority too: both commit together.
        ("fig8-e", terms(0, 2, 4), {1: 2, 2: 2, 3: 2, 4: -1, 5: -1}, 4, 0, 2),
        ("own-term", terms(0, 3, 3), {1: 2, 2: 2, 3: 1, 4: -1, 5: -1}, 3, 0, 1),
        ("no-majority", terms(0, 3, 3), {1: 2, 2: -1, 3: -1, 4: -1, 5: -1}, 3, 0, None),
        ("no-advance", terms(0, 3, 3), {1: 2, 2: 2, 3: 2, 4: -1, 5: -1}, 3, 2, None),
        ("never-backwards", terms(0, 3, 3), {1: 2, 2: 1, 3: 1, 4: 1, 5: 1}, 3, 2, None),
        ("older-at-quorum", terms(0, 1, 2, 5), {1: 3, 2: 2, 3: 2, 4: 0, 5: 0}, 5, 0, None),
        ("one-past", terms(0, 3, 3), {1: 2, 2: 2, 3: 2, 4: 2, 5: 2}, 3, 1, 2),
    ],
)
def test_leader_commits_only_entries_of_its_own_term(
    case: str,
    log_terms: dict[int, int],
    matched: dict[int, int],
    leader_term: int,
    committed: int,
    expected: int | None,
) -> None:
    configs = [[1, 2, 3, 4, 5]]
    got = leader_commit_index(
        configs, matched.__getitem__, log_terms.__getitem__, leader_term, committed
    )
    assert got == expected, case


def test_leader_commit_in_joint_config_needs_both_majorities() -> None:
    configs = [[1, 2, 3], [3, 4, 5]]
    log_terms = terms(0, 2, 2)
    only_old = {1: 2, 2: 2, 3: 0, 4: 0, 5: 0}
    both = {1: 2, 2: 2, 3: 2, 4: 2, 5: 0}
    assert leader_commit_index(configs, only_old.__getitem__, log_terms.__getitem__, 2, 0) is None
    assert leader_commit_index(configs, both.__getitem__, log_terms.__getitem__, 2, 0) == 2


@pytest.mark.parametrize(
    ("leader_commit", "last_matching", "committed", "expected"),
    [
        (None, lid(1, 5), -1, None),  # the leader committed nothing yet
        (lid(1, 3), lid(1, 5), -1, 3),  # up to the leader's commit
        (lid(1, 9), lid(1, 5), -1, 5),  # no further than what this request matched
        (lid(1, 9), None, -1, None),  # an empty prefix confirms nothing
        (lid(1, 4), lid(1, 5), 4, None),  # nothing new
        (lid(1, 3), lid(1, 5), 4, None),  # never backwards
        (lid(1, 5), lid(1, 5), 4, 5),
    ],
)
def test_follower_commit_index(
    leader_commit: LogId | None, last_matching: LogId | None, committed: int, expected: int | None
) -> None:
    assert follower_commit_index(leader_commit, last_matching, committed) == expected
