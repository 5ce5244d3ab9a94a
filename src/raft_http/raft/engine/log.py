"""The in-memory mirror of the log that is not yet purged.

The durable copy lives in a ``LogStore``; the core keeps the unpurged tail in
memory too (snapshots bound its length), so replication and apply never wait on
storage reads. Entries are detached from the buffers they were decoded from on the
way in, so the log's memory follows its entries, not the request bodies they came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ...types import Entry, LogId, Normal, log_index


def detach_entry(entry: Entry) -> Entry:
    """The entry, with its application data copied if it is a view into a larger buffer.

    A ``Raw`` decoded from a request keeps the whole request buffer alive; an entry
    kept in memory must not pin a 300-entry batch for as long as the log keeps it.
    """
    payload = entry.payload
    if isinstance(payload, Normal):
        data = payload.data.copy()
        if data is not payload.data:
            return Entry(entry.log_id, Normal(data))
    return entry


class RaftLog:
    __slots__ = ("_entries", "last_purged")

    def __init__(
        self, last_purged: LogId | None = None, entries: list[Entry] | None = None
    ) -> None:
        self.last_purged = last_purged
        self._entries: list[Entry] = [detach_entry(e) for e in entries or ()]
        first = self.first_index
        for offset, entry in enumerate(self._entries):
            if entry.log_id.index != first + offset:
                raise ValueError(f"log is not consecutive at {entry.log_id}")

    @property
    def first_index(self) -> int:
        """Index of the first entry held (also when none is held)."""
        return log_index(self.last_purged) + 1

    @property
    def last_log_id(self) -> LogId | None:
        return self._entries[-1].log_id if self._entries else self.last_purged

    @property
    def last_index(self) -> int:
        return log_index(self.last_log_id)

    def __len__(self) -> int:
        return len(self._entries)

    def log_id_at(self, index: int) -> LogId | None:
        """The log id at ``index`` (None for -1); KeyError if purged (but the last) or beyond."""
        if index == -1:
            return None
        if self.last_purged is not None and index == self.last_purged.index:
            return self.last_purged
        pos = index - self.first_index
        if 0 <= pos < len(self._entries):
            return self._entries[pos].log_id
        raise KeyError(index)

    def matches(self, log_id: LogId | None) -> bool:
        """Whether the log holds exactly ``log_id`` (None, the empty prefix, always matches)."""
        if log_id is None:
            return True
        try:
            return self.log_id_at(log_id.index) == log_id
        except KeyError:
            return False

    def entry(self, index: int) -> Entry:
        pos = index - self.first_index
        if pos < 0 or pos >= len(self._entries):
            raise KeyError(index)
        return self._entries[pos]

    def slice(self, start: int, stop: int) -> list[Entry]:
        """Entries with ``start <= index < stop``; ``start`` must not be purged."""
        if start < self.first_index:
            raise KeyError(start)
        first = self.first_index
        return self._entries[start - first : max(0, stop - first)]

    def append(self, entries: list[Entry]) -> None:
        if entries and entries[0].log_id.index != self.last_index + 1:
            raise ValueError(f"append at {entries[0].log_id.index}, expected {self.last_index + 1}")
        self._entries.extend([detach_entry(e) for e in entries])

    def truncate(self, since: int) -> None:
        """Drop entries with ``index >= since``."""
        del self._entries[max(0, since - self.first_index) :]

    def purge(self, upto: LogId) -> None:
        """Drop entries with ``index <= upto.index``; ``upto`` becomes the last purged id."""
        if self.last_purged is not None and upto.index <= self.last_purged.index:
            return
        del self._entries[: max(0, upto.index - self.first_index + 1)]
        self.last_purged = upto


def prev_log_conflicts(log: RaftLog, prev_log_id: LogId | None) -> bool:
    """Whether an AppendEntries must be refused because the log lacks ``prev_log_id``.

    Up to the last purged id the log is committed, so it holds whatever the leader has
    there (Leader Completeness): only an unpurged ``prev_log_id`` is checked.
    """
    return log_index(prev_log_id) > log_index(log.last_purged) and not log.matches(prev_log_id)


class AppendPlan(NamedTuple):
    """What accepting a leader's entries does to the log: truncate, then append ``new``."""

    truncate_at: int | None
    new: list[Entry]


def plan_append(log: RaftLog, entries: Sequence[Entry]) -> AppendPlan:
    """Skip the entries the log already holds; truncate at the first that differs.

    Entries are never truncated when they agree (a stale, reordered request must not
    cut off a newer tail), and purged ones are taken as held (they are committed).
    """
    purged = log_index(log.last_purged)
    start = 0
    conflict: int | None = None
    while start < len(entries):
        log_id = entries[start].log_id
        if log_id.index > log.last_index:
            break
        if log_id.index > purged and log.log_id_at(log_id.index) != log_id:
            conflict = log_id.index
            break
        start += 1
    return AppendPlan(conflict, list(entries[start:]))
