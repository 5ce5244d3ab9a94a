"""When a snapshot is due, and how far the log is purged after it."""

from __future__ import annotations

import pytest

from raft_http.raft.engine.policy import purge_upto, snapshot_due


@pytest.mark.parametrize(
    ("applied", "snapshot_last", "every", "due"),
    [
        (99, -1, 100, True),
        (98, -1, 100, False),
        (150, 50, 100, True),
        (149, 50, 100, False),
        (-1, -1, 1, False),
        (0, -1, 1, True),
    ],
)
def test_snapshot_due(applied: int, snapshot_last: int, every: int, due: bool) -> None:
    assert snapshot_due(applied, snapshot_last, every) is due


@pytest.mark.parametrize(
    ("snapshot_last", "keep", "last_purged", "expected"),
    [
        (100, 10, -1, 90),
        (100, 0, -1, 100),
        (100, 10, 89, 90),
        (100, 10, 90, None),  # already purged that far
        (100, 10, 95, None),
        (5, 10, -1, None),  # keep more than there is
        (10, 10, -1, 0),
        (9, 10, -1, None),
    ],
)
def test_purge_upto_keeps_the_asked_for_entries_behind_the_snapshot(
    snapshot_last: int, keep: int, last_purged: int, expected: int | None
) -> None:
    assert purge_upto(snapshot_last, keep, last_purged) == expected
