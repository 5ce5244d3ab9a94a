"""A node's data directory: one node process at a time, and one node id for its lifetime.

Two processes on one directory would interleave two logs in one database, and a
directory started under another ``--id`` would hand that node's vote and log to a
stranger: both break Raft's safety without a single error. So a directory is
locked (``flock`` on ``LOCK``, which holds the owner's pid for the message) while
a node runs, and it records its node id on first start (``node.json``), refusing
any other id afterwards. ``discard_created`` undoes what a failed first start made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Final

LOCK_FILE: Final = "LOCK"
IDENTITY_FILE: Final = "node.json"


class DataDirError(Exception):
    """The directory cannot serve this node; the message says why and names the path."""


class DataDir:
    """Open with ``acquire(node_id)``, release with ``release()``; both are blocking calls."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._created: Path | None = None  # the topmost directory this start created
        self._existing: set[str] = set()
        self._was_locked = False

    def acquire(self, node_id: int) -> None:
        """Create if needed, lock, and check (or record) the node id; ``DataDirError`` if not."""
        if self.path.exists() and not self.path.is_dir():
            raise DataDirError(f"data directory {self.path} is not a directory")
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._created = missing[-1] if missing else None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._existing = set(os.listdir(self.path))
        except OSError as e:
            raise DataDirError(f"cannot create data directory {self.path}: {e.strerror}") from e
        try:
            self._lock()
            self._check_identity(node_id)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataDirError(f"cannot open {lock_path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirError(
                f"data directory {self.path} is in use by another node process (pid {owner})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._was_locked = True

    def _check_identity(self, node_id: int) -> None:
        identity = self.path / IDENTITY_FILE
        try:
            recorded = json.loads(identity.read_bytes())["node_id"]
        except FileNotFoundError:
            self._record_identity(identity, node_id)
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataDirError(
                f"{identity} is unreadable ({e}); it names this directory's node"
            ) from e
        if recorded != node_id:
            raise DataDirError(
                f"data directory {self.path} belongs to node {recorded}, not node {node_id}: "
                f"start it with --id {recorded}, or give node {node_id} its own directory"
            )

    @staticmethod
    def _record_identity(identity: Path, node_id: int) -> None:
        tmp = identity.with_name(identity.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps({"node_id": node_id}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, identity)
        dir_fd = os.open(identity.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor drops the flock

    def discard_created(self) -> None:
        """Remove what ``acquire`` and the start after it created (after ``release``).

        Only when this process held the lock: a directory another node holds is not ours
        to tidy.
        """
        if not self._was_locked or self._fd is not None:
            return
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            for name in set(os.listdir(self.path)) - self._existing:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
