"""An in-memory ``LogStore`` for tests, and the log rules every store enforces.

The rules (``check_append``, ``state_after_truncate``, ``state_after_purge``) live
here, beside the simplest store that keeps them, so the SQLite store applies the
very same ones: a store that accepts a gap or an overlap hides a core bug until
it corrupts a log, so both stores refuse.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..types import Entry, LogId, Vote, log_index
from .engine.log import detach_entry
from .storage import LogState, StorageError


def check_append(state: LogState, entries: Sequence[Entry]) -> None:
    """Raise ``StorageError`` unless ``entries`` continue the log of ``state`` exactly.

    Indexes must be consecutive and start right after the last entry (or the last
    purged one, or at 0 on an empty store); terms never go down.
    """
    last = state.last_log_id
    expected = log_index(last) + 1
    last_term = -1 if last is None else last.leader_id.term
    for entry in entries:
        log_id = entry.log_id
        if log_id.index != expected:
            raise StorageError(
                f"append out of order: expected index {expected}, got {log_id.index}"
                f" (last log id {last})"
            )
        if log_id.leader_id.term < last_term:
            raise StorageError(
                f"append of {log_id} after an entry of term {last_term}: terms never go down"
            )
        expected += 1
        last_term = log_id.leader_id.term


def state_after_purge(state: LogState, upto: LogId) -> LogState | None:
    """The log state once every entry up to ``upto`` is purged; None if nothing changes.

    Purging at or below the last purged index is a no-op (purges are idempotent
    and never move back). Purging past the last entry empties the log, and the
    log then ends at ``upto``.
    """
    purged = state.last_purged_log_id
    if purged is not None and upto.index <= purged.index:
        return None
    last = state.last_log_id
    if last is None or last.index <= upto.index:
        return LogState(last_purged_log_id=upto, last_log_id=upto)
    return LogState(last_purged_log_id=upto, last_log_id=last)


class MemoryLogStore:
    """A ``LogStore`` kept in a list: nothing survives the process (tests only).

    Entries are held from ``_first`` on; purged and truncated ones are dropped.
    """

    def __init__(self) -> None:
        self._vote: Vote | None = None
        self._committed: LogId | None = None
        self._entries: list[Entry] = []
        self._first = 0  # the index of _entries[0]
        self._state = LogState(last_purged_log_id=None, last_log_id=None)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the log store is closed")

    async def read_vote(self) -> Vote | None:
        self._check_open()
        return self._vote

    async def save_vote(self, vote: Vote) -> None:
        self._check_open()
        self._vote = vote

    async def read_committed(self) -> LogId | None:
        self._check_open()
        return self._committed

    async def save_committed(self, committed: LogId | None) -> None:
        self._check_open()
        self._committed = committed

    async def get_log_state(self) -> LogState:
        self._check_open()
        return self._state

    async def read_entries(self, start: int, stop: int) -> list[Entry]:
        self._check_open()
        lo = max(start, self._first) - self._first
        hi = min(stop, self._first + len(self._entries)) - self._first
        if hi <= lo:
            return []
        return self._entries[lo:hi]

    async def append(self, entries: Sequence[Entry]) -> None:
        self._check_open()
        if not entries:
            return
        check_append(self._state, entries)
        if not self._entries:
            self._first = entries[0].log_id.index
        self._entries.extend(detach_entry(e) for e in entries)
        self._state = LogState(self._state.last_purged_log_id, entries[-1].log_id)

    async def truncate(self, since: int) -> None:
        """Delete every entry with ``index >= since``; the log then ends before ``since``.

        Truncating into the purged prefix deletes every stored entry: the log then
        ends at the last purged entry.
        """
        self._check_open()
        keep = max(0, since - self._first)
        if keep >= len(self._entries):
            return
        del self._entries[keep:]
        last = self._entries[-1].log_id if self._entries else self._state.last_purged_log_id
        self._state = LogState(self._state.last_purged_log_id, last)

    async def purge(self, upto: LogId) -> None:
        self._check_open()
        new_state = state_after_purge(self._state, upto)
        if new_state is None:
            return
        drop = upto.index + 1 - self._first
        if drop >= len(self._entries):
            self._entries.clear()
            self._first = upto.index + 1
        elif drop > 0:
            del self._entries[:drop]
            self._first = upto.index + 1
        self._state = new_state

    async def close(self) -> None:
        self._closed = True
