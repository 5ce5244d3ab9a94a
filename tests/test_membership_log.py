"""MembershipLog: which membership is in force, at the end of the log and at any index."""

from __future__ import annotations

from raft_http.raft.engine.membership import EMPTY, MembershipLog
from raft_http.types import (
    Blank,
    Entry,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    StoredMembership,
)


def config(*voters: int) -> Membership:
    return Membership([sorted(voters)], {v: Node(f"h{v}:1") for v in voters})


def change(index: int, *voters: int) -> Entry:
    return Entry(LogId(LeaderId(1, 1), index), MembershipChange(config(*voters)))


def blank(index: int) -> Entry:
    return Entry(LogId(LeaderId(1, 1), index), Blank())


def voters_at(log: MembershipLog, index: int) -> list[list[int]]:
    return log.at(index).membership.configs


def test_empty_until_a_membership_is_appended() -> None:
    log = MembershipLog()
    assert log.effective == EMPTY
    assert log.track([blank(0), blank(1)]) is False
    assert log.effective == EMPTY


def test_effective_is_the_last_appended_committed_or_not() -> None:
    log = MembershipLog()
    assert log.track([change(0, 1, 2, 3), blank(1), change(2, 1, 2, 3, 4)]) is True
    assert log.effective.membership == config(1, 2, 3, 4)
    assert log.effective.log_id == LogId(LeaderId(1, 1), 2)
    assert voters_at(log, 0) == [[1, 2, 3]]
    assert voters_at(log, 1) == [[1, 2, 3]]
    assert voters_at(log, 5) == [[1, 2, 3, 4]]
    assert voters_at(log, -1) == []  # before any entry: the base


def test_truncation_forgets_the_memberships_it_removed() -> None:
    log = MembershipLog()
    log.track([change(0, 1, 2, 3), change(4, 1, 2), change(7, 1)])
    log.forget_since(4)
    assert log.effective.membership == config(1, 2, 3)
    log.forget_since(0)
    assert log.effective == EMPTY, "the base is never forgotten"


def test_snapshot_rebase_keeps_only_later_memberships() -> None:
    log = MembershipLog()
    log.track([change(0, 1, 2, 3), change(4, 1, 2), change(9, 1)])
    snapshot_membership = StoredMembership(LogId(LeaderId(1, 1), 4), config(1, 2))
    log.rebase(snapshot_membership, after=6)
    assert log.at(5) == snapshot_membership
    assert log.effective.membership == config(1)


def test_compact_keeps_the_membership_in_force_at_the_purge_point() -> None:
    log = MembershipLog()
    log.track([change(0, 1, 2, 3), change(4, 1, 2), change(9, 1)])
    log.compact(6)
    assert voters_at(log, 6) == [[1, 2]]
    assert voters_at(log, 0) == [[1, 2]], "older history is gone; the base answers"
    assert log.effective.membership == config(1)


def test_removed_only_after_being_a_member() -> None:
    log = MembershipLog()
    assert not log.removed(4)  # never a member: a pristine node
    log.track([change(0, 1, 2, 3)])
    assert not log.removed(4)  # a learner catching up from the start of the log
    log.track([change(1, 1, 2, 3, 4)])
    assert not log.removed(4)
    log.track([change(2, 1, 2, 3)])
    assert log.removed(4)
    assert not log.removed(1)
    log.forget_since(2)  # the removal was truncated: a member again
    assert not log.removed(4)
    log.track([change(2, 1, 2, 3)])
    log.compact(2)  # the base is now the membership without 4
    assert log.removed(4), "compaction made it forget"
    assert not log.removed(1)
    based = MembershipLog(StoredMembership(LogId(LeaderId(1, 1), 5), config(1, 2, 4)))
    based.track([change(6, 1, 2)])
    assert based.removed(4)
    # Past a snapshot, a node in no membership held was removed before it (or is a
    # learner whose addition comes later in the log).
    snapshot = MembershipLog(StoredMembership(LogId(LeaderId(1, 1), 5), config(1, 2)))
    assert snapshot.removed(4)
    snapshot.track([change(6, 1, 2, 4)])
    assert not snapshot.removed(4)


def test_forget_since_never_drops_the_base() -> None:
    base = StoredMembership(LogId(LeaderId(1, 1), 5), config(1, 2))
    log = MembershipLog(base)
    log.track([change(6, 1, 2, 3)])
    log.forget_since(3)
    assert log.effective == base


def test_rebase_keeps_only_memberships_past_the_index() -> None:
    log = MembershipLog()
    log.track([change(5, 1, 2), change(8, 1, 2, 3)])
    snapshot_base = StoredMembership(LogId(LeaderId(1, 1), 3), config(1))
    log.rebase(snapshot_base, 3)
    assert voters_at(log, 3) == [[1]]
    assert voters_at(log, 6) == [[1, 2]]  # the first one past the base is kept
    assert voters_at(log, 9) == [[1, 2, 3]]
    at_the_index = MembershipLog()
    at_the_index.track([change(3, 1, 2), change(8, 1, 2, 3)])
    at_the_index.rebase(snapshot_base, 3)
    assert at_the_index.at(3) == snapshot_base  # one at the index itself is replaced
