"""The durable ``LogStore``: one SQLite file in WAL mode, written from one worker thread.

Why this shape:

- ``synchronous=FULL`` in WAL mode fsyncs the WAL on every commit, so a vote or an
  appended batch is on disk before the awaitable returns (Raft's "persist before
  answering"). Each ``append`` is one transaction: one fsync per batch, not per entry.
- ``sqlite3`` blocks, so every awaited call runs on a single dedicated worker thread;
  the event loop never waits on the disk for those, and calls are serialized.
- ``append_inline`` is the one exception: a small append made while the worker thread
  has nothing queued or running runs on the calling thread, the loop's, which it blocks
  for one commit. A follower's answer to its leader waits on that commit anyway, and
  the two hand-offs to the worker and back cost more than the commit (measured: about
  0.4 ms each way on a busy 2-core machine, against 0.3-0.9 ms for the commit).
- The log state (first and last log ids) and the vote are cached, updated right after
  each commit by the thread that made it, so reads of them cost no thread hop and stay
  correct even when the awaiting task is cancelled mid-write.
- The commit index is saved with ``synchronous=NORMAL`` (no fsync) and the connection
  set back to ``FULL`` after. Should that fail, the store refuses every later call
  rather than go on committing without an fsync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from ..types import ENTRY, VOTE, Entry, LeaderId, LogId, Vote
from .memory_store import check_append, state_after_purge
from .storage import LogState, StorageError

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    node_id INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

_LOG_ID_OR_NONE: Final = msgspec.json.Decoder(LogId | None)
_ENCODER: Final = msgspec.json.Encoder()

DEFAULT_INLINE_APPEND_BYTES: Final = 256 * 1024
"""The largest append (encoded entries) ``append_inline`` writes on the calling thread."""

_VOTE_KEY: Final = "vote"
_COMMITTED_KEY: Final = "committed"
_PURGED_KEY: Final = "last_purged_log_id"


class SqliteLogStore:
    """A ``LogStore`` in one SQLite file; build it with ``await SqliteLogStore.open(path)``."""

    def __init__(
        self,
        path: Path,
        executor: concurrent.futures.ThreadPoolExecutor,
        conn: sqlite3.Connection,
        inline_append_bytes: int = DEFAULT_INLINE_APPEND_BYTES,
    ) -> None:
        """Use ``open``: this only wires up a connection already made on ``executor``'s thread."""
        self.path = path
        self._executor = executor
        self._conn = conn
        self._inline_append_bytes = inline_append_bytes
        # Calls handed to the worker thread (counted by the loop's thread), calls it has
        # finished (by the worker), calls cancelled before they started (by the loop's
        # thread). Each counter has one writer; until the first equals the other two
        # together, the connection belongs to the worker.
        self._submitted = 0
        self._finished = 0
        self._dropped = 0
        self._unsafe: str | None = None  # why durable writes can no longer be promised
        self._vote: Vote | None = None
        self._committed: LogId | None = None
        self._state = LogState(last_purged_log_id=None, last_log_id=None)
        self._closed = False

    @classmethod
    async def open(
        cls, path: str | Path, *, inline_append_bytes: int = DEFAULT_INLINE_APPEND_BYTES
    ) -> SqliteLogStore:
        """Open (or create, with its parent directories) the log at ``path``.

        Checks on the way that the stored log is a consecutive run of indexes
        following the last purged one; raises ``StorageError`` if not.
        ``inline_append_bytes`` bounds ``append_inline`` (0: never on the caller's thread).
        """
        if inline_append_bytes < 0:
            raise ValueError(f"inline_append_bytes must be >= 0, got {inline_append_bytes!r}")
        path = Path(path)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"sqlite-log-{path.name}"
        )
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except BaseException as exc:
            executor.shutdown(wait=False)
            if isinstance(exc, sqlite3.Error | OSError):
                raise StorageError(f"cannot open the log at {path}: {exc}") from exc
            raise
        store = cls(path, executor, conn, inline_append_bytes)
        try:
            await store._run(store._load)
        except BaseException:
            await store.close()
            raise
        return store

    # --- the worker thread's side (every method below runs on it; ``_insert`` also
    # runs on the loop's thread, from ``append_inline``) ----------------------------

    def _load(self) -> None:
        conn = self._conn
        vote = self._get_meta(_VOTE_KEY)
        committed = self._get_meta(_COMMITTED_KEY)
        purged_raw = self._get_meta(_PURGED_KEY)
        self._vote = None if vote is None else VOTE.decode(vote)
        self._committed = None if committed is None else _LOG_ID_OR_NONE.decode(committed)
        purged = None if purged_raw is None else _LOG_ID_OR_NONE.decode(purged_raw)
        lo, hi, count = conn.execute("SELECT min(idx), max(idx), count(*) FROM entries").fetchone()
        if count and hi - lo + 1 != count:
            raise StorageError(f"the stored log has gaps: {count} entries in [{lo}, {hi}]")
        if count and purged is not None and lo != purged.index + 1:
            raise StorageError(f"the stored log starts at {lo}, but {purged} was purged")
        last = self._last_stored() or purged
        self._state = LogState(last_purged_log_id=purged, last_log_id=last)

    def _get_meta(self, key: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def _put_meta(self, key: str, value: bytes) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _last_stored(self) -> LogId | None:
        row = self._conn.execute(
            "SELECT idx, term, node_id FROM entries ORDER BY idx DESC LIMIT 1"
        ).fetchone()
        return None if row is None else LogId(LeaderId(row[1], row[2]), row[0])

    def _save_vote(self, vote: Vote) -> None:
        with self._conn:
            self._put_meta(_VOTE_KEY, VOTE.encode(vote))
        self._vote = vote

    def _save_committed(self, committed: LogId | None) -> None:
        # Need not be durable: commit without an fsync; the next FULL commit (or
        # checkpoint) carries it to disk with everything before it.
        conn = self._conn
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with conn:
                self._put_meta(_COMMITTED_KEY, _ENCODER.encode(committed))
        finally:
            try:
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                # The core shrugs off a failed commit-index save; a connection left
                # without fsyncs must not be: every later call fails (``_check_usable``).
                self._unsafe = f"cannot turn fsync back on after saving the commit index: {exc}"
                raise
        self._committed = committed

    def _read_entries(self, start: int, stop: int) -> list[Entry]:
        rows = self._conn.execute(
            "SELECT idx, payload FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, stop),
        ).fetchall()
        entries = []
        for idx, payload in rows:
            entry = ENTRY.decode(payload)
            if entry.log_id.index != idx:
                raise StorageError(f"entry at index {idx} says it is {entry.log_id}")
            entries.append(entry)
        return entries

    def _append(self, entries: Sequence[Entry]) -> None:
        check_append(self._state, entries)
        self._insert(_rows(entries), entries[-1].log_id)

    def _insert(self, rows: list[_Row], last: LogId) -> None:
        with self._conn:
            self._conn.executemany(
                "INSERT INTO entries (idx, term, node_id, payload) VALUES (?, ?, ?, ?)", rows
            )
        self._state = LogState(self._state.last_purged_log_id, last)

    def _truncate(self, since: int) -> None:
        with self._conn:
            deleted = self._conn.execute("DELETE FROM entries WHERE idx >= ?", (since,)).rowcount
        if deleted:
            last = self._last_stored() or self._state.last_purged_log_id
            self._state = LogState(self._state.last_purged_log_id, last)

    def _purge(self, upto: LogId) -> None:
        new_state = state_after_purge(self._state, upto)
        if new_state is None:
            return
        with self._conn:
            self._conn.execute("DELETE FROM entries WHERE idx <= ?", (upto.index,))
            self._put_meta(_PURGED_KEY, _ENCODER.encode(upto))
        self._state = new_state

    # --- the event loop's side ------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise StorageError(f"the log store {self.path} is closed")
        if self._unsafe is not None:
            raise StorageError(f"the log store {self.path} failed: {self._unsafe}")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        self._check_usable()
        loop = asyncio.get_running_loop()
        self._submitted += 1
        try:
            call = self._executor.submit(self._counted, fn, args)
        except RuntimeError as exc:  # the executor was shut down under us
            self._submitted -= 1
            raise StorageError(f"the log store {self.path} is closed") from exc
        call.add_done_callback(self._count_dropped)
        try:
            return await asyncio.wrap_future(call, loop=loop)
        except (sqlite3.Error, msgspec.DecodeError, OSError) as exc:
            raise StorageError(f"the log store {self.path} failed: {exc}") from exc

    def _counted(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        """Run ``fn`` on the worker; count it finished only once it has let go of the connection.

        Counted here, not where the call is awaited: a cancelled awaiter leaves the call
        running, and ``append_inline`` must not touch the connection until it is done.
        """
        try:
            return fn(*args)
        finally:
            self._finished += 1

    def _count_dropped(self, call: concurrent.futures.Future[Any]) -> None:
        # Cancelled only by the loop's thread, when its awaiter is cancelled before the
        # worker started the call (the worker then never runs ``_counted`` for it).
        if call.cancelled():
            self._dropped += 1

    @property
    def _worker_idle(self) -> bool:
        return self._submitted == self._finished + self._dropped

    def append_inline(self, entries: Sequence[Entry]) -> bool:
        """Append ``entries`` (one durable commit) on the calling thread; False if not done.

        Done only when no call is queued on or running in the worker thread, so the
        connection is this thread's alone and no queued call is overtaken, and when the
        encoded entries come to at most ``inline_append_bytes``. It blocks the event loop
        for one commit, an fsync: use it where the next step waits on that commit anyway.
        Raises ``StorageError`` as ``append`` does.
        """
        if not entries:
            return True
        if self._closed or not self._worker_idle:
            return False
        self._check_usable()
        check_append(self._state, entries)
        rows = _rows(entries)
        if sum(len(row[3]) for row in rows) > self._inline_append_bytes:
            return False
        try:
            self._insert(rows, entries[-1].log_id)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"the log store {self.path} failed: {exc}") from exc
        return True

    async def read_vote(self) -> Vote | None:
        if self._closed:
            raise StorageError(f"the log store {self.path} is closed")
        return self._vote

    async def save_vote(self, vote: Vote) -> None:
        await self._run(self._save_vote, vote)

    async def read_committed(self) -> LogId | None:
        if self._closed:
            raise StorageError(f"the log store {self.path} is closed")
        return self._committed

    async def save_committed(self, committed: LogId | None) -> None:
        await self._run(self._save_committed, committed)

    async def get_log_state(self) -> LogState:
        if self._closed:
            raise StorageError(f"the log store {self.path} is closed")
        return self._state

    async def read_entries(self, start: int, stop: int) -> list[Entry]:
        if stop <= start:
            return []
        return await self._run(self._read_entries, start, stop)

    async def append(self, entries: Sequence[Entry]) -> None:
        if entries:
            await self._run(self._append, list(entries))

    async def truncate(self, since: int) -> None:
        """Delete every entry with ``index >= since``; cut into the purged prefix, it ends there."""
        await self._run(self._truncate, since)

    async def purge(self, upto: LogId) -> None:
        await self._run(self._purge, upto)

    async def close(self) -> None:
        """Close the connection (on its thread) and stop the thread; later calls raise."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        except sqlite3.Error as exc:
            raise StorageError(f"closing the log store {self.path} failed: {exc}") from exc
        finally:
            self._executor.shutdown(wait=False)


def _connect(path: Path) -> sqlite3.Connection:
    """Open the database on the calling (worker) thread, in WAL mode with fsync on commit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Used by the worker thread, and by ``append_inline`` on the loop's thread while the
    # worker has nothing queued or running (``_worker_idle``): never by both at once.
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


_Row = tuple[int, int, int, bytes]


def _rows(entries: Sequence[Entry]) -> list[_Row]:
    return [
        (e.log_id.index, e.log_id.leader_id.term, e.log_id.leader_id.node_id, ENTRY.encode(e))
        for e in entries
    ]
