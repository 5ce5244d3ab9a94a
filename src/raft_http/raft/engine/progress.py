"""The leader's view of one follower, after etcd-io/raft's ``tracker/progress.go``.

``matching`` is the last log id known to be on the follower; ``next_index`` the first
index to send it. In ``PROBE`` the leader does not know where the two logs meet: it
sends one request, and on a ``Conflict`` it halves the distance between the known
match and the probed index (a binary search, so a follower far behind costs log2(n)
round trips, not n). In ``REPLICATE`` the follower acknowledged the last request and
the leader streams from there: each request sent moves ``next_index`` past it at once, so
several can be in flight (``window``); an error falls back to probing from the match. In
``SNAPSHOT`` the entries it needs are purged, and a snapshot is on the way.
"""

from __future__ import annotations

from enum import StrEnum

from ...types import LogId, log_index


class ProgressState(StrEnum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Progress:
    """Where one follower's log stands, and what to send it next."""

    __slots__ = ("acked_at", "entries_limit", "in_flight", "matching", "next_index", "state")

    def __init__(self, next_index: int, entries_limit: int) -> None:
        self.matching: LogId | None = None
        self.next_index = next_index
        self.entries_limit = entries_limit
        self.state = ProgressState.PROBE
        self.in_flight: int | None = None
        """Last index of the request awaiting an answer (-1 for a heartbeat), or None."""
        self.acked_at = float("-inf")
        """Send time of the newest request the follower answered (for read-index checks)."""

    def needs_snapshot(self, last_purged: LogId | None) -> bool:
        """The entry before ``next_index`` is purged: only a snapshot can bring it on."""
        return self.next_index - 1 < log_index(last_purged)

    def has_more(self, last_index: int) -> bool:
        """The leader's log holds entries not yet sent to this follower."""
        return self.next_index <= last_index

    def batch(self, last_index: int) -> tuple[int, int]:
        """``(start, stop)``: the indexes of the next AppendEntries, ``start <= i < stop``."""
        start = self.next_index
        return start, min(start + self.entries_limit, last_index + 1)

    def window(self, max_in_flight: int) -> int:
        """How many requests may be in flight: one while probing, none while a snapshot is."""
        if self.state is ProgressState.REPLICATE:
            return max(1, max_in_flight)
        return 1 if self.state is ProgressState.PROBE else 0

    def sent(self, last_index: int) -> None:
        """A request ending at ``last_index`` is on its way; when replicating, send past it."""
        self.in_flight = last_index
        if self.state is ProgressState.REPLICATE:
            self.next_index = max(self.next_index, last_index + 1)

    def sending_snapshot(self) -> None:
        self.state = ProgressState.SNAPSHOT
        self.in_flight = None

    def matched(self, matching: LogId | None, sent_at: float) -> bool:
        """The follower holds the leader's log up to ``matching``; True if that is news.

        ``matching`` never goes back: a reordered, older answer cannot undo a newer one.
        """
        advanced = log_index(matching) > log_index(self.matching)
        if advanced:
            self.matching = matching
        if self.state is ProgressState.REPLICATE:  # requests sent past it are still in flight
            self.next_index = max(self.next_index, log_index(self.matching) + 1)
        else:
            self.next_index = log_index(self.matching) + 1
        self.acked_at = max(self.acked_at, sent_at)
        self.state = ProgressState.REPLICATE
        self.in_flight = None
        return advanced

    def conflict(self, prev_index: int) -> None:
        """The follower lacks the entry at ``prev_index``: probe halfway back to the match.

        If it lacks an entry it had acknowledged (it lost its disk), the match is unknown.
        """
        if log_index(self.matching) >= prev_index:
            self.matching = None
        self.next_index = (log_index(self.matching) + prev_index) // 2 + 1
        self.state = ProgressState.PROBE
        self.in_flight = None

    def too_large(self, entries_hint: int) -> None:
        """The follower refused the batch as too large: send fewer entries, at least one."""
        self.entries_limit = max(1, min(self.entries_limit - 1, entries_hint))
        self.failed()

    def failed(self) -> None:
        """The request got no answer: nothing is learnt, the next one may be sent.

        Requests sent past the match are forgotten: resend from the match, probing.
        """
        self.in_flight = None
        if self.state is ProgressState.REPLICATE:
            self.next_index = log_index(self.matching) + 1
            self.state = ProgressState.PROBE
