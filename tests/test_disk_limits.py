"""A node on a tiny filesystem: snapshot uploads cannot take the disk its log needs.

Needs root (it mounts an 8 MiB tmpfs and removes it afterwards); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from raft_http.kv.node import KVNode
from raft_http.spool import SpoolLimits, free_bytes, spool_files

try:
    from .server_helpers import body_stream
    from .wire_helpers import snapshot_headers, snapshot_meta
except ImportError:
    from server_helpers import body_stream  # type: ignore[no-redef]
    from wire_helpers import snapshot_headers, snapshot_meta  # type: ignore[no-redef]

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted under ``tmp_path``, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def _write(session: aiohttp.ClientSession, node: KVNode, key: str) -> None:
    body = {"Set": {"key": key, "value": f"value of {key}"}}
    async with session.post(f"{node.url}/write", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def test_uploads_never_fill_the_disk_the_log_needs(
    small_disk: Path, session: aiohttp.ClientSession
) -> None:
    data_dir = small_disk / "node1"
    leftover = data_dir / "spool" / "3-00112233aabbccdd.snapshot-part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"\0" * MiB)  # as if a node was killed mid-upload
    reserve = 2 * MiB
    node = KVNode(1, data_dir, spool_limits=SpoolLimits(reserve_bytes=reserve))
    filler = small_disk / "filler"
    try:
        await node.start()
        assert spool_files(data_dir / "spool") == []  # removed at start
        async with session.post(f"{node.url}/init", json=[]) as resp:
            assert resp.status == 200, await resp.text()
        await node.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
        for i in range(20):
            await _write(session, node, f"k{i}")
        url = f"{node.url}/raft/snapshot"
        current = node.raft.current_vote()  # equal to the node's vote: not stale

        # 1. Far more than the disk holds: refused up front, before the body.
        headers = snapshot_headers(current, snapshot_meta("huge", index=10**6), 1024 * MiB)
        async with session.post(url, data=body_stream(1024 * MiB), headers=headers) as resp:
            assert resp.status == 507, await resp.text()
            assert (await resp.json())["error"]["kind"] == "insufficient_storage"

        # 2. Fits when it starts, but the disk fills meanwhile: stopped at the reserve.
        size = free_bytes(small_disk) - reserve - 256 * 1024
        assert size > 2 * MiB

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            async for piece in body_stream(size):
                sent += len(piece)
                if sent >= MiB and not filler.exists():
                    filler.write_bytes(b"\0" * (3 * MiB))
                yield piece

        headers = snapshot_headers(current, snapshot_meta("fills", index=10**6), size)
        async with session.post(url, data=body(), headers=headers) as resp:
            assert resp.status == 507, await resp.text()
            assert (await resp.json())["error"]["kind"] == "insufficient_storage"
        assert spool_files(data_dir / "spool") == []
        assert free_bytes(small_disk) >= reserve

        # The node keeps leading and writing; its log holds every write.
        metrics = node.raft.metrics()
        assert metrics.state == "Leader"
        for i in range(20, 40):
            await _write(session, node, f"k{i}")
    finally:
        await node.stop()
        with contextlib.suppress(FileNotFoundError):
            filler.unlink()
    again = KVNode(1, data_dir)
    try:
        await again.start()
        await again.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
        async with session.post(f"{again.url}/consistent_read", json="k39") as resp:
            assert resp.status == 200, await resp.text()
        assert [again.state_machine.get(f"k{i}") for i in range(40)] == [
            f"value of k{i}" for i in range(40)
        ]
    finally:
        await again.stop()
