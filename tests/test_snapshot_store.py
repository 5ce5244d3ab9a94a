"""SnapshotStore: round trips, corruption and truncation detected, hostile snapshot ids."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from raft_http.raft.snapshot_store import SnapshotStore, escape_snapshot_id
from raft_http.raft.storage import StorageError
from raft_http.types import (
    LeaderId,
    LogId,
    Membership,
    Node,
    SnapshotMeta,
    StoredMembership,
)


def meta(index: int, snapshot_id: str | None = None) -> SnapshotMeta:
    membership = Membership(configs=[[1, 2, 3]], nodes={n: Node(f"h{n}:1") for n in (1, 2, 3)})
    last = LogId(LeaderId(2, 1), index)
    return SnapshotMeta(
        last_log_id=last,
        last_membership=StoredMembership(LogId(LeaderId(1, 1), 0), membership),
        snapshot_id=f"2-{index}-x" if snapshot_id is None else snapshot_id,
    )


def payload(index: int, size: int = 300_000) -> bytes:
    return bytes((i * 7 + index) % 251 for i in range(size))


def writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        for i in range(0, len(data), 65536):  # several writes, as a state machine would
            f.write(data[i : i + 65536])

    return write


async def read_latest(store: SnapshotStore) -> tuple[SnapshotMeta, bytes] | None:
    snap = await store.open_latest()
    if snap is None:
        return None
    with snap.data:
        return snap.meta, snap.data.read()


def snapshot_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_empty_and_missing_directory(tmp_path: Path) -> None:
    assert await SnapshotStore(tmp_path / "nope").latest() is None
    assert await SnapshotStore(tmp_path).open_latest() is None


async def test_round_trip_and_reload(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    await store.save(meta(10), writer(payload(10)))
    assert await store.latest() == meta(10)
    assert await read_latest(store) == (meta(10), payload(10))

    reloaded = SnapshotStore(tmp_path / "snaps")
    assert await reloaded.latest() == meta(10)
    assert await read_latest(reloaded) == (meta(10), payload(10))


async def test_newer_save_replaces_and_removes_older(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    await store.save(meta(10), writer(payload(10)))
    old = await store.open_latest()
    assert old is not None
    await store.save_from(meta(20), io.BytesIO(payload(20)))
    assert await read_latest(store) == (meta(20), payload(20))
    assert len(snapshot_files(tmp_path)) == 2  # one data file and its sidecar
    with old.data:  # a reader of the old snapshot can still finish
        assert old.data.read() == payload(10)


async def test_each_open_is_an_independent_file(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    await store.save(meta(5), writer(payload(5)))
    a, b = await store.open_latest(), await store.open_latest()
    assert a is not None
    assert b is not None
    with a.data, b.data:
        assert a.data is not b.data
        assert a.data.read(1000) == payload(5)[:1000]
        assert b.data.read() == payload(5)
        assert a.data.read() == payload(5)[1000:]


async def test_save_from_copies_from_the_start(tmp_path: Path) -> None:
    source = io.BytesIO(payload(7))
    source.seek(1234)  # e.g. left at the end by whoever received it
    store = SnapshotStore(tmp_path)
    await store.save_from(meta(7), source)
    assert await read_latest(store) == (meta(7), payload(7))


async def _two_snapshots(directory: Path) -> Path:
    """Save snapshots 1 and 2, leaving 1 in place (as a crash before cleanup would).

    Returns the data file of snapshot 2.
    """
    store = SnapshotStore(directory)
    await store.save(meta(1), writer(payload(1)))
    keep = {p.name: p.read_bytes() for p in directory.iterdir()}
    await store.save(meta(2), writer(payload(2)))
    for name, content in keep.items():
        (directory / name).write_bytes(content)
    (data,) = [p for p in directory.iterdir() if p.suffix == ".snap" and "2-2-x" in p.name]
    return data


async def test_flipped_byte_is_detected_and_older_one_used(tmp_path: Path) -> None:
    data = await _two_snapshots(tmp_path)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))

    store = SnapshotStore(tmp_path)
    assert await store.latest() == meta(1)
    assert await read_latest(store) == (meta(1), payload(1))
    assert any(name.endswith(".snap.corrupt") for name in snapshot_files(tmp_path))
    assert not (data).exists()
    # and a later start does not see it again
    assert await SnapshotStore(tmp_path).latest() == meta(1)


async def test_truncated_file_is_detected(tmp_path: Path) -> None:
    data = await _two_snapshots(tmp_path)
    os.truncate(data, data.stat().st_size - 1)
    assert await SnapshotStore(tmp_path).latest() == meta(1)


async def test_garbled_sidecar_is_detected(tmp_path: Path) -> None:
    data = await _two_snapshots(tmp_path)
    data.with_suffix(".meta").write_bytes(b'{"meta": 1}')
    assert await SnapshotStore(tmp_path).latest() == meta(1)


async def test_missing_data_file_is_detected(tmp_path: Path) -> None:
    data = await _two_snapshots(tmp_path)
    data.unlink()
    assert await SnapshotStore(tmp_path).latest() == meta(1)


async def test_all_corrupt_means_none(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    await store.save(meta(1), writer(payload(1)))
    (data,) = tmp_path.glob("*.snap")
    data.write_bytes(b"garbage")
    assert await SnapshotStore(tmp_path).latest() is None


async def test_unfinished_temp_files_are_never_snapshots(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    await store.save(meta(1), writer(payload(1)))

    def crash(f: BinaryIO) -> None:
        f.write(b"half a snapshot")
        raise RuntimeError("the writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        await store.save(meta(2), crash)
    assert await store.latest() == meta(1)
    assert not [n for n in snapshot_files(tmp_path) if n.startswith(".tmp")]

    # a temp file left by a crashed process (with a valid-looking sidecar beside it)
    names = snapshot_files(tmp_path)
    for name in names:
        (tmp_path / (".tmp-" + name.replace("-1-x", "-9-x"))).write_bytes(
            (tmp_path / name).read_bytes()
        )
    reloaded = SnapshotStore(tmp_path)
    assert await reloaded.latest() == meta(1)
    assert snapshot_files(tmp_path) == names  # leftovers removed


@pytest.mark.parametrize(
    "snapshot_id",
    ["../../escape", "/etc/passwd", "..", ".", ".hidden", "a/b\\c", "nul\x00byte", "ünï %2F"],
)
async def test_hostile_snapshot_ids_stay_inside(tmp_path: Path, snapshot_id: str) -> None:
    directory = tmp_path / "snaps"
    store = SnapshotStore(directory)
    await store.save_from(meta(3, snapshot_id), io.BytesIO(b"data"))
    assert [p.parent for p in tmp_path.rglob("*") if p.is_file()] == [directory] * 2
    assert all("/" not in n and not n.startswith(".") for n in snapshot_files(directory))
    assert await read_latest(SnapshotStore(directory)) == (meta(3, snapshot_id), b"data")


def test_escape_is_injective_on_tricky_ids() -> None:
    ids = ["a/b", "a%2Fb", "a_b", ".a", "%2Ea", "a.", "A"]
    assert len({escape_snapshot_id(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("snapshot_id", ["", "x" * 500, "/" * 300, "é" * 300])
async def test_empty_and_overlong_ids_get_usable_names(tmp_path: Path, snapshot_id: str) -> None:
    store = SnapshotStore(tmp_path)
    await store.save_from(meta(3, snapshot_id), io.BytesIO(b"data"))
    assert all(len(n.encode()) <= 255 for n in snapshot_files(tmp_path))
    assert await read_latest(SnapshotStore(tmp_path)) == (meta(3, snapshot_id), b"data")


def test_overlong_ids_stay_distinct() -> None:
    a, b = "x" * 400 + "a", "x" * 400 + "b"
    assert escape_snapshot_id(a) != escape_snapshot_id(b)
    assert escape_snapshot_id("x" * 500) not in {escape_snapshot_id(a), escape_snapshot_id(b)}


async def test_unwritable_directory_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    store = SnapshotStore(tmp_path / "file" / "snaps")
    with pytest.raises(StorageError):
        await store.save_from(meta(1), io.BytesIO(b"data"))


async def test_slow_save_does_not_block_readers_and_cannot_win_late(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    await store.save(meta(1), writer(payload(1)))
    release = threading.Event()
    started = threading.Event()

    def slow(f: BinaryIO) -> None:
        started.set()
        f.write(b"slow")
        assert release.wait(30)

    slow_save = asyncio.ensure_future(store.save(meta(2), slow))
    try:
        assert await asyncio.to_thread(started.wait, 30)
        assert await read_latest(store) == (meta(1), payload(1))  # not blocked by the save
        await store.save(meta(3), writer(payload(3)))  # started later, finishes first
    finally:
        release.set()
        await slow_save
    assert await read_latest(store) == (meta(3), payload(3))
    assert len(snapshot_files(tmp_path)) == 2
    assert await SnapshotStore(tmp_path).latest() == meta(3)


async def test_cancelled_save_still_completes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    started = threading.Event()
    release = threading.Event()

    def slow(f: BinaryIO) -> None:
        started.set()
        f.write(payload(4))
        assert release.wait(30)

    save = asyncio.ensure_future(store.save(meta(4), slow))
    assert await asyncio.to_thread(started.wait, 30)
    save.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await save
    for _ in range(300):  # the shielded save finishes in the background
        if await store.latest() is not None:
            break
        await asyncio.sleep(0.01)
    assert await read_latest(store) == (meta(4), payload(4))


async def test_a_snapshot_covering_less_never_replaces_the_latest(tmp_path: Path) -> None:
    """An own build of older state finishing after an installed newer snapshot loses."""
    store = SnapshotStore(tmp_path / "snaps")
    await store.save(meta(50), writer(payload(50)))
    await store.save(meta(20), writer(payload(20)))  # started earlier, finished later
    assert await read_latest(store) == (meta(50), payload(50))
    assert await SnapshotStore(tmp_path / "snaps").latest() == meta(50)


async def test_reload_prefers_the_snapshot_covering_most_log(tmp_path: Path) -> None:
    """If a crash leaves an older-covering snapshot with a higher seq, reload still picks by log."""
    directory = tmp_path / "snaps"
    store = SnapshotStore(directory)
    await store.save(meta(50), writer(payload(50)))
    stems = {name.rsplit(".", 1)[0] for name in os.listdir(directory)}
    (newest,) = stems
    # Forge what a crash between a later save's rename and its bookkeeping would leave.
    other = SnapshotStore(tmp_path / "other")
    await other.save(meta(20), writer(payload(20)))
    for name in os.listdir(tmp_path / "other"):
        seq_stem = name.replace("00000000000000000000-", "00000000000000000009-", 1)
        data = (tmp_path / "other" / name).read_bytes()
        if name.endswith(".meta"):
            data = data.replace(b'"seq":0', b'"seq":9')
        (directory / seq_stem).write_bytes(data)
    assert len(os.listdir(directory)) == 4
    reloaded = SnapshotStore(directory)
    assert await read_latest(reloaded) == (meta(50), payload(50))
    assert newest.startswith("00000000000000000000-")


async def latest_sha256(store: SnapshotStore) -> str | None:
    snap = await store.open_latest()
    assert snap is not None
    with snap.data:
        return snap.sha256


async def test_open_latest_carries_the_sidecar_sha256(tmp_path: Path) -> None:
    """What a transport sends as the snapshot's checksum: after save, save_from and a reload."""
    store = SnapshotStore(tmp_path)
    assert await store.open_latest() is None
    await store.save(meta(1), writer(payload(1)))
    assert await latest_sha256(store) == hashlib.sha256(payload(1)).hexdigest()
    source = io.BytesIO(payload(2))
    source.seek(99)
    await store.save_from(meta(2), source)
    assert await latest_sha256(store) == hashlib.sha256(payload(2)).hexdigest()
    # a save covering less leaves the latest, and its checksum, alone
    await store.save(meta(1, "older"), writer(payload(3)))
    assert await latest_sha256(store) == hashlib.sha256(payload(2)).hexdigest()
    reloaded = SnapshotStore(tmp_path)
    assert await latest_sha256(reloaded) == hashlib.sha256(payload(2)).hexdigest()


async def test_sha256_follows_the_fallback_after_corruption(tmp_path: Path) -> None:
    data = await _two_snapshots(tmp_path)
    data.write_bytes(data.read_bytes()[:-1])
    store = SnapshotStore(tmp_path)
    assert await latest_sha256(store) == hashlib.sha256(payload(1)).hexdigest()


async def test_a_rebuild_of_the_same_log_replaces_the_latest(tmp_path: Path) -> None:
    """A snapshot of the same last log id saved later wins (the rebuild of a rotten file)."""
    store = SnapshotStore(tmp_path / "snaps")
    await store.save(meta(50, "first"), writer(payload(50)))
    await store.save(meta(50, "rebuilt"), writer(payload(51)))
    assert await read_latest(store) == (meta(50, "rebuilt"), payload(51))
    assert await SnapshotStore(tmp_path / "snaps").latest() == meta(50, "rebuilt")
