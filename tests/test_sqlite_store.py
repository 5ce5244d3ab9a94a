"""SQLite-only behaviour of ``SqliteLogStore``: reopening, crash durability, corruption.

The ``LogStore`` contract itself runs against this store in test_memory_store.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

from raft_http.raft.sqlite_store import SqliteLogStore
from raft_http.raft.storage import LogState, StorageError
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    AppendEntriesRequest,
    Entry,
    LeaderId,
    LogId,
    Normal,
    Vote,
)

WRITER = Path(__file__).with_name("sqlite_crash_writer.py")


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sqlite_crash_writer", WRITER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer = _load_writer()


def entry(index: int, term: int = 1) -> Entry:
    data = msgspec.json.encode({"i": index})
    return Entry(LogId(LeaderId(term, 1), index), Normal(msgspec.Raw(data)))


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "log.db"  # parents are created
    store = await SqliteLogStore.open(path)
    await store.append([entry(i) for i in range(20)])
    await store.purge(LogId(LeaderId(1, 1), 4))
    await store.truncate(15)
    await store.save_vote(Vote(LeaderId(2, 3), committed=True))
    await store.save_committed(LogId(LeaderId(1, 1), 12))
    await store.close()

    store = await SqliteLogStore.open(path)
    try:
        assert await store.get_log_state() == LogState(
            LogId(LeaderId(1, 1), 4), LogId(LeaderId(1, 1), 14)
        )
        assert await store.read_entries(0, 100) == [entry(i) for i in range(5, 15)]
        assert await store.read_vote() == Vote(LeaderId(2, 3), committed=True)
        assert await store.read_committed() == LogId(LeaderId(1, 1), 12)
    finally:
        await store.close()


async def test_reopen_after_purging_everything(tmp_path: Path) -> None:
    store = await SqliteLogStore.open(tmp_path / "log.db")
    await store.append([entry(i) for i in range(3)])
    await store.purge(LogId(LeaderId(2, 1), 10))
    await store.close()
    store = await SqliteLogStore.open(tmp_path / "log.db")
    try:
        purged = LogId(LeaderId(2, 1), 10)
        assert await store.get_log_state() == LogState(purged, purged)
        await store.append([entry(11, term=2)])
        assert await store.read_entries(0, 100) == [entry(11, term=2)]
    finally:
        await store.close()


async def test_stored_entries_do_not_pin_request_buffers(tmp_path: Path) -> None:
    """Entries read back are decoded from their own row, not from one shared buffer."""
    request = APPEND_ENTRIES_REQUEST.decode(
        APPEND_ENTRIES_REQUEST.encode(
            AppendEntriesRequest(Vote(LeaderId(1, 1)), None, [entry(i) for i in range(10)], None)
        )
    )
    store = await SqliteLogStore.open(tmp_path / "log.db")
    try:
        await store.append(request.entries)
        read = await store.read_entries(0, 10)
        assert read == request.entries
        sizes = {len(bytes(e.payload.data)) for e in read if isinstance(e.payload, Normal)}
        assert max(sizes) < 20  # each Raw is its entry's data, not the request
    finally:
        await store.close()


async def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    """WAL with synchronous=FULL, and still FULL after the one write that skips the fsync."""
    store = await SqliteLogStore.open(tmp_path / "log.db")
    try:

        def pragma(name: str) -> object:
            return store._conn.execute(f"PRAGMA {name}").fetchone()[0]

        assert await store._run(pragma, "journal_mode") == "wal"
        assert await store._run(pragma, "synchronous") == 2  # FULL
        await store.save_committed(LogId(LeaderId(1, 1), 0))
        assert await store._run(pragma, "synchronous") == 2
    finally:
        await store.close()


async def test_gap_in_the_file_is_detected_on_open(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = await SqliteLogStore.open(path)
    await store.append([entry(i) for i in range(5)])
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM entries WHERE idx = 2")
    conn.close()
    with pytest.raises(StorageError, match="gaps"):
        await SqliteLogStore.open(path)


async def test_garbled_entry_raises_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = await SqliteLogStore.open(path)
    await store.append([entry(i) for i in range(5)])
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE entries SET payload = ? WHERE idx = 3", (b'{"log_id": 7}',))
    conn.close()
    store = await SqliteLogStore.open(path)
    try:
        assert await store.read_entries(0, 3) == [entry(i) for i in range(3)]
        with pytest.raises(StorageError) as info:
            await store.read_entries(0, 5)
        assert isinstance(info.value.__cause__, msgspec.DecodeError)
    finally:
        await store.close()


async def test_not_a_database_raises_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    path.write_bytes(b"this is not an sqlite database, just some text" * 100)
    with pytest.raises(StorageError) as info:
        await SqliteLogStore.open(path)
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_unwritable_location_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError):
        await SqliteLogStore.open(tmp_path / "file" / "log.db")  # parent is a file


def test_acknowledged_entries_survive_sigkill(tmp_path: Path) -> None:
    """Kill a writer at random moments; every acknowledged entry is there, intact, in order."""
    path = tmp_path / "log.db"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    total_acked = -1
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), str(seed + round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "the writer did not start within 30 s"
            time.sleep(rng.uniform(0.05, 1.0))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines = out.decode().split()
        assert lines[:1] == ["start"], err.decode()
        start = int(lines[1])
        assert start >= total_acked + 1  # the reopened log holds every acknowledged entry
        acked = [int(x) for kind, x in zip(lines[::2], lines[1::2], strict=True) if kind == "ack"]
        if acked:
            total_acked = acked[-1]

        log = _read_back(path)
        assert [e.log_id.index for e in log] == list(range(len(log))), "not a consecutive prefix"
        assert len(log) - 1 >= total_acked, f"acknowledged {total_acked}, found {len(log) - 1}"
        assert log == [writer.expected_entry(i) for i in range(len(log))]
    assert total_acked >= 0, "no append was ever acknowledged"


def _read_back(path: Path) -> list[Entry]:
    async def read() -> list[Entry]:
        store = await SqliteLogStore.open(path)
        try:
            state = await store.get_log_state()
            assert state.last_purged_log_id is None
            last = -1 if state.last_log_id is None else state.last_log_id.index
            return await store.read_entries(0, last + 1)
        finally:
            await store.close()

    return asyncio.run(read())
