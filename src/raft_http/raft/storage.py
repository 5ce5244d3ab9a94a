"""What the Raft core asks of storage: a durable log with the vote, and a state machine.

After Openraft's split into ``RaftLogStorage`` and ``RaftStateMachine``. The core
makes every log write (``append``, ``truncate``, ``purge``, ``save_vote``) from one task,
one at a time, in order (``LogWriter``), and awaits each call; implementations must
never block the event loop (do file or database work in a worker thread) and
must have made a write durable before the awaitable returns.

One optional method is not in the protocol, and is the one exception to "never block
the event loop": ``append_inline(entries) -> bool``. The core calls it, where a store
has it, for a follower's appends, whose answer waits on the commit anyway, through the
same ordered writer as every other write. A store that offers it must:

- return True only once the entries are durable, as ``append``'s return means;
- return False, having changed nothing, when it would rather not (then ``append`` is
  called): always while any earlier call of the store is still running, even one whose
  awaiting task was cancelled, so that nothing is overtaken or run concurrently;
- raise ``StorageError`` where ``append`` would.

``SqliteLogStore`` takes appends of up to 256 KiB while its worker thread is idle, and
saves the two thread hand-offs; the loop waits for one commit meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol

from msgspec import Struct

from ..types import Entry, LogId, Vote


class StorageError(Exception):
    """Storage failed; the core treats it as fatal and stops rather than risk a wrong answer."""


class LogState(Struct, frozen=True):
    """The ends of the stored log: the last purged entry and the last entry (either may be None).

    When every entry was purged, ``last_log_id == last_purged_log_id``.
    """

    last_purged_log_id: LogId | None
    last_log_id: LogId | None


class LogStore(Protocol):
    """The durable log, the vote and the last known committed log id."""

    async def read_vote(self) -> Vote | None:
        """The vote last saved, or None on a fresh store."""
        ...

    async def save_vote(self, vote: Vote) -> None:
        """Persist the vote; durable (fsynced) on return: a vote is never granted before."""
        ...

    async def read_committed(self) -> LogId | None:
        """The committed log id last saved (may lag the real one), or None."""
        ...

    async def save_committed(self, committed: LogId | None) -> None:
        """Remember how far the log is known committed; need not be fsynced."""
        ...

    async def get_log_state(self) -> LogState: ...

    async def read_entries(self, start: int, stop: int) -> list[Entry]:
        """Entries with ``start <= index < stop`` that are stored, in index order."""
        ...

    async def append(self, entries: Sequence[Entry]) -> None:
        """Append entries (consecutive indexes, following the last one) in one durable batch."""
        ...

    async def truncate(self, since: int) -> None:
        """Delete every entry with ``index >= since``; durable on return."""
        ...

    async def purge(self, upto: LogId) -> None:
        """Delete every entry with ``index <= upto.index`` and remember ``upto`` as last purged."""
        ...

    async def close(self) -> None: ...


class StateMachine(Protocol):
    """The application's state, fed committed entries in log order.

    It need not track log ids or membership: the core does, and stores them with
    each snapshot's metadata.
    """

    async def apply(self, entries: Sequence[Entry]) -> list[Any]:
        """Apply committed entries in order; one response per entry (None for blank/membership)."""
        ...

    def begin_snapshot(self) -> Callable[[BinaryIO], None]:
        """Capture the current state now (cheaply, e.g. a copy) and return a writer for it.

        The core calls this between two applies and runs the returned writer in a
        worker thread, so the writer must not touch the live state.
        """
        ...

    async def install_snapshot(self, data: BinaryIO) -> None:
        """Replace the whole state with the snapshot read from ``data``, or change nothing.

        Raise if ``data`` is not a snapshot this state machine can load, leaving the
        current state exactly as it was: the core then refuses the snapshot
        (``SnapshotRejected``) and keeps its own snapshot and log untouched.
        """
        ...
