"""SnapshotSpool on its own: offsets, leases, supersession, expiry, cleanup."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import raft_http.spool
from raft_http.spool import (
    InsufficientStorage,
    OffsetMismatch,
    SizeConflict,
    SnapshotSpool,
    SnapshotTooLarge,
    SpoolFull,
    SpoolLimits,
    SpoolLost,
    spool_files,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def spool(tmp_path: Path) -> SnapshotSpool:
    s = SnapshotSpool(tmp_path / "spool", idle_timeout=10, clock=FakeClock())
    await s.start()
    return s


async def test_append_counts_and_keeps_the_exact_bytes(spool: SnapshotSpool) -> None:
    lease = await spool.claim("a", 0)
    assert await spool.append(lease, b"hello ") == 6
    assert await spool.append(lease, bytearray(b"world")) == 11
    assert spool.held("a") == 11
    assert spool.held("other") == 0
    f = await spool.open_for_install(lease)
    try:
        assert f.read() == b"hello world"
    finally:
        f.close()
    await spool.remove("a", lease)
    assert spool.held("a") == 0
    assert spool_files(spool.directory) == []


async def test_resume_must_start_at_the_bytes_held(spool: SnapshotSpool) -> None:
    lease = await spool.claim("a", 0)
    await spool.append(lease, b"12345")
    with pytest.raises(OffsetMismatch) as info:
        await spool.claim("a", 3)
    assert info.value.expected == 5
    with pytest.raises(OffsetMismatch) as info:
        await spool.claim("never-seen", 3)
    assert info.value.expected == 0
    resumed = await spool.claim("a", 5)
    assert await spool.append(resumed, b"678") == 8


async def test_a_newer_claim_takes_the_id_over(spool: SnapshotSpool) -> None:
    stale = await spool.claim("a", 0)
    await spool.append(stale, b"abc")
    fresh = await spool.claim("a", 3)
    with pytest.raises(SpoolLost):
        await spool.append(stale, b"zzz")
    assert await spool.append(fresh, b"def") == 6
    # remove() with the stale lease leaves the new owner alone
    await spool.remove("a", stale)
    assert spool.held("a") == 6


async def test_offset_zero_supersedes_every_other_partial(spool: SnapshotSpool) -> None:
    a = await spool.claim("a", 0)
    await spool.append(a, b"aaa")
    b = await spool.claim("b", 0)
    await spool.append(b, b"bb")
    assert spool.snapshot_ids() == ["b"]
    assert spool.held("a") == 0
    with pytest.raises(SpoolLost):
        await spool.append(a, b"more")
    again = await spool.claim("b", 0)  # offset 0 of the same id restarts it
    assert spool.held("b") == 0
    assert await spool.append(again, b"x") == 1
    assert len(spool_files(spool.directory)) == 1


async def test_idle_partials_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = SnapshotSpool(tmp_path, idle_timeout=10, clock=clock)
    await spool.start()
    lease = await spool.claim("a", 0)
    await spool.append(lease, b"x")
    clock.now += 9
    assert await spool.expire_idle() == []
    await spool.append(lease, b"y")  # progress resets the idle clock
    clock.now += 9
    assert await spool.expire_idle() == []
    clock.now += 2
    assert await spool.expire_idle() == ["a"]
    assert spool.held("a") == 0
    assert spool_files(tmp_path) == []
    with pytest.raises(SpoolLost):
        await spool.append(lease, b"z")


async def test_a_snapshot_being_installed_does_not_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = SnapshotSpool(tmp_path, idle_timeout=10, clock=clock)
    await spool.start()
    lease = await spool.claim("a", 0)
    await spool.append(lease, b"data")
    f = await spool.open_for_install(lease)
    clock.now += 100
    assert await spool.expire_idle() == []
    assert f.read() == b"data"
    f.close()


async def test_close_removes_files_and_only_its_own_temp_dir(tmp_path: Path) -> None:
    given = SnapshotSpool(tmp_path)
    await given.start()
    (tmp_path / "unrelated.txt").write_text("keep me")
    await given.append(await given.claim("a", 0), b"x")
    await given.close()
    assert spool_files(tmp_path) == []
    assert (tmp_path / "unrelated.txt").exists()

    temp = SnapshotSpool()
    await temp.start()
    directory = temp.directory
    await temp.append(await temp.claim("a", 0), b"x")
    await temp.close()
    assert not directory.exists()


async def test_ids_are_never_used_as_file_names(spool: SnapshotSpool) -> None:
    lease = await spool.claim("../../etc/passwd", 0)
    await spool.append(lease, b"x")
    [path] = spool_files(spool.directory)
    assert path.parent == spool.directory


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        SnapshotSpool(idle_timeout=0)
    with pytest.raises(ValueError, match="max_uploads"):
        SpoolLimits(max_uploads=0)
    with pytest.raises(ValueError, match="reserve_bytes"):
        SpoolLimits(reserve_bytes=-1)


# --- limits ----------------------------------------------------------------------------


class FakeDisk:
    """``free_bytes`` of a disk with ``free`` bytes, minus what the spool has written."""

    def __init__(self, spool_dir: Path, free: int) -> None:
        self.spool_dir = spool_dir
        self.free = free

    def __call__(self, directory: Path) -> int:
        used = sum(p.stat().st_size for p in spool_files(self.spool_dir))
        return self.free - used


async def limited(tmp_path: Path, free: int = 10_000, **limits: int) -> SnapshotSpool:
    limits.setdefault("reserve_bytes", 0)
    spool = SnapshotSpool(tmp_path / "spool", limits=SpoolLimits(**limits))
    await spool.start()
    raft_http.spool.free_bytes = FakeDisk(spool.directory, free)  # undone by the fixture
    return spool


@pytest.fixture(autouse=True)
def _real_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raft_http.spool, "free_bytes", raft_http.spool.free_bytes)


async def test_a_declared_size_over_the_cap_is_refused_before_any_file(tmp_path: Path) -> None:
    spool = await limited(tmp_path, max_snapshot_size=1000)
    with pytest.raises(SnapshotTooLarge) as info:
        await spool.claim("big", 0, size=1001)
    assert info.value.limit == 1000
    assert spool_files(spool.directory) == []
    lease = await spool.claim("ok", 0, size=1000)
    # A resume is checked too: it cannot grow an upload past the cap.
    await spool.append(lease, b"x" * 10)
    with pytest.raises(SnapshotTooLarge):
        await spool.claim("ok", 10, size=5000)
    with pytest.raises(SizeConflict):
        await spool.claim("ok", 10, size=999)
    assert spool.snapshot_ids() == []  # a resume that changes the size drops the upload


async def test_the_per_chunk_form_is_capped_as_it_grows(tmp_path: Path) -> None:
    spool = await limited(tmp_path, max_snapshot_size=100)
    lease = await spool.claim("a", 0)  # no declared size
    await spool.append(lease, b"x" * 60)
    with pytest.raises(SnapshotTooLarge):
        await spool.append(lease, b"x" * 41)
    assert spool.snapshot_ids() == []
    assert spool_files(spool.directory) == []


async def test_a_declared_size_over_free_space_minus_reserve_is_refused(tmp_path: Path) -> None:
    spool = await limited(tmp_path, free=10_000, reserve_bytes=4_000)
    with pytest.raises(InsufficientStorage) as info:
        await spool.claim("a", 0, size=6_001)
    assert info.value.available == 6_000
    assert spool_files(spool.directory) == []
    lease = await spool.claim("a", 0, size=6_000)
    assert await spool.append(lease, b"x" * 6_000) == 6_000


async def test_a_write_that_would_eat_the_reserve_is_refused_and_the_partial_dropped(
    tmp_path: Path,
) -> None:
    spool = await limited(tmp_path, free=10_000, reserve_bytes=4_000)
    lease = await spool.claim("a", 0, size=5_000)
    await spool.append(lease, b"x" * 2_000)
    raft_http.spool.free_bytes = FakeDisk(spool.directory, 7_000)  # someone else wrote 3,000
    with pytest.raises(InsufficientStorage):
        await spool.append(lease, b"x" * 2_000)
    assert spool.snapshot_ids() == []
    assert spool_files(spool.directory) == []


async def test_space_promised_to_an_upload_in_progress_is_not_promised_twice(
    tmp_path: Path,
) -> None:
    spool = await limited(tmp_path, free=10_000, reserve_bytes=0)
    first = await spool.claim("a", 0, size=6_000)
    await spool.append(first, b"x" * 1_000)
    await spool.open_for_install(first)  # installing: a new upload does not supersede it
    with pytest.raises(InsufficientStorage):
        await spool.claim("b", 0, size=5_000)  # 1,000 written + 5,000 promised to "a"
    assert await spool.claim("b", 0, size=4_000)


async def test_uploads_being_installed_bound_new_ones_by_count_and_bytes(tmp_path: Path) -> None:
    spool = await limited(
        tmp_path, free=10**9, max_uploads=2, max_snapshot_size=1_000, max_total_bytes=1_500
    )
    a = await spool.claim("a", 0, size=1_000)
    await spool.append(a, b"x" * 1_000)
    (await spool.open_for_install(a)).close()
    with pytest.raises(SpoolFull, match="retry later"):
        await spool.claim("b", 0, size=600)  # 1,000 + 600 > 1,500
    b = await spool.claim("b", 0, size=500)
    await spool.append(b, b"x" * 500)
    (await spool.open_for_install(b)).close()
    with pytest.raises(SpoolFull, match="limit is 2"):
        await spool.claim("c", 0, size=0)
    await spool.remove("a")
    assert await spool.claim("c", 0, size=0)


async def test_concurrent_fresh_claims_leave_one_partial(tmp_path: Path) -> None:
    spool = await limited(tmp_path, free=10**9, max_uploads=4)
    results = await asyncio.gather(
        *(spool.claim(f"id-{i}", 0, size=10) for i in range(200)), return_exceptions=True
    )
    assert all(isinstance(r, Exception | raft_http.spool.SpoolLease) for r in results)
    assert len(spool.snapshot_ids()) == 1
    assert len(spool_files(spool.directory)) == 1


async def test_partials_left_by_a_killed_process_are_removed_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "7-0123456789abcdef.snapshot-part").write_bytes(b"x" * 4096)
    (directory / "operator-notes.txt").write_text("not ours")
    spool = SnapshotSpool(directory)
    await spool.start()
    assert spool_files(directory) == []
    assert (directory / "operator-notes.txt").exists()
    assert spool.held("anything") == 0


# --- the running hash and the open file ------------------------------------------------


async def test_the_digest_follows_every_batch_and_resume(spool: SnapshotSpool) -> None:
    import hashlib

    lease = await spool.claim("a", 0, sha256="0" * 64, size=12)
    await spool.append(lease, [b"he", bytearray(b"llo"), memoryview(b" ")])
    resumed = await spool.claim("a", 6, sha256="0" * 64, size=12)
    await spool.append(resumed, b"world!")
    assert spool.digest(resumed) == hashlib.sha256(b"hello world!").hexdigest()
    with pytest.raises(SpoolLost):
        spool.digest(lease)  # the stale lease no longer names this upload
    f = await spool.open_for_install(resumed)
    try:
        assert f.read() == b"hello world!"
    finally:
        f.close()


async def test_superseding_an_upload_mid_write_loses_it_without_closing_under_the_writer(
    spool: SnapshotSpool,
) -> None:
    lease = await spool.claim("a", 0)
    big = [b"x" * (1 << 20)] * 32
    writing = asyncio.ensure_future(spool.append(lease, big))
    await asyncio.sleep(0)  # the batch is in its worker thread
    fresh = await spool.claim("b", 0)
    with pytest.raises(SpoolLost):
        await writing
    assert await spool.append(fresh, b"ok") == 2
    await asyncio.sleep(0.1)  # the superseded file is closed once its write is over
    [path] = spool_files(spool.directory)
    assert path.read_bytes() == b"ok"
