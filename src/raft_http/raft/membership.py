"""The memberships a node's log holds, after Openraft's ``MembershipState``.

A membership takes effect as soon as its entry is appended, committed or not, so
the effective one is simply the last. Older ones are kept only as far back as
something may ask about them: the membership at a log index (for a snapshot's
metadata, or to know whether a committed config still has this node as a voter).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from ..types import Entry, Membership, MembershipChange, StoredMembership, log_index

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
