"""The log's storage writes, run in order by one task, consecutive appends in one batch.

Why it exists: the core decides under its lock (accept the leader, find a conflict, put
entries in the in-memory log) and must not hold that lock across an fsync, or a follower
writes and fsyncs each AppendEntries of a pipelined stream separately, in series. The
core queues the matching storage operation here instead and awaits its future only
where an answer depends on it (a follower's ``Success``, a granted vote), outside the
lock. Appends queued while a write is in progress are written together, in one
``LogStore.append`` call: one transaction, one fsync (group commit).

The rules that keep this safe:

- Operations run in the order they were queued, one at a time: a truncate never
  overtakes the appends queued before it, a purge never runs before the append of the
  entries it covers, and the store sees one mutating call at a time, as its protocol
  asks. Only appends that directly follow each other in the queue are merged, so a
  merged batch is consecutive and never spans a truncate.
- After each operation the durable log is exactly the in-memory log as it was when that
  operation was queued; ``flushed`` is its last log id. A node that counts its own log
  toward a quorum counts it only up to there (and only where the in-memory log still
  holds that log id: see ``Raft._self_matched``).
- A storage error is fatal: ``on_error`` stops the node and every queued operation
  fails with ``Fatal``, so no answer that depends on it is ever sent.
- ``stop`` lets the write in progress finish (its files are then complete for the
  storage's owner to close) and fails what was queued behind it.

An append queued with ``inline=True`` (a follower's, whose answer waits on it) is written
on the event loop's thread when the store offers ``append_inline`` and takes it: no
hand-off to a worker thread and back. A leader's append stays in the worker: the leader
sends its entries before its own fsync, and a commit on the loop would hold those sends
back behind it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..errors import Fatal
from ..types import Entry, LogId, Vote, log_index
from .storage import LogStore, StorageError

log = logging.getLogger(__name__)


class _Op:
    __slots__ = ("entries", "future", "inline", "kind", "log_id", "since", "vote", "what")

    def __init__(self, kind: str, future: asyncio.Future[None]) -> None:
        self.kind = kind
        self.future = future
        self.entries: list[Entry] = []
        self.since = 0
        self.log_id: LogId | None = None
        self.vote: Vote | None = None
        self.what = "writing the log"
        self.inline = False


class LogWriter:
    """Runs ``LogStore`` writes in queue order; merges consecutive appends into one call."""

    def __init__(
        self,
        store: LogStore,
        flushed: LogId | None,
        on_flushed: Callable[[], None],
        on_error: Callable[[str], None],
    ) -> None:
        self._store = store
        self._append_inline: Callable[[list[Entry]], bool] | None = getattr(
            store, "append_inline", None
        )
        self.flushed = flushed
        """The last log id of the durable log (every operation before it is done)."""
        self._on_flushed = on_flushed
        self._on_error = on_error
        self._queue: collections.deque[_Op] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self._last: asyncio.Future[None] | None = None
        self._failed: str | None = None
        self._loop = asyncio.get_running_loop()
        self.batches = 0
        """Store calls made (a merged batch of appends counts once)."""
        self.inline_batches = 0
        """Of those, appends written on the event loop's thread (``append_inline``)."""

    # --- queueing (no await: the order of these calls is the order on disk) ---------

    def append(self, entries: list[Entry], *, inline: bool = False) -> asyncio.Future[None]:
        """Queue an append; ``inline``: the caller waits on it, write it on the loop if the
        store can (see the module's docstring)."""
        op = self._queue_op("append")
        op.entries = entries
        op.inline = inline
        return op.future

    def truncate(self, since: int, last_kept: LogId | None) -> asyncio.Future[None]:
        """Delete entries from ``since`` on; ``last_kept`` is the log id left last."""
        op = self._queue_op("truncate")
        op.since = since
        op.log_id = last_kept
        return op.future

    def purge(self, upto: LogId, what: str = "") -> asyncio.Future[None]:
        """Delete entries up to ``upto``; ``what`` names the cause in a failure's reason."""
        op = self._queue_op("purge")
        op.log_id = upto
        op.what = what or f"purging the log up to {upto.index}"
        return op.future

    def save_vote(self, vote: Vote) -> asyncio.Future[None]:
        op = self._queue_op("vote")
        op.vote = vote
        return op.future

    def sync(self) -> asyncio.Future[None]:
        """A future done once every operation queued so far is durable."""
        if self._last is not None and not self._last.done():
            return self._last
        future = self._loop.create_future()
        if self._failed is not None:
            future.set_exception(Fatal(self._failed))
        else:
            future.set_result(None)
        return future

    @property
    def idle(self) -> bool:
        """Nothing is queued or being written."""
        return self._last is None or self._last.done()

    def _queue_op(self, kind: str) -> _Op:
        future: asyncio.Future[None] = self._loop.create_future()
        # Nobody may await it (a leader's append); do not log "exception never retrieved".
        future.add_done_callback(_consume)
        op = _Op(kind, future)
        if self._failed is not None:
            future.set_exception(Fatal(self._failed))
            return op
        self._queue.append(op)
        self._last = future
        self._wake.set()
        return op

    # --- the writing task -------------------------------------------------------------

    async def run(self) -> None:
        """The writing task's body (its owner spawns it); ends on ``stop`` or an error."""
        self._task = asyncio.current_task()
        while self._failed is None:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            ops = self._take()
            try:
                # In this task, not one of its own: ``stop`` waits for this task, so for the
                # write in progress. The node never cancels it (``Raft._stop`` and ``fail``
                # leave it out). Cancelled by anything else (an event loop torn down without
                # ``shutdown``), it fails the write's futures and does not wait for the
                # store call; ``SqliteLogStore.close`` still runs after it, on the same thread.
                if self._written_inline(ops):
                    self.inline_batches += 1
                else:
                    await self._write(ops)
            except StorageError as e:
                self._fail(f"{ops[0].what} failed: {e}", ops)
                self._on_error(self._failed or str(e))
                return
            except asyncio.CancelledError:
                self._fail("the node stopped", ops)
                raise
            self.batches += 1
            self.flushed = self._flushed_after(ops[-1])
            for op in ops:
                op.future.set_result(None)
            del ops, op  # do not pin the entries (and the request bodies) while idle
            self._on_flushed()

    def _take(self) -> list[_Op]:
        """The next operation, with every append that directly follows it if it is one."""
        first = self._queue.popleft()
        ops = [first]
        if first.kind == "append":
            queue = self._queue
            while queue and queue[0].kind == "append":
                ops.append(queue.popleft())
        return ops

    def _written_inline(self, ops: list[_Op]) -> bool:
        """Write ``ops`` on this thread if they are all inline appends and the store takes them."""
        append_inline = self._append_inline
        if append_inline is None or ops[0].kind != "append":
            return False
        for op in ops:
            if not op.inline:
                return False
        if len(ops) == 1:
            return append_inline(ops[0].entries)
        return append_inline([e for o in ops for e in o.entries])

    def _write(self, ops: list[_Op]) -> Coroutine[Any, Any, None]:
        op = ops[0]
        store = self._store
        if op.kind == "append":
            if len(ops) == 1:
                return store.append(op.entries)
            return store.append([e for o in ops for e in o.entries])
        if op.kind == "truncate":
            return store.truncate(op.since)
        if op.kind == "purge":
            assert op.log_id is not None
            return store.purge(op.log_id)
        assert op.vote is not None
        return store.save_vote(op.vote)

    def _flushed_after(self, op: _Op) -> LogId | None:
        if op.kind == "append":
            return op.entries[-1].log_id if op.entries else self.flushed
        if op.kind == "truncate":
            return op.log_id
        if op.kind == "purge" and log_index(op.log_id) > log_index(self.flushed):
            return op.log_id  # everything purged: the purged id is the last one
        return self.flushed

    def _fail(self, reason: str, ops: list[_Op]) -> None:
        """Fail ``ops`` and everything queued; later operations fail at once."""
        if self._failed is None:
            self._failed = reason
        for op in [*ops, *self._queue]:
            if not op.future.done():
                op.future.set_exception(Fatal(reason))
        self._queue.clear()

    async def stop(self, reason: str = "node shut down") -> None:
        """Finish the write in progress and fail what is queued behind it; ``run`` then ends."""
        self._fail(reason, [])
        self._wake.set()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            # It finishes the write in progress, settles its futures, then ends.
            await asyncio.gather(task, return_exceptions=True)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
