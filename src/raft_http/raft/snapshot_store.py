"""Snapshots as files in one directory: durable, checksummed, never half-written.

Each snapshot is two files, ``<seq>-<id>.snap`` (the data) and ``<seq>-<id>.meta``
(a sidecar with the metadata, the data's size and its sha256). Both are written to a
temporary name, fsynced and renamed into place, data first, then the directory is
fsynced: a sidecar only ever names complete data. ``seq`` grows with every save.

The newest snapshot is the one that covers the most log (the greatest
``last_log_id``; ``seq`` breaks ties): a node may build a snapshot of its own
state while it installs a newer one from the leader, and whichever finishes last
must not roll the other back.

On the first ``latest()`` the store verifies candidates from the newest down: a
snapshot whose size or checksum does not match (a torn disk write, bit rot, a
truncated copy) is renamed aside as ``*.corrupt`` and the next older one is used,
because installing a wrong snapshot would silently corrupt the state machine.

Snapshot ids come from the network, so file names use an escaped form of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, BinaryIO, Final

import msgspec
from msgspec import Meta, Struct

from ..types import Snapshot, SnapshotMeta, log_id_key
from .storage import StorageError

logger = logging.getLogger(__name__)

_CHUNK: Final = 1024 * 1024
_MAX_ID_NAME: Final = 180  # bytes of escaped id in a file name (names stop at 255)
_TEMP_PREFIX: Final = ".tmp-"
_DATA_SUFFIX: Final = ".snap"
_META_SUFFIX: Final = ".meta"
_CORRUPT_SUFFIX: Final = ".corrupt"
_NAME: Final = re.compile(r"^(\d{20})-(.*)\.(snap|meta)$")


class _Sidecar(Struct, forbid_unknown_fields=True):
    """What the ``.meta`` file holds: enough to verify the data without trusting it."""

    meta: SnapshotMeta
    size: Annotated[int, Meta(ge=0)]
    sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    seq: Annotated[int, Meta(ge=0)]


_SIDECAR_DECODER: Final = msgspec.json.Decoder(_Sidecar)
_ENCODER: Final = msgspec.json.Encoder()


def escape_snapshot_id(snapshot_id: str) -> str:
    """A file-name-safe, one-to-one form of any snapshot id (percent-encoding).

    Only ``[A-Za-z0-9_.~-]`` pass through; ``/``, ``%``, NUL and everything else are
    escaped, and a leading ``.`` too, so no id can name another directory or hide.
    An id too long for a file name keeps a prefix and gains ``%%`` plus its sha256
    (``%%`` never appears in an escaped id, so the forms cannot collide).
    """
    escaped = urllib.parse.quote(snapshot_id, safe="")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped) > _MAX_ID_NAME:
        digest = hashlib.sha256(snapshot_id.encode("utf-8", "surrogatepass")).hexdigest()
        escaped = escaped[: _MAX_ID_NAME - 66] + "%%" + digest
    return escaped


class SnapshotStore:
    """The node's snapshots, newest first; one directory per node."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = asyncio.Lock()
        self._scanned = False
        self._latest: SnapshotMeta | None = None
        self._latest_name: str | None = None  # file stem "<seq>-<id>"
        self._latest_sha256: str | None = None  # from the sidecar
        self._next_seq = 0

    async def latest(self) -> SnapshotMeta | None:
        """The newest valid snapshot's metadata (verified on the first call), or None."""
        async with self._lock:
            await self._ensure_scanned()
            return self._latest

    async def open_latest(self) -> Snapshot | None:
        """The newest snapshot with a new file object for its data; the caller closes it.

        Its ``sha256`` is the sidecar's, so a receiver can refuse data that rotted since.
        """
        async with self._lock:
            await self._ensure_scanned()
            if self._latest is None or self._latest_name is None:
                return None
            path = self.directory / (self._latest_name + _DATA_SUFFIX)
            try:
                data = await asyncio.to_thread(open, path, "rb")
            except OSError as exc:
                raise StorageError(f"cannot open snapshot {path}: {exc}") from exc
            return Snapshot(self._latest, data, sha256=self._latest_sha256)

    async def save(self, meta: SnapshotMeta, write: Callable[[BinaryIO], None]) -> None:
        """Write a snapshot with ``write(file)`` (in a worker thread), then make it the latest."""
        await self._save(meta, lambda f: _write_and_hash(write, f))

    async def save_from(self, meta: SnapshotMeta, data: BinaryIO) -> None:
        """Copy a snapshot from ``data`` (from its start, in chunks), then make it the latest."""
        await self._save(meta, lambda f: _copy_and_hash(data, f))

    async def _save(self, meta: SnapshotMeta, fill: Callable[[BinaryIO], tuple[int, str]]) -> None:
        """Save under the lock; shielded, so a cancelled caller never leaves a half-known save."""
        stem_id = escape_snapshot_id(meta.snapshot_id)
        task = asyncio.ensure_future(self._save_locked(meta, stem_id, fill))
        task.add_done_callback(_retrieve_exception)
        await asyncio.shield(task)

    async def _save_locked(
        self, meta: SnapshotMeta, stem_id: str, fill: Callable[[BinaryIO], tuple[int, str]]
    ) -> None:
        # The lock covers bookkeeping only, not the write: readers of the current
        # snapshot (open_latest for a follower) never wait for a new one being built.
        async with self._lock:
            await self._ensure_scanned()
            seq = self._next_seq
            self._next_seq = seq + 1  # never reused, even if this save fails
        stem = f"{seq:020d}-{stem_id}"
        try:
            sha256 = await asyncio.to_thread(self._write_files, meta, seq, stem, fill)
        except OSError as exc:
            raise StorageError(f"cannot save snapshot {meta.snapshot_id!r}: {exc}") from exc
        async with self._lock:
            current, current_name = self._latest, self._latest_name
            if current is not None and current_name is not None:
                current_rank = (log_id_key(current.last_log_id), int(current_name[:20]))
                if current_rank > (log_id_key(meta.last_log_id), seq):
                    # the latest covers more log (or as much, and started later): this one is old.
                    # As much and started earlier: this one replaces it (a rebuild of the same
                    # state, e.g. after the old file was found rotten).
                    await asyncio.to_thread(self._remove, stem)
                    return
                if int(current_name[:20]) > seq:
                    # a save that started later finished first, but covers less
                    await asyncio.to_thread(self._remove, current_name)
            self._latest, self._latest_name, self._latest_sha256 = meta, stem, sha256
            await asyncio.to_thread(self._remove_older_than, seq)

    # --- worker-thread side -----------------------------------------------------------

    def _write_files(
        self, meta: SnapshotMeta, seq: int, stem: str, fill: Callable[[BinaryIO], tuple[int, str]]
    ) -> str:
        """Write data and sidecar; returns the data's sha256."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data_tmp = self.directory / f"{_TEMP_PREFIX}{stem}{_DATA_SUFFIX}"
        meta_tmp = self.directory / f"{_TEMP_PREFIX}{stem}{_META_SUFFIX}"
        try:
            with open(data_tmp, "w+b") as f:
                size, sha256 = fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(data_tmp, self.directory / (stem + _DATA_SUFFIX))
            _fsync_dir(self.directory)
            sidecar = _ENCODER.encode(_Sidecar(meta=meta, size=size, sha256=sha256, seq=seq))
            with open(meta_tmp, "wb") as f:
                f.write(sidecar)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, self.directory / (stem + _META_SUFFIX))
            _fsync_dir(self.directory)
        except BaseException:
            for tmp in (data_tmp, meta_tmp):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            with contextlib.suppress(OSError):
                (self.directory / (stem + _DATA_SUFFIX)).unlink()
            raise
        return sha256

    def _remove(self, stem: str) -> None:
        for suffix in (_DATA_SUFFIX, _META_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / (stem + suffix))

    def _remove_older_than(self, seq: int) -> None:
        """Delete every snapshot saved before ``seq`` (open file objects stay readable)."""
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            logger.warning("cannot list %s to remove old snapshots: %s", self.directory, exc)
            return
        for name in names:
            m = _NAME.match(name)
            if m and int(m.group(1)) < seq:
                try:
                    os.unlink(self.directory / name)
                except OSError as exc:
                    logger.warning("cannot remove old snapshot file %s: %s", name, exc)

    async def _ensure_scanned(self) -> None:
        if not self._scanned:
            try:
                found = await asyncio.to_thread(self._scan)
            except OSError as exc:
                raise StorageError(f"cannot read snapshots in {self.directory}: {exc}") from exc
            self._latest, self._latest_name, self._latest_sha256, self._next_seq = found
            self._scanned = True

    def _scan(self) -> tuple[SnapshotMeta | None, str | None, str | None, int]:
        """Find the newest valid snapshot; set aside corrupt ones; drop leftover temp files."""
        if not self.directory.exists():
            return None, None, None, 0
        sidecars: list[tuple[int, str]] = []
        max_seq = -1
        for name in os.listdir(self.directory):
            if name.startswith(_TEMP_PREFIX):
                logger.info("removing an unfinished snapshot file %s", name)
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / name)
                continue
            m = _NAME.match(name)
            if m is None:
                continue
            seq = int(m.group(1))
            max_seq = max(max_seq, seq)
            if m.group(3) == "meta":
                sidecars.append((seq, name[: -len(_META_SUFFIX)]))
        best: tuple[tuple[int, int], int, str, _Sidecar] | None = None
        for seq, stem in sidecars:
            problem, sidecar = self._verify(seq, stem)
            if sidecar is None:
                logger.error(
                    "snapshot %s in %s is corrupt (%s): set aside", stem, self.directory, problem
                )
                for suffix in (_DATA_SUFFIX, _META_SUFFIX):
                    path = self.directory / (stem + suffix)
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, path.with_name(path.name + _CORRUPT_SUFFIX))
                continue
            key = log_id_key(sidecar.meta.last_log_id)
            if best is None or (key, seq) > (best[0], best[1]):
                best = (key, seq, stem, sidecar)
        if best is None:
            return None, None, None, max_seq + 1
        return best[3].meta, best[2], best[3].sha256, max_seq + 1

    def _verify(self, seq: int, stem: str) -> tuple[str, _Sidecar | None]:
        try:
            sidecar = _SIDECAR_DECODER.decode((self.directory / (stem + _META_SUFFIX)).read_bytes())
            expected_stem = f"{seq:020d}-{escape_snapshot_id(sidecar.meta.snapshot_id)}"
        except msgspec.DecodeError as exc:
            return f"unreadable sidecar: {exc}", None
        if sidecar.seq != seq or stem != expected_stem:
            return f"sidecar names {sidecar.meta.snapshot_id!r} seq {sidecar.seq}", None
        try:
            with open(self.directory / (stem + _DATA_SUFFIX), "rb") as f:
                size, sha256 = _hash_file(f)
        except FileNotFoundError:
            return "data file missing", None
        if size != sidecar.size:
            return f"size {size}, expected {sidecar.size}", None
        if sha256 != sidecar.sha256:
            return "sha256 mismatch", None
        return "", sidecar


def _retrieve_exception(task: asyncio.Future[None]) -> None:
    """Mark the error seen: the caller got it, or was cancelled and the log has it."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.info("a snapshot save failed: %r", exc)


def _hash_file(f: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _write_and_hash(write: Callable[[BinaryIO], None], f: BinaryIO) -> tuple[int, str]:
    """Let the writer fill ``f`` as it likes (it may seek), then hash what it wrote."""
    write(f)
    f.flush()
    f.seek(0)
    return _hash_file(f)


def _copy_and_hash(src: BinaryIO, dst: BinaryIO) -> tuple[int, str]:
    if src.seekable():
        src.seek(0)
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
