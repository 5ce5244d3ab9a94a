"""Simulated disks: a log store and a snapshot store whose unflushed writes a crash loses.

A ``SimDisk`` is what survives a crash. Each incarnation of a node gets a new
``SimLogStore`` and ``SimSnapshotStore`` over the same disk. A write takes a little
virtual time (the fsync); a crash during it loses it, or, with even odds, lets it
land (the data reached the disk, the acknowledgement did not reach the node).
Writes either land whole or not at all, as a SQLite transaction does. The
committed log id "need not be fsynced" (LogStore's contract), so it is only made
durable by the next fsynced write, and a crash may take it back.

After a crash the old incarnation's stores are dead: each call hangs forever, so
a task of the crashed node can neither change the disk nor learn anything more.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from raft_http.raft.memory_store import MemoryLogStore, check_append
from raft_http.raft.storage import LogState, StorageError
from raft_http.types import Entry, LogId, Snapshot, SnapshotMeta, Vote, log_id_key

from .loop import park_forever


@dataclass
class SimDisk:
    """The durable state of one node: its log store's content and its newest snapshot."""

    log: MemoryLogStore = field(default_factory=MemoryLogStore)
    committed: LogId | None = None  # durable; log._committed is the unflushed value
    snapshot: tuple[SnapshotMeta, bytes, str] | None = None
    writes: int = 0
    inline_writes: int = 0
    lost_writes: int = 0


_Write = Callable[[], Coroutine[Any, Any, None]]


def _run_now(write: Coroutine[Any, Any, None]) -> None:
    """Run a ``MemoryLogStore`` call (which never suspends) to its end, synchronously."""
    try:
        write.send(None)
    except StopIteration:
        return
    except StorageError:
        return  # a write the disk refused; it never landed
    write.close()
    raise RuntimeError("a MemoryLogStore call suspended")


class SimLogStore:
    """A ``LogStore`` over a ``SimDisk``: the rules of ``MemoryLogStore``, with fsync latency."""

    def __init__(self, disk: SimDisk, rng: random.Random, latency: Callable[[], float]) -> None:
        self.disk = disk
        self._rng = rng
        self._latency = latency
        self._in_flight: list[_Write] = []
        self.dead = False

    def crash(self) -> None:
        """Writes in flight land or not (a prefix of them, in order); then the store is dead."""
        self.dead = True
        land = self._rng.randrange(len(self._in_flight) + 1)
        for i, write in enumerate(self._in_flight):
            if i < land:
                _run_now(write())
            else:
                self.disk.lost_writes += 1
        self._in_flight.clear()
        # The commit index is saved without an fsync. A killed process leaves it with the
        # OS, so it survives; a power loss loses it. Either may happen.
        if self._rng.random() < 0.5:
            self.disk.log._committed = self.disk.committed

    async def _durable(self, write: _Write) -> None:
        """Wait for the "fsync", then apply ``write`` to the disk, unless the node crashed first."""
        if self.dead:
            await park_forever()
        self._in_flight.append(write)
        await asyncio.sleep(self._latency())
        if self.dead:  # crash() decided this write's fate
            await park_forever()
        self._in_flight.remove(write)
        await write()
        self.disk.committed = self.disk.log._committed  # an fsync flushes it too
        self.disk.writes += 1

    async def _read(self) -> None:
        if self.dead:
            await park_forever()

    async def read_vote(self) -> Vote | None:
        await self._read()
        return await self.disk.log.read_vote()

    async def save_vote(self, vote: Vote) -> None:
        await self._durable(lambda: self.disk.log.save_vote(vote))

    async def read_committed(self) -> LogId | None:
        await self._read()
        return await self.disk.log.read_committed()

    async def save_committed(self, committed: LogId | None) -> None:
        await self._read()
        await self.disk.log.save_committed(committed)  # not fsynced: see crash()

    async def get_log_state(self) -> LogState:
        await self._read()
        return await self.disk.log.get_log_state()

    async def read_entries(self, start: int, stop: int) -> list[Entry]:
        await self._read()
        return await self.disk.log.read_entries(start, stop)

    async def append(self, entries: Sequence[Entry]) -> None:
        # Check now, so a broken append fails at once, as a real store's would.
        check_append(self.disk.log._state, entries)
        entries = list(entries)
        await self._durable(lambda: self.disk.log.append(entries))

    def append_inline(self, entries: Sequence[Entry]) -> bool:
        """As ``SqliteLogStore`` does: taken only with no write in flight, then durable at
        once; declined at random otherwise, as a batch over its byte limit is.

        It takes no virtual time. A real one blocks its own process for an fsync; here
        all nodes share one loop, and advancing its clock would stall every node at once.
        No crash falls inside it either: that a write lands unacknowledged is left to the
        awaited writes (``crash``).
        """
        if not entries:
            return True
        if self.dead or self._in_flight or self._rng.random() < 0.3:
            return False
        check_append(self.disk.log._state, entries)
        entries = list(entries)
        _run_now(self.disk.log.append(entries))
        self.disk.committed = self.disk.log._committed  # an fsync flushes it too
        self.disk.writes += 1
        self.disk.inline_writes += 1
        return True

    async def truncate(self, since: int) -> None:
        await self._durable(lambda: self.disk.log.truncate(since))

    async def purge(self, upto: LogId) -> None:
        await self._durable(lambda: self.disk.log.purge(upto))

    async def close(self) -> None:
        return None


class SimSnapshotStore:
    """The newest snapshot on a ``SimDisk``; the duck type of ``SnapshotStore`` the core uses."""

    def __init__(self, disk: SimDisk, latency: Callable[[], float]) -> None:
        self.disk = disk
        self._latency = latency
        self.dead = False
        self.saved = 0

    def crash(self) -> None:
        self.dead = True

    async def latest(self) -> SnapshotMeta | None:
        if self.dead:
            await park_forever()
        return self.disk.snapshot[0] if self.disk.snapshot else None

    async def open_latest(self) -> Snapshot | None:
        if self.dead:
            await park_forever()
        if self.disk.snapshot is None:
            return None
        meta, data, sha256 = self.disk.snapshot
        return Snapshot(meta, io.BytesIO(data), sha256=sha256)

    async def save(self, meta: SnapshotMeta, write: Callable[[BinaryIO], None]) -> None:
        buffer = io.BytesIO()
        write(buffer)
        await self._save(meta, buffer.getvalue())

    async def save_from(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        data.seek(0)
        await self._save(meta, data.read())

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        if self.dead:
            await park_forever()
        await asyncio.sleep(self._latency())
        if self.dead:  # a snapshot is renamed into place only once complete: lost whole
            await park_forever()
        current = self.disk.snapshot
        if current is None or log_id_key(meta.last_log_id) >= log_id_key(current[0].last_log_id):
            self.disk.snapshot = (meta, data, hashlib.sha256(data).hexdigest())
        self.saved += 1
