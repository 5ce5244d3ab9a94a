"""Partial snapshot uploads kept on disk, so a dropped transfer resumes where it stopped.

A receiver holds at most one partial upload per snapshot id; a fresh upload
supersedes the others (a leader only ever sends its latest snapshot). Each upload
keeps its file open and a running sha256 of the bytes held: an append writes a
batch of buffers and hashes them in one worker thread, so the event loop never
waits on the disk, memory stays at a batch, and checking the whole snapshot at the
end needs no second pass. No aiohttp here: any transport may use it.

Writers hold a *lease* (``SpoolLease``). Whoever claims a snapshot id later takes
the id over, so a stale writer (a connection the server has not yet noticed is
dead) cannot interleave its bytes with the resumed upload: its next append
raises ``SpoolLost``.

The spool shares a disk with the node's log, so it is bounded (``SpoolLimits``): a
declared size over the cap or over the free space (minus a reserve kept for the log)
is refused before a byte is written, free space is checked again before every write,
uploads in progress are bounded in number and bytes, and partial files left by a
killed process are removed at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

log = logging.getLogger(__name__)

_SUFFIX = ".snapshot-part"

DEFAULT_MAX_SNAPSHOT_SIZE: Final = 16 * 1024**3
DEFAULT_SPOOL_RESERVE: Final = 256 * 1024**2
DEFAULT_MAX_UPLOADS: Final = 4


@dataclass(frozen=True, slots=True)
class SpoolLimits:
    """How much of the disk snapshot uploads may take, so the log never runs out of it.

    ``max_snapshot_size``: the largest snapshot accepted (declared, or received in the
    per-chunk form). ``reserve_bytes``: free space on the spool's filesystem that no
    upload may use (the log and the snapshot store live there too). ``max_uploads`` /
    ``max_total_bytes``: partial uploads held at once (counting those being installed)
    and the sum of their sizes; past either, a new upload is refused as retryable.
    """

    max_snapshot_size: int = DEFAULT_MAX_SNAPSHOT_SIZE
    reserve_bytes: int = DEFAULT_SPOOL_RESERVE
    max_uploads: int = DEFAULT_MAX_UPLOADS
    max_total_bytes: int | None = None  # default: 2 * max_snapshot_size

    def __post_init__(self) -> None:
        if self.max_snapshot_size < 0 or self.reserve_bytes < 0:
            raise ValueError("max_snapshot_size and reserve_bytes must be >= 0")
        if self.max_uploads < 1:
            raise ValueError(f"max_uploads must be >= 1, got {self.max_uploads!r}")
        if self.max_total_bytes is not None and self.max_total_bytes < 0:
            raise ValueError("max_total_bytes must be >= 0")

    @property
    def total_bytes(self) -> int:
        if self.max_total_bytes is None:
            return 2 * self.max_snapshot_size
        return self.max_total_bytes


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


class SizeConflict(SpoolError):
    """A resume declares another total size than the upload it continues (which is dropped)."""

    def __init__(self, snapshot_id: str, held: int | None, got: int | None) -> None:
        super().__init__(
            f"snapshot {snapshot_id!r}: the upload was started with size {held}, this resume "
            f"says {got}; partial snapshot deleted, start over at offset 0"
        )


class SnapshotTooLarge(SpoolError):
    """The snapshot is larger than ``SpoolLimits.max_snapshot_size``: never retry it here."""

    def __init__(self, snapshot_id: str, size: int, limit: int) -> None:
        super().__init__(
            f"snapshot {snapshot_id!r} of {size} bytes exceeds this node's limit of {limit} "
            f"bytes (max_snapshot_size)"
        )
        self.size = size
        self.limit = limit


class InsufficientStorage(SpoolError):
    """The spool's filesystem has no room for the upload beyond the reserve kept for the log."""

    def __init__(self, snapshot_id: str, needed: int, available: int) -> None:
        super().__init__(
            f"snapshot {snapshot_id!r}: {needed} more bytes needed, {max(0, available)} "
            f"available in the spool beyond the reserve kept for the log; nothing of it is kept"
        )
        self.needed = needed
        self.available = available


class SpoolFull(SpoolError):
    """Too many uploads (or bytes) in progress at once: retry once one has finished."""


@dataclass(eq=False)
class _Partial:
    snapshot_id: str
    path: Path
    held: int
    last_progress: float
    generation: int
    sha256: str | None = None  # the checksum the upload was started with
    size: int | None = None  # the declared total size (None: the per-chunk form)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    installing: bool = False
    file: io.FileIO | None = None  # open for writing at ``held``; None once dropped
    digest: Any = field(default_factory=hashlib.sha256)  # of bytes 0..held
    writing: asyncio.Future[int | None] | None = None  # the batch being written


@dataclass(frozen=True, slots=True)
class SpoolLease:
    """The right to append to one partial upload, until someone claims its id again."""

    snapshot_id: str
    generation: int


Buffer = bytes | bytearray | memoryview


def _create(path: Path) -> io.FileIO:
    return io.FileIO(path, "w")  # unbuffered: each batch goes straight to the kernel


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _write_batch(
    f: io.FileIO, pieces: Sequence[Buffer], digest: Any, directory: Path, reserve: int
) -> int | None:
    """Write and hash ``pieces`` at the file's position, unless that would leave less than
    ``reserve`` free. Returns None when written, else the bytes available beyond the reserve.

    Both ``write`` and ``sha256.update`` release the GIL: the loop keeps receiving.
    """
    available = free_bytes(directory) - reserve
    if sum(len(piece) for piece in pieces) > available:
        return available
    for piece in pieces:
        view = memoryview(piece)
        while view:
            written = f.write(view)
            if written is None:  # pragma: no cover - only for non-blocking files
                raise BlockingIOError("the spool file is non-blocking")
            view = view[written:]
        digest.update(piece)
    return None


def _discard(path: Path, f: io.FileIO | None) -> None:
    if f is not None:
        f.close()
    _unlink(path)


def _remove_leftovers(directory: Path) -> tuple[int, int]:
    """Delete partial uploads left by an earlier process; returns (files, bytes)."""
    files = size = 0
    for path in directory.glob(f"*{_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            size += path.stat().st_size
            path.unlink()
            files += 1
    return files, size


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
        limits: SpoolLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        self._requested_dir = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._owns_dir = False
        self.idle_timeout = idle_timeout
        self.limits = limits if limits is not None else SpoolLimits()
        self._clock = clock
        self._partials: dict[str, _Partial] = {}
        self._generations = itertools.count(1)

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("SnapshotSpool.start() was not called")
        return self._dir

    async def start(self) -> None:
        """Create the directory (a temp dir when none was given); drop leftover partials.

        A partial upload outlives its process only when that process was killed; its
        checksum and size died with it, so it cannot be resumed safely: delete it.
        """
        if self._dir is not None:
            return
        if self._requested_dir is None:
            self._dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="raft-spool-"))
            self._owns_dir = True
        else:
            await asyncio.to_thread(self._requested_dir.mkdir, parents=True, exist_ok=True)
            self._dir = self._requested_dir
            files, size = await asyncio.to_thread(_remove_leftovers, self._dir)
            if files:
                log.warning(
                    "removed %d partial snapshot upload(s) (%d bytes) left in %s",
                    files,
                    size,
                    self._dir,
                )

    async def close(self) -> None:
        """Remove every partial upload (and the directory if the spool made it)."""
        for p in list(self._partials.values()):
            await self._drop(p)
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
        self,
        snapshot_id: str,
        offset: int,
        *,
        sha256: str | None = None,
        size: int | None = None,
    ) -> SpoolLease:
        """Take over the upload of ``snapshot_id`` from ``offset``.

        Offset 0 starts it afresh, dropping what was held for it and every other
        partial upload (not the ones being installed), and remembers ``sha256`` and
        the declared total ``size`` (None in the per-chunk form). It is refused with
        ``SnapshotTooLarge``, ``SpoolFull`` or ``InsufficientStorage`` when the limits
        say so. A non-zero offset must name the same ``sha256`` (else
        ``ChecksumConflict``) and ``size`` (else ``SizeConflict``) as the start, and
        the partial upload is dropped; and it must equal the bytes held (else
        ``OffsetMismatch``).
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        limits = self.limits
        if size is not None and size > limits.max_snapshot_size:
            raise SnapshotTooLarge(snapshot_id, size, limits.max_snapshot_size)
        if offset == 0:
            return await self._claim_fresh(snapshot_id, sha256, size)
        p = self._partials.get(snapshot_id)
        if p is None or p.installing:
            raise OffsetMismatch(snapshot_id, 0 if p is None else p.held, offset)
        async with p.lock:  # wait for a stale writer's chunk in flight
            if self._partials.get(snapshot_id) is not p:
                raise OffsetMismatch(snapshot_id, self.held(snapshot_id), offset)
            if p.sha256 != sha256:
                await self._drop(p)
                raise ChecksumConflict(snapshot_id, p.sha256, sha256)
            if p.size != size:
                await self._drop(p)
                raise SizeConflict(snapshot_id, p.size, size)
            if p.held != offset:
                raise OffsetMismatch(snapshot_id, p.held, offset)
            p.generation = next(self._generations)
            p.last_progress = self._clock()
            return SpoolLease(snapshot_id, p.generation)

    async def _claim_fresh(
        self, snapshot_id: str, sha256: str | None, size: int | None
    ) -> SpoolLease:
        # Everything up to the insertion runs without an await, so concurrent claims
        # cannot each keep their own partial alive past the limits.
        limits = self.limits
        dropped = [
            p for p in self._partials.values() if not p.installing or p.snapshot_id == snapshot_id
        ]
        for p in dropped:
            self._forget(p)
        kept = list(self._partials.values())
        declared = size or 0
        try:
            if len(kept) >= limits.max_uploads:
                raise SpoolFull(
                    f"snapshot {snapshot_id!r}: {len(kept)} snapshot upload(s) being "
                    f"installed, the limit is {limits.max_uploads}; retry later"
                )
            in_use = sum(self._reserved(p) for p in kept)
            if in_use + declared > limits.total_bytes:
                raise SpoolFull(
                    f"snapshot {snapshot_id!r}: {in_use} bytes of snapshot uploads in "
                    f"progress, {declared} more would pass the limit of "
                    f"{limits.total_bytes}; retry later"
                )
            # The dropped partials' bytes come back once unlinked below.
            available = (
                free_bytes(self.directory)
                + sum(p.held for p in dropped)
                - limits.reserve_bytes
                - sum(self._reserved(p) - p.held for p in kept)
            )
            if declared > available:
                raise InsufficientStorage(snapshot_id, declared, available)
            path = self.directory / (
                f"{next(self._generations)}-"
                f"{hashlib.sha256(snapshot_id.encode()).hexdigest()[:16]}{_SUFFIX}"
            )
            generation = next(self._generations)
            p = _Partial(snapshot_id, path, 0, self._clock(), generation, sha256, size)
            self._partials[snapshot_id] = p
        finally:
            for old in dropped:
                await self._release(old)
        try:
            f = await asyncio.to_thread(_create, path)
        except OSError as exc:
            self._forget(p)
            await asyncio.to_thread(_unlink, path)
            raise InsufficientStorage(snapshot_id, declared, 0) from exc
        if self._partials.get(snapshot_id) is not p:  # superseded while the file was made
            await asyncio.to_thread(_discard, path, f)
            raise SpoolLost(f"partial snapshot {snapshot_id!r} was superseded")
        p.file = f
        return SpoolLease(snapshot_id, generation)

    @staticmethod
    def _reserved(p: _Partial) -> int:
        return p.held if p.size is None else max(p.size, p.held)

    def _owned(self, lease: SpoolLease) -> _Partial:
        p = self._partials.get(lease.snapshot_id)
        if p is None or p.generation != lease.generation or p.installing:
            raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was superseded or expired")
        return p

    async def append(self, lease: SpoolLease, data: Buffer | Sequence[Buffer]) -> int:
        """Write (and hash) ``data``, one buffer or a batch of them, after the bytes held;
        returns the new count held.

        Refused, and the partial upload dropped, when the write would pass the size
        limit (``SnapshotTooLarge``) or leave less than the reserve free on the disk
        (``InsufficientStorage``, also for a write that fails for lack of space).
        """
        pieces: Sequence[Buffer] = (
            [data] if isinstance(data, bytes | bytearray | memoryview) else data
        )
        n = sum(len(piece) for piece in pieces)
        p = self._owned(lease)
        async with p.lock:
            p = self._owned(lease)
            limit = self.limits.max_snapshot_size
            if p.held + n > limit:
                await self._drop(p)
                raise SnapshotTooLarge(lease.snapshot_id, p.held + n, limit)
            if p.file is None:
                raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was removed")
            write = p.writing = asyncio.ensure_future(
                asyncio.to_thread(
                    _write_batch,
                    p.file,
                    pieces,
                    p.digest,
                    self.directory,
                    self.limits.reserve_bytes,
                )
            )
            try:
                available = await asyncio.shield(write)
            except asyncio.CancelledError:
                await self._settle(p, write, n)
                raise
            except OSError as exc:  # ENOSPC, EDQUOT, EIO: nothing of this upload is worth keeping
                await self._drop(p)
                raise InsufficientStorage(lease.snapshot_id, n, 0) from exc
            finally:
                if p.writing is write and write.done():
                    p.writing = None
            if available is not None:
                await self._drop(p)
                raise InsufficientStorage(lease.snapshot_id, n, available)
            if self._partials.get(lease.snapshot_id) is not p:  # dropped while writing
                raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was removed")
            p.held += n
            p.last_progress = self._clock()
            return p.held

    async def _settle(self, p: _Partial, write: asyncio.Future[int | None], n: int) -> None:
        """The writer was cancelled (e.g. its connection dropped) with a batch in flight.

        A thread cannot be stopped: wait for this one batch so the count held (and the
        hash) stay true and the upload stays resumable. Cancelled again while waiting,
        give up on the partial upload rather than vouch for a count we do not know
        (its file is closed once the write is over: see ``_release``).
        """
        try:
            available = await asyncio.shield(write)
        except asyncio.CancelledError:
            write.add_done_callback(_retrieve)
            self._forget(p)
            await asyncio.shield(self._release(p))
            return
        except OSError:
            await self._drop(p)
            return
        if available is not None:
            await self._drop(p)
            return
        if self._partials.get(p.snapshot_id) is p:
            p.held += n
            p.last_progress = self._clock()

    def digest(self, lease: SpoolLease) -> str:
        """The sha256 (hex) of the bytes held by the upload ``lease`` owns."""
        p = self._partials.get(lease.snapshot_id)
        if p is None or p.generation != lease.generation:
            raise SpoolLost(f"partial snapshot {lease.snapshot_id!r} was superseded or expired")
        digest: str = p.digest.hexdigest()
        return digest

    async def open_for_install(self, lease: SpoolLease) -> BinaryIO:
        """Open the completed upload at offset 0; it stays until ``remove``."""
        p = self._owned(lease)
        async with p.lock:  # no write in flight once we hold it
            p = self._owned(lease)
            p.installing = True
            f, p.file = p.file, None
        if f is not None:
            await asyncio.to_thread(f.close)
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
        await self._release(p)

    async def _release(self, p: _Partial) -> None:
        """Delete a forgotten partial's file; close it now, or once its write is over.

        Closing a file while a thread writes to it could let its descriptor number be
        reused by another open (the log's) and that thread write there.
        """
        f, p.file = p.file, None
        write = p.writing
        if write is not None and not write.done() and f is not None:
            loop = asyncio.get_running_loop()
            closing = f
            write.add_done_callback(lambda _: loop.run_in_executor(None, closing.close))
            f = None
        await asyncio.to_thread(_discard, p.path, f)


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: the partial upload is gone anyway


def spool_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The partial-upload files in ``directory`` (for tests and operators)."""
    return sorted(Path(directory).glob(f"*{_SUFFIX}"))
