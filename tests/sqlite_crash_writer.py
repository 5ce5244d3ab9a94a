"""Appends to a SqliteLogStore until killed, printing each acknowledged index (for a crash test).

Usage: python sqlite_crash_writer.py DB_PATH SEED

Continues the log already in DB_PATH. Entry ``i`` is ``expected_entry(i)``, so a
reader can check every entry byte for byte. After each ``append`` returns it
prints ``ack <last index>`` and flushes: whatever was printed was durable.
"""

from __future__ import annotations

import asyncio
import random
import sys

import msgspec

from raft_http.raft.sqlite_store import SqliteLogStore
from raft_http.types import Entry, LeaderId, LogId, Normal, log_index


def expected_entry(index: int) -> Entry:
    term = 1 + index // 500
    data = msgspec.json.encode({"i": index, "pad": "x" * (index % 97)})
    return Entry(LogId(LeaderId(term, 1), index), Normal(msgspec.Raw(data)))


async def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    store = await SqliteLogStore.open(path)
    next_index = log_index((await store.get_log_state()).last_log_id) + 1
    print(f"start {next_index}", flush=True)
    for _ in range(1_000_000):  # bounded; the test kills it long before
        batch = [expected_entry(i) for i in range(next_index, next_index + rng.randint(1, 40))]
        await store.append(batch)
        next_index += len(batch)
        print(f"ack {next_index - 1}", flush=True)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
