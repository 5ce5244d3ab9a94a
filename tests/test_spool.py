"""SnapshotSpool on its own: offsets, leases, supersession, expiry, cleanup."""

from __future__ import annotations

from pathlib import Path

import pytest

from raft_http.spool import OffsetMismatch, SnapshotSpool, SpoolLost, spool_files


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
