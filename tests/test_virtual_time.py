"""The virtual-time event loop (tests/sim/loop.py) and the @on_virtual_time test decorator."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from raft_cluster import Cluster
from sim.loop import Deadlock, VirtualTimeLoop, run_virtual
from sim.virtual_time import on_virtual_time


def test_sleeps_and_timeouts_take_no_wall_time() -> None:
    async def main() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        timed_out = False
        try:
            async with asyncio.timeout(60):
                await asyncio.sleep(120)
        except TimeoutError:
            timed_out = True
        return loop.time() - start, timed_out

    wall = time.monotonic()
    elapsed, timed_out = run_virtual(main())
    assert elapsed == pytest.approx(3660)
    assert timed_out
    assert time.monotonic() - wall < 5


def test_to_thread_runs_inline_in_the_loop_thread() -> None:
    async def main() -> int:
        return await asyncio.to_thread(threading.get_ident)

    assert run_virtual(main()) == threading.get_ident()


def test_a_wait_nothing_can_end_is_a_deadlock_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Deadlock):
        run_virtual(main())


def test_sets_of_tasks_iterate_in_creation_order() -> None:
    async def main() -> list[int]:
        tasks = [asyncio.create_task(asyncio.sleep(0, result=i)) for i in range(50)]
        hashes = [hash(t) for t in tasks]
        assert hashes == sorted(hashes)  # creation numbers, not addresses
        done, _ = await asyncio.wait(set(tasks))
        return [t.result() for t in done]

    first = run_virtual(main())
    assert first == run_virtual(main())
    assert sorted(first) == list(range(50))


def test_every_loop_step_calls_the_hook() -> None:
    loop = VirtualTimeLoop()
    calls: list[float] = []
    loop.after_step = lambda: calls.append(loop.time())

    async def main() -> None:
        for _ in range(3):
            await asyncio.sleep(1)

    run_virtual(main(), loop)
    assert len(calls) >= 3
    assert calls == sorted(calls)


seen: list[Cluster] = []


@on_virtual_time
async def test_on_virtual_time_hands_over_a_cluster(cluster: Cluster) -> None:
    leader = await cluster.initialized([1, 2, 3])
    await asyncio.sleep(600)  # ten virtual minutes of heartbeats
    assert leader.metrics().current_term == 1
    assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    seen.append(cluster)


def test_on_virtual_time_closed_the_cluster() -> None:
    assert seen
    assert not seen[-1].nodes
