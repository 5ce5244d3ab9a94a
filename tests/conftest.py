"""Fixtures shared by the test modules: the core's in-process cluster, and KV nodes with a
JSON client session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from raft_cluster import Cluster
from raft_http.kv.node import KVNode


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An empty in-process cluster (fast timers); every node is shut down afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that sends JSON (the KV API refuses other content types)."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=15), headers={"Content-Type": "application/json"}
    ) as s:
        yield s


@pytest.fixture
async def nodes() -> AsyncIterator[list[KVNode]]:
    """``KVNode``s a test appends once started; each is stopped afterwards."""
    started: list[KVNode] = []
    yield started
    for node in started:
        await node.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the deterministic simulation (tests/test_simulation.py) ran, if it ran."""
    from sim.summary import TOTALS

    if TOTALS.seeds:
        terminalreporter.section("raft simulation")
        for line in TOTALS.lines():
            terminalreporter.write_line(line)
