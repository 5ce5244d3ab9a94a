"""Partial snapshot uploads kept on disk, so a dropped transfer resumes where it stopped.

A receiver holds at most one partial upload per snapshot id; a fresh upload
supersedes the others (a leader only ever sends its latest snapshot). Every
write and delete runs in a thread, one chunk at a time, so neither the event loop
nor memory grows with the snapshot. No aiohttp here: any transport may use it.

Writers hold a *lease* (``SpoolLease``). Whoever claims a snapshot id later takes
the id over, so a stale writer (a connection the server has not yet noticed is
dead) cannot interleave its bytes with the resumed upload: its next append
raises ``SpoolLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_SUFFIX = ".snapshot-part"


class SpoolError(Exception):
    """Base of the spool's refusals."""


class OffsetMismatch(SpoolError):
    """An upload does not start at the bytes held for its snapshot id: resume at ``expected``."""

    def __init__(self, snapshot_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"snapshot {snapshot_id!r}: {expected} bytes held, upload starts at offset {got}"
        )
        self.snapshot_id = snapshot_id
        self.expected = expected
        self.got = got


class ChecksumConflict(SpoolError):
    """A resume names another sha256 than the upload it continues: not the same data.

    The partial upload is deleted when this is raised: its bytes cannot be trusted
    to belong to either upload.
    """

    def __init__(self, snapshot_id: str, held: str | None, got: str | None) -> None:
        super().__init__(
            f"snapshot {snapshot_id!r}: the upload was started with sha256 {held or 'none'}, "
            f"this resume says {got or 'none'}; partial snapshot deleted, start over at offset 0"
        )
        self.snapshot_id = snapshot_id
        self.held = held
        self.got = got


class SpoolLost(SpoolError):
    """The partial upload this writer fed is gone (superseded, expired, or taken over)."""


@dataclass(eq=False)
class _Partial:
    snapshot_id: str
    path: Path
    held: int
    last_progress: float
    generation: int
    sha256: str | None = None  # the checksum the upload was started with
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    installing: bool = False


@dataclass(frozen=True, slots=True)
class SpoolLease:
    """The right to append to one partial upload, until someone claims its id again."""

    snapshot_id: str
    generation: int


def _create(path: Path) -> None:
    with open(path, "wb"):
        pass


def _write_at(path: Path, offset: int, data: bytes | bytearray | memoryview) -> None:
    # "r+b": never recreate a file that was deleted under us.
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _open_read(path: Path) -> BinaryIO:
    return open(path, "rb")  # the caller closes it


class SnapshotSpool:
    """Partial snapshot uploads, one file each, in ``directory`` (a private temp dir if None).

    Call ``start()`` before use and ``close()`` at the end (removes every partial
    file, and the directory if the spool created it). ``idle_timeout`` is how long
    a partial upload may go without progress before ``expire_idle`` removes it.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        self._requested_dir = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._owns_dir = False
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._partials: dict[str, _Partial] = {}
        self._generations = itertools.count(1)

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("SnapshotSpool.start() was not called")
        return self._dir

    async def start(self) -> None:
        """Create the directory (a temp dir when none was given)."""
        if self._dir is not None:
            return
        if self._requested_dir is None:
            self._dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="raft-spool-"))
            self._owns_dir = True
        else:
            await asyncio.to_thread(self._requested_dir.mkdir, parents=True, exist_ok=True)
            self._dir = self._requested_dir

    async def close(self) -> None:
        """Remove every partial upload (and the directory if the spool made it)."""
        partials = list(self._partials.values())
        self._partials.clear()
        for p in partials:
            await asyncio.to_thread(_unlink, p.path)
        if self._dir is not None and self._owns_dir:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)
        self._dir = None

    # --- queries -------------------------------------------------------------------

    def held(self, snapshot_id: str) -> int:
        """Bytes held for ``snapshot_id`` (0 if none): where its upload resumes."""
        p = self._partials.get(snapshot_id)
        return 0 if p is None else p.held

    def snapshot_ids(self) -> list[str]:
        return list(self._partials)

    def latest(self) -> tuple[str, int] | None:
        """The most recently advanced partial upload, as ``(snapshot_id, bytes held)``."""
        if not self._partials:
            return None
        p = max(self._partials.values(), key=lambda p: p.last_progress)
        return (p.snapshot_id, p.held)

    def path_of(self, snapshot_id: str) -> Path | None:
        p = self._partials.get(snapshot_id)
        return None if p is None else p.path

    # --- writing -------------------------------------------------------------------

    async def claim(
        self, snapshot_id: str, offset: int, *, sha256: str | None = None
    ) -> SpoolLease:
        """Take over the upload of ``snapshot_id`` from ``offset``.

        Offset 0 starts it afresh, dropping what was held for it and every other
        partial upload (not the ones being installed), and remembers ``sha256``. A
        non-zero offset must name the same ``sha256`` as the start (else
        ``ChecksumConflict``, and the partial upload is dropped) and equal the bytes
        held (else ``OffsetMismatch``).
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        if offset == 0:
            for other in list(self._partials.values()):
                if not other.installing or other.snapshot_id == snapshot_id:
                    await self._drop(other)
            path = self.directory / (
                f"{next(self._generations)}-"
                f"{hashlib.sha256(snapshot_id.encode()).hexdigest()[:16]}{_SUFFIX}"
            )
            await asyncio.to_thread(_create, path)
            generation = next(self._generations)
            self._partials[snapshot_id] = _Partial(
                snapshot_id, path, 0, self._clock(), generation, sha256
            )
            return SpoolLease(snapshot_id, generation)
        p = self._partials.get(snapshot_id)
        if p is None or p.installing:
            raise OffsetMismatch(snapshot_id, 0 if p is None else p.held, offset)
        async with p.lock:  # wait for a stale writer's chunk in flight
            if self._partials.get(snapshot_id) is not p:
                raise OffsetMismatch(snapshot_id, self.held(snapshot_id), offset)
            if p.sha256 != sha256:
                await self._drop(p)
                raise ChecksumConflict(snapshot_id, p.sha256, sha256)
            if p.held != offset:
                raise OffsetMismatch(snapshot_id, p.held, offset)
            p.generation = next(self._generations)
            p.last_progress = self._clock()
            return SpoolLease(snapshot_id, p.generation)

    def _owned(self, lease: SpoolLease) -> _Partial:
        p = self._partials.get(lease.snapshot_id)
        if p is None or p.generation != lease.generation or p.installing:
            raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was superseded or expired")
        return p

    async def append(self, lease: SpoolLease, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` after the bytes held; returns the new count held."""
        p = self._owned(lease)
        async with p.lock:
            p = self._owned(lease)
            write = asyncio.ensure_future(asyncio.to_thread(_write_at, p.path, p.held, data))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                await self._settle(p, write, len(data))
                raise
            except FileNotFoundError:
                raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was removed") from None
            p.held += len(data)
            p.last_progress = self._clock()
            return p.held

    async def _settle(self, p: _Partial, write: asyncio.Future[None], n: int) -> None:
        """The writer was cancelled (e.g. its connection dropped) with a chunk in flight.

        A thread cannot be stopped: wait for this one chunk so the count held stays
        true and the upload stays resumable. Cancelled again while waiting, give up
        on the partial upload rather than vouch for a count we do not know.
        """
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            self._forget(p)
            loop = asyncio.get_running_loop()

            def unlink_when_written(done: asyncio.Future[None]) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: the partial is gone anyway
                loop.run_in_executor(None, _unlink, p.path)

            write.add_done_callback(unlink_when_written)
            return
        except OSError:
            return  # the file was removed under us: nothing to count
        p.held += n
        p.last_progress = self._clock()

    async def open_for_install(self, lease: SpoolLease) -> BinaryIO:
        """Open the completed upload at offset 0; it stays until ``remove``."""
        p = self._owned(lease)
        async with p.lock:
            p = self._owned(lease)
            p.installing = True
        return await asyncio.to_thread(_open_read, p.path)

    async def remove(self, snapshot_id: str, lease: SpoolLease | None = None) -> None:
        """Delete the partial upload of ``snapshot_id`` (only if ``lease`` still owns it)."""
        p = self._partials.get(snapshot_id)
        if p is None or (lease is not None and p.generation != lease.generation):
            return
        await self._drop(p)

    async def expire_idle(self) -> list[str]:
        """Remove partial uploads idle for longer than ``idle_timeout``; returns their ids."""
        now = self._clock()
        expired = [
            p
            for p in self._partials.values()
            if not p.installing and now - p.last_progress > self.idle_timeout
        ]
        for p in expired:
            log.info(
                "dropping partial snapshot %r after %.0fs idle", p.snapshot_id, self.idle_timeout
            )
            await self._drop(p)
        return [p.snapshot_id for p in expired]

    async def run_reaper(self) -> None:
        """Expire idle uploads forever (run it as a task; cancel to stop)."""
        interval = max(0.01, min(self.idle_timeout / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_idle()
            except OSError:
                log.exception("could not expire idle partial snapshots")

    def _forget(self, p: _Partial) -> None:
        if self._partials.get(p.snapshot_id) is p:
            del self._partials[p.snapshot_id]

    async def _drop(self, p: _Partial) -> None:
        self._forget(p)
        await asyncio.to_thread(_unlink, p.path)


def spool_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The partial-upload files in ``directory`` (for tests and operators)."""
    return sorted(Path(directory).glob(f"*{_SUFFIX}"))
