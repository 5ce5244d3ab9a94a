"""Shared helpers for the server tests: a recording RaftHandler and wire builders."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    HigherVote,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
)

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .wire_helpers import vote
except ImportError:
    from wire_helpers import vote  # type: ignore[no-redef]


DATA_BLOCK = 64 * 1024


def pattern_block(i: int, size: int = DATA_BLOCK) -> bytes:
    """Block ``i`` of the test snapshot (or its first ``size`` bytes): cheap, never repeating."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    reps, rest = divmod(size, len(seed))
    return seed * reps + seed[:rest]


async def body_stream(
    total: int, piece: int = DATA_BLOCK, *, start: int = 0, stop: int | None = None
) -> AsyncIterator[bytes]:
    """Bytes [start, stop) of the ``total``-byte test snapshot, ``piece`` bytes at a time."""
    stop = total if stop is None else stop
    pos = start
    while pos < stop:
        n = min(piece, stop - pos)
        yield snapshot_slice(pos, pos + n)
        pos += n


class CountedBody:
    """A ``total``-byte test-snapshot body that counts what was pulled from it.

    A server that refuses an upload early stops reading long before the end; ``sent``
    says how far the client got.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0

    async def stream(self) -> AsyncIterator[bytes]:
        async for piece in body_stream(self.total):
            self.sent += len(piece)
            yield piece


def snapshot_slice(start: int, stop: int) -> bytes:
    first, last = start // DATA_BLOCK, (stop - 1) // DATA_BLOCK
    blocks = b"".join(pattern_block(i) for i in range(first, last + 1))
    return blocks[start - first * DATA_BLOCK : stop - first * DATA_BLOCK]


def snapshot_bytes(total: int) -> bytes:
    return snapshot_slice(0, total) if total else b""


def sha256_of_stream_sync(total: int) -> str:
    h = hashlib.sha256()
    for i in range((total + DATA_BLOCK - 1) // DATA_BLOCK):
        h.update(pattern_block(i, min(DATA_BLOCK, total - i * DATA_BLOCK)))
    return h.hexdigest()


def _digest_file(f: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while piece := f.read(1 << 20):
        h.update(piece)
        n += len(piece)
    return h.hexdigest(), n


@dataclass
class Installed:
    vote: Vote
    meta: SnapshotMeta
    sha256: str
    size: int
    position_at_start: int


@dataclass
class RecordingHandler:
    """A RaftHandler that records every call and answers like a follower with ``my_vote``.

    ``fail_with`` makes every RPC raise that exception (e.g. ``Fatal("stopped")``).
    """

    my_vote: Vote = field(default_factory=lambda: vote(1))
    fail_with: BaseException | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    installed: list[Installed] = field(default_factory=list)
    install_started: asyncio.Event = field(default_factory=asyncio.Event)

    def current_vote(self) -> Vote:
        return self.my_vote

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        self.calls.append(("append_entries", rpc))
        self._maybe_fail()
        if not rpc.vote >= self.my_vote:
            return HigherVote(self.my_vote)
        return Success()

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        self.calls.append(("vote", rpc))
        self._maybe_fail()
        granted = rpc.vote >= self.my_vote
        if granted:
            self.my_vote = rpc.vote
        return VoteResponse(vote=self.my_vote, vote_granted=granted, last_log_id=None)

    async def handle_transfer_leader(self, rpc: TransferLeaderRequest) -> None:
        self.calls.append(("handle_transfer_leader", rpc))
        self._maybe_fail()

    async def install_full_snapshot(self, v: Vote, snapshot: Snapshot) -> SnapshotResponse:
        self.install_started.set()
        position = snapshot.data.tell()
        digest, size = await asyncio.to_thread(_digest_file, snapshot.data)
        self.calls.append(("install_full_snapshot", (v, snapshot.meta)))
        self._maybe_fail()
        self.installed.append(Installed(v, snapshot.meta, digest, size, position))
        if v >= self.my_vote:
            self.my_vote = v
        return SnapshotResponse(self.my_vote)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]
