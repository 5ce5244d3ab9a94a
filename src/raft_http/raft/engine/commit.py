"""When an entry is committed: the leader's rule (Figure 8) and the follower's.

Raft paper, section 5.4.2: a leader never commits an entry of an earlier term by
counting replicas. Only an entry of its own term commits by being on a quorum; the
earlier ones then commit with it, by the Log Matching Property. Figure 8 shows an
entry of term 2 on a majority that a later leader still overwrites.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from ...types import LogId, log_index
from .quorum import committed_index


def leader_commit_index(
    configs: Sequence[Collection[int]],
    matched: Callable[[int], int],
    term_at: Callable[[int], int],
    leader_term: int,
    committed: int,
) -> int | None:
    """The leader's new commit index, or None when it does not advance.

    ``matched(node)`` is the last index on ``node`` (the leader's own last index for
    itself), ``term_at(index)`` the term of the leader's entry there, ``committed``
    the current commit index. An index a quorum holds commits only if its entry is of
    ``leader_term``; since terms never decrease along a log, no lower index of an older
    term may commit on its own either.
    """
    index = committed_index(configs, matched)
    if index <= committed:
        return None
    if term_at(index) != leader_term:
        return None
    return index


def follower_commit_index(
    leader_commit: LogId | None, last_matching: LogId | None, committed: int
) -> int | None:
    """The follower's new commit index after an accepted AppendEntries, or None.

    A follower may commit only what it knows matches the leader: up to the leader's
    commit index, but no further than the last entry this request confirmed
    (``last_matching``). Entries past it may still be a stale tail to be overwritten.
    """
    if leader_commit is None:
        return None
    upto = min(leader_commit.index, log_index(last_matching))
    return upto if upto > committed else None
