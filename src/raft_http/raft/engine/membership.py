"""The memberships a node's log holds, after Openraft's ``MembershipState``.

A membership takes effect as soon as its entry is appended, committed or not, so
the effective one is simply the last. Older ones are kept only as far back as
something may ask about them: the membership at a log index (for a snapshot's
metadata, or to know whether a committed config still has this node as a voter).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ...types import Entry, Membership, MembershipChange, Node, StoredMembership, log_index
from ..errors import NotAllowed

EMPTY: Final = StoredMembership(None, Membership([], {}))
"""Before initialization: no voters, no nodes."""


class MembershipLog:
    """Memberships in log order; the first is the base (from a snapshot, or empty)."""

    __slots__ = ("_stored",)

    def __init__(self, base: StoredMembership = EMPTY) -> None:
        self._stored = [base]

    @property
    def effective(self) -> StoredMembership:
        """The last membership in the log, committed or not: the one in force."""
        return self._stored[-1]

    def removed(self, node_id: int) -> bool:
        """Whether ``node_id`` is out of the membership in force, having been in one before.

        A new learner catching up from the start of the log is in no membership yet:
        that is not being removed. Past a base from a snapshot or a compaction, earlier
        memberships are unknown, so a node in none of those held counts as removed; a
        learner that installed a snapshot older than its own addition reads so only
        until the entry adding it arrives.
        """
        if node_id in self.effective.membership.nodes:
            return False
        return self._stored[0].log_id is not None or any(
            node_id in stored.membership.nodes for stored in self._stored
        )

    def at(self, index: int) -> StoredMembership:
        """The membership in force at log ``index`` (the base if none is that old)."""
        for stored in reversed(self._stored):
            if log_index(stored.log_id) <= index:
                return stored
        return self._stored[0]

    def track(self, entries: Iterable[Entry]) -> bool:
        """Note the memberships among appended ``entries``; True if there was one."""
        found = False
        for entry in entries:
            if isinstance(entry.payload, MembershipChange):
                self._stored.append(StoredMembership(entry.log_id, entry.payload.membership))
                found = True
        return found

    def forget_since(self, index: int) -> None:
        """The log was truncated at ``index``: its memberships from there on are gone."""
        while len(self._stored) > 1 and log_index(self._stored[-1].log_id) >= index:
            self._stored.pop()

    def rebase(self, base: StoredMembership, after: int) -> None:
        """Start from ``base`` (a snapshot's), keeping only memberships past log ``after``."""
        self._stored = [base] + [m for m in self._stored[1:] if log_index(m.log_id) > after]

    def compact(self, upto: int) -> None:
        """The log was purged up to ``upto``: keep the membership in force there as the base."""
        self.rebase(self.at(upto), upto)


def voter_set(voters: Iterable[int]) -> list[int]:
    """The voters asked for, sorted and without repeats; a membership needs at least one."""
    new_voters = sorted(set(voters))
    if not new_voters:
        raise NotAllowed("the new membership needs at least one voter")
    return new_voters


def plan_change(current: Membership, voters: Iterable[int], *, retain: bool) -> list[Membership]:
    """The memberships to commit, in order, to make ``voters`` the voters (joint consensus).

    From a joint config, first finish it (its new config alone). Then, if the voters
    change, the joint config ``[old, new]``, and last the uniform ``[new]``. Learners
    stay learners. A voter left out of ``voters`` (of either config, when the change
    starts from a joint one) leaves the membership, unless ``retain``: then it stays
    as a learner. Every node in ``voters`` must be a member
    already (added as a learner first, so it has caught up before it counts).
    """
    new_voters = voter_set(voters)
    missing = [n for n in new_voters if n not in current.nodes]
    if missing:
        raise NotAllowed(f"nodes {missing} are not members; add them as learners first")
    former_voters = current.voter_ids()
    steps: list[Membership] = []
    if current.is_joint():
        current = Membership([current.configs[-1]], current.nodes)
        steps.append(current)
    old_voters = current.configs[0]
    if sorted(old_voters) != new_voters:
        steps.append(Membership([old_voters, new_voters], current.nodes))
    nodes = {
        n: node
        for n, node in current.nodes.items()
        if retain or n in new_voters or n not in former_voters
    }
    steps.append(Membership([new_voters], nodes))
    return steps


def plan_add_learner(current: Membership, node_id: int, node: Node) -> Membership | None:
    """The membership with ``node_id`` added as a learner; None if it is already there."""
    known = current.nodes.get(node_id)
    if known == node:
        return None
    if known is not None:
        raise NotAllowed(f"node {node_id} is already a member at another address")
    return Membership(current.configs, {**current.nodes, node_id: node})


def plan_remove_learners(current: Membership, node_ids: Iterable[int]) -> Membership | None:
    """The membership without the learners ``node_ids`` (Openraft's ``RemoveNodes``).

    None when none of them is a member. A voter cannot be removed this way: demote it
    with a membership change first, so the quorum arithmetic never changes in one step.
    """
    ids = set(node_ids)
    voters = sorted(ids & current.voter_ids())
    if voters:
        raise NotAllowed(f"nodes {voters} are voters; change the membership to remove them")
    if not ids & current.nodes.keys():
        return None
    nodes = {n: node for n, node in current.nodes.items() if n not in ids}
    return Membership(current.configs, nodes)
