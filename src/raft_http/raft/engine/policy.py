"""When to build a snapshot and how much log to purge after one."""

from __future__ import annotations


def snapshot_due(last_applied: int, snapshot_last: int, logs_since_last: int) -> bool:
    """A snapshot is due once ``logs_since_last`` entries were applied since the last one."""
    return last_applied - snapshot_last >= logs_since_last


def purge_upto(snapshot_last: int, keep: int, last_purged: int) -> int | None:
    """The index to purge the log up to after a snapshot to ``snapshot_last``, or None.

    ``keep`` entries behind the snapshot stay in the log so a follower slightly behind
    catches up by AppendEntries instead of a whole snapshot.
    """
    upto = snapshot_last - keep
    return upto if upto > last_purged else None
