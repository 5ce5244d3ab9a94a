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
import threading
import time
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

from raft_http.raft.sqlite_store import SqliteLogStore
from raft_http.raft.storage import LogState, StorageError
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    ENTRY,
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


# --- append_inline: a small append on the caller's thread while the worker is idle ----------


def _statement_threads(store: SqliteLogStore) -> list[int]:
    """The thread ids that ran each INSERT on ``store``'s connection, from now on."""
    threads: list[int] = []

    def traced(statement: str) -> None:
        if statement.startswith("INSERT INTO entries"):
            threads.append(threading.get_ident())

    store._conn.set_trace_callback(traced)
    return threads


async def test_append_inline_commits_on_the_calling_thread(tmp_path: Path) -> None:
    store = await SqliteLogStore.open(tmp_path / "log.db")
    threads = _statement_threads(store)
    try:
        assert store.append_inline([entry(0), entry(1)])
        # Done on return: the state says so without an await, and it was this thread.
        assert (await store.get_log_state()).last_log_id == entry(1).log_id
        await store.append([entry(2)])  # the worker thread, as before
        me = threading.get_ident()
        assert threads[:2] == [me, me]  # one INSERT per row
        assert len(threads) == 3
        assert threads[2] != me
        assert store.append_inline([])  # nothing to write
    finally:
        await store.close()
    reopened = await SqliteLogStore.open(tmp_path / "log.db")
    try:
        assert [e.log_id.index for e in await reopened.read_entries(0, 10)] == [0, 1, 2]
    finally:
        await reopened.close()


async def test_append_inline_declines_while_the_worker_has_a_call(tmp_path: Path) -> None:
    """The connection is the worker's while a call is queued on it or running there, even
    once the task awaiting that call was cancelled: the thread goes on with it. A call
    cancelled before the worker started it never runs, and holds nothing."""
    store = await SqliteLogStore.open(tmp_path / "log.db")
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait(5)

    try:
        await store.append([entry(0)])
        running = asyncio.create_task(store._run(hold))
        assert await asyncio.to_thread(started.wait, 5)
        queued = asyncio.create_task(store._run(lambda: None))
        await asyncio.sleep(0)
        assert not store.append_inline([entry(1)])
        queued.cancel()
        running.cancel()
        for task in (queued, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not store.append_inline([entry(1)]), "the worker still runs the cancelled call"
        assert (await store.get_log_state()).last_log_id == entry(0).log_id
        gate.set()
        deadline = time.monotonic() + 5
        while not store.append_inline([entry(1)]):
            assert time.monotonic() < deadline, "the worker never gave the connection back"
            await asyncio.sleep(0.005)
        assert [e.log_id.index for e in await store.read_entries(0, 10)] == [0, 1]
    finally:
        gate.set()
        await store.close()


async def test_append_inline_declines_a_batch_over_its_limit(tmp_path: Path) -> None:
    one = len(ENTRY.encode(entry(0)))  # as the store encodes a row
    store = await SqliteLogStore.open(tmp_path / "log.db", inline_append_bytes=2 * one + 1)
    try:
        assert not store.append_inline([entry(0), entry(1), entry(2)])
        assert (await store.get_log_state()).last_log_id is None  # nothing written
        assert store.append_inline([entry(0), entry(1)])
        with pytest.raises(StorageError, match="out of order"):
            store.append_inline([entry(5)])  # as ``append`` refuses it
    finally:
        await store.close()
    never = await SqliteLogStore.open(tmp_path / "never.db", inline_append_bytes=0)
    try:
        assert not never.append_inline([entry(0)])
        with pytest.raises(ValueError, match="inline_append_bytes"):
            await SqliteLogStore.open(tmp_path / "bad.db", inline_append_bytes=-1)
    finally:
        await never.close()
    closed = await SqliteLogStore.open(tmp_path / "closed.db")
    await closed.close()
    assert not closed.append_inline([entry(0)])


class _FailingReturnToFsync:
    """A connection on which turning fsync back on fails (a disk I/O error, say)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "PRAGMA synchronous = FULL":
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __enter__(self) -> sqlite3.Connection:
        return self._conn.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._conn.__exit__(*exc)


async def test_a_store_left_without_fsync_refuses_every_later_write(tmp_path: Path) -> None:
    """The commit index is saved without an fsync. Should the connection then fail to go
    back to ``synchronous=FULL``, the core shrugs off that save's error, so the store
    itself must refuse later writes rather than commit them without an fsync."""
    store = await SqliteLogStore.open(tmp_path / "log.db")
    real = store._conn
    try:
        await store.append([entry(0)])
        store._conn = _FailingReturnToFsync(real)  # type: ignore[assignment]
        with pytest.raises(StorageError, match="disk I/O error"):
            await store.save_committed(entry(0).log_id)
        store._conn = real
        with pytest.raises(StorageError, match="fsync back on"):
            await store.append([entry(1)])
        with pytest.raises(StorageError, match="fsync back on"):
            store.append_inline([entry(1)])
        assert (await store.get_log_state()).last_log_id == entry(0).log_id
    finally:
        store._conn = real
        await store.close()
