"""The in-memory view of the log that is not yet purged.

The durable copy lives in a ``LogStore``. The view knows the log id of every unpurged
entry (snapshots bound how many) and holds the entries themselves for a suffix of the
log: the newest ones, which replication and apply need, and at most about
``Config.max_in_memory_log_bytes`` of older ones. Applied entries on disk beyond that
are evicted (their log ids stay) and a leader reads them back from the store for a
follower that lags that far. Entries are detached from the buffers they were decoded
from on the way in, so the view's memory follows its entries, not the request bodies
they came in, and an evicted entry's memory is really freed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def entry_bytes(entry: Entry) -> int:
    """What an entry costs the view, as the back-pressure counts it: its application data."""
    payload = entry.payload
    return len(payload.data) if isinstance(payload, Normal) else 0


def entries_to_evict(sizes: Iterable[int], held_bytes: int, evictable: int, max_bytes: int) -> int:
    """How many of the oldest held entries to drop so that at most ``max_bytes`` stay held.

    ``sizes`` are the held entries' sizes, oldest first, summing to ``held_bytes``; only
    the first ``evictable`` of them may go (they are applied and on disk). The oldest go
    first: a follower far behind reads them from the store anyway, while the newest are
    what followers in step are sent next.
    """
    count = 0
    for size in sizes:
        if held_bytes <= max_bytes or count >= evictable:
            break
        held_bytes -= size
        count += 1
    return count


class RaftLog:
    """Log ids of every unpurged entry; the entries themselves from ``first_held`` on.

    ``durable`` is the last index known to be in the store: entries given to the
    constructor came from it; an appended one counts only once ``mark_durable`` says
    so (a leader puts entries here before its own write returns). Only entries that are
    applied and durable are ever evicted: the rest may be needed to apply, and a store
    read would not find them.
    """

    __slots__ = ("_held", "_ids", "durable", "held_bytes", "last_purged")

    def __init__(
        self, last_purged: LogId | None = None, entries: list[Entry] | None = None
    ) -> None:
        self.last_purged = last_purged
        self._held: list[Entry] = [detach_entry(e) for e in entries or ()]
        self._ids: list[LogId] = [e.log_id for e in self._held]
        self.held_bytes = sum(entry_bytes(e) for e in self._held)
        """The application bytes of the entries held in memory."""
        first = self.first_index
        for offset, entry in enumerate(self._held):
            if entry.log_id.index != first + offset:
                raise ValueError(f"log is not consecutive at {entry.log_id}")
        self.durable = self.last_index

    @property
    def first_index(self) -> int:
        """Index of the first unpurged entry (also when there is none)."""
        return log_index(self.last_purged) + 1

    @property
    def first_held(self) -> int:
        """Index of the first entry held in memory; the ones before it are in the store only."""
        return self.last_index + 1 - len(self._held)

    @property
    def last_log_id(self) -> LogId | None:
        return self._ids[-1] if self._ids else self.last_purged

    @property
    def last_index(self) -> int:
        return log_index(self.last_log_id)

    def __len__(self) -> int:
        """How many entries are unpurged (held in memory or not)."""
        return len(self._ids)

    @property
    def held_entries(self) -> int:
        """How many entries are held in memory (``held_bytes`` is their application data)."""
        return len(self._held)

    def log_id_at(self, index: int) -> LogId | None:
        """The log id at ``index`` (None for -1); KeyError if purged (but the last) or beyond."""
        if index == -1:
            return None
        if self.last_purged is not None and index == self.last_purged.index:
            return self.last_purged
        pos = index - self.first_index
        if 0 <= pos < len(self._ids):
            return self._ids[pos]
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
        """The entry at ``index``; KeyError if it is purged, evicted or beyond the end."""
        pos = index - self.first_held
        if pos < 0 or pos >= len(self._held):
            raise KeyError(index)
        return self._held[pos]

    def slice(self, start: int, stop: int) -> list[Entry]:
        """Entries with ``start <= index < stop``; ``start`` must be neither purged nor evicted."""
        first = self.first_held
        if start < self.first_index or (start < first and start < stop):
            raise KeyError(start)
        return self._held[max(0, start - first) : max(0, stop - first)]

    def append(self, entries: list[Entry]) -> None:
        """Add entries at the end; they are not durable until ``mark_durable`` says so."""
        if entries and entries[0].log_id.index != self.last_index + 1:
            raise ValueError(f"append at {entries[0].log_id.index}, expected {self.last_index + 1}")
        detached = [detach_entry(e) for e in entries]
        self._held.extend(detached)
        self._ids.extend(e.log_id for e in detached)
        self.held_bytes += sum(entry_bytes(e) for e in detached)

    def mark_durable(self, index: int) -> None:
        """The store holds every entry up to ``index`` (its append returned)."""
        self.durable = max(self.durable, min(index, self.last_index))

    def truncate(self, since: int) -> None:
        """Drop entries with ``index >= since``."""
        cut = max(0, since - self.first_held)
        del self._ids[max(0, since - self.first_index) :]
        self.held_bytes -= sum(entry_bytes(e) for e in self._held[cut:])
        del self._held[cut:]
        self.durable = min(self.durable, self.last_index)

    def purge(self, upto: LogId) -> None:
        """Drop entries with ``index <= upto.index``; ``upto`` becomes the last purged id."""
        if self.last_purged is not None and upto.index <= self.last_purged.index:
            return
        cut = max(0, upto.index - self.first_held + 1)
        del self._ids[: max(0, upto.index - self.first_index + 1)]
        self.held_bytes -= sum(entry_bytes(e) for e in self._held[:cut])
        del self._held[:cut]
        self.last_purged = upto
        self.durable = max(self.durable, upto.index)  # what a snapshot covers is kept there

    def evict(self, applied: int, max_bytes: int) -> int:
        """Drop the oldest applied, durable entries while more than ``max_bytes`` are held.

        Their log ids stay; the entries are in the store (``LogStore.read_entries``).
        Returns how many were dropped.
        """
        if self.held_bytes <= max_bytes:
            return 0
        evictable = min(applied, self.durable) - self.first_held + 1
        count = entries_to_evict(
            (entry_bytes(e) for e in self._held), self.held_bytes, evictable, max_bytes
        )
        if count:
            self.held_bytes -= sum(entry_bytes(e) for e in self._held[:count])
            del self._held[:count]
        return count


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
