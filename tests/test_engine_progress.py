"""The leader's per-follower progress: probe, replicate, snapshot; the match search on conflict."""

from __future__ import annotations

import math

import pytest

from engine_helpers import lid
from raft_http.raft.engine.progress import Progress, ProgressState


def test_a_new_progress_probes_from_the_leaders_next_index() -> None:
    p = Progress(next_index=11, entries_limit=300)
    assert (p.matching, p.next_index, p.state, p.in_flight) == (None, 11, ProgressState.PROBE, None)
    assert p.acked_at == -math.inf
    assert p.has_more(11)
    assert not p.has_more(10)


@pytest.mark.parametrize(
    ("next_index", "limit", "last_index", "expected"),
    [(5, 300, 9, (5, 10)), (5, 2, 9, (5, 7)), (10, 3, 9, (10, 10)), (0, 1, 0, (0, 1))],
)
def test_batch_is_bounded_by_the_limit_and_the_log(
    next_index: int, limit: int, last_index: int, expected: tuple[int, int]
) -> None:
    assert Progress(next_index, limit).batch(last_index) == expected


@pytest.mark.parametrize(
    ("next_index", "purged", "expected"),
    [
        (5, None, False),
        (0, None, False),
        (5, lid(1, 3), False),
        (5, lid(1, 4), False),
        (5, lid(1, 5), True),
        (4, lid(1, 4), True),
        (1, lid(1, 9), True),
    ],
)
def test_needs_snapshot_when_the_entry_before_next_is_purged(
    next_index: int, purged: object, expected: bool
) -> None:
    assert Progress(next_index, 10).needs_snapshot(purged) is expected  # type: ignore[arg-type]


def test_matched_advances_and_never_goes_back() -> None:
    p = Progress(10, 300)
    p.sent(9)
    assert p.in_flight == 9
    assert p.matched(lid(1, 9), sent_at=5.0)
    assert (p.matching, p.next_index, p.state, p.in_flight) == (
        lid(1, 9),
        10,
        ProgressState.REPLICATE,
        None,
    )
    # A reordered, older answer: no regression of match, next or ack time.
    assert not p.matched(lid(1, 4), sent_at=3.0)
    assert (p.matching, p.next_index, p.acked_at) == (lid(1, 9), 10, 5.0)
    # A heartbeat answered later moves the ack time only.
    assert not p.matched(lid(1, 9), sent_at=7.0)
    assert p.acked_at == 7.0
    assert p.matched(lid(2, 12), sent_at=8.0)
    assert p.next_index == 13


def test_matched_the_empty_prefix() -> None:
    p = Progress(0, 300)
    assert not p.matched(None, sent_at=1.0)
    assert (p.next_index, p.state, p.acked_at) == (0, ProgressState.REPLICATE, 1.0)


@pytest.mark.parametrize(
    ("matching", "probes", "expected_next"),
    [
        # Nothing known: each conflict halves the distance to -1 (binary search).
        (None, [100], [50]),
        (None, [100, 49, 24, 11, 5, 2, 0], [50, 25, 12, 6, 3, 1, 0]),
        # Known match at 40: search between 40 and the probe.
        (lid(1, 40), [100], [71]),
        (lid(1, 40), [100, 70, 55, 47, 43, 41], [71, 56, 48, 44, 42, 41]),
    ],
)
def test_conflict_searches_back_halfway_to_the_known_match(
    matching: object, probes: list[int], expected_next: list[int]
) -> None:
    p = Progress(101, 300)
    if matching is not None:
        p.matched(matching, 0.0)  # type: ignore[arg-type]
    got = []
    for prev_index in probes:
        p.sent(prev_index)
        p.conflict(prev_index)
        assert p.state is ProgressState.PROBE
        assert p.in_flight is None
        got.append(p.next_index)
    assert got == expected_next


def test_conflict_below_the_match_forgets_it() -> None:
    """A follower that lacks what it acknowledged lost its disk: the match is unknown."""
    p = Progress(11, 300)
    p.matched(lid(1, 10), 0.0)
    p.conflict(10)
    assert p.matching is None
    assert p.next_index == 5
    q = Progress(11, 300)
    q.matched(lid(1, 10), 0.0)
    q.conflict(12)  # above the match: keep it
    assert q.matching == lid(1, 10)
    assert q.next_index == 12


@pytest.mark.parametrize(
    ("limit", "hint", "expected"), [(300, 50, 50), (300, 400, 299), (2, 1, 1), (1, 1, 1), (5, 0, 1)]
)
def test_too_large_shrinks_the_batch_but_never_to_nothing(
    limit: int, hint: int, expected: int
) -> None:
    p = Progress(0, limit)
    p.sent(9)
    p.too_large(hint)
    assert (p.entries_limit, p.in_flight) == (expected, None)


def test_snapshot_state_until_the_snapshot_is_acknowledged() -> None:
    p = Progress(3, 300)
    p.sent(7)
    p.sending_snapshot()
    assert (p.state, p.in_flight) == (ProgressState.SNAPSHOT, None)
    p.matched(lid(2, 50), 4.0)
    assert (p.state, p.next_index, p.matching) == (ProgressState.REPLICATE, 51, lid(2, 50))


def test_a_failed_request_teaches_nothing() -> None:
    p = Progress(3, 300)
    p.matched(lid(1, 2), 1.0)
    p.sent(9)
    p.failed()
    assert (p.in_flight, p.matching, p.next_index, p.acked_at) == (None, lid(1, 2), 3, 1.0)
