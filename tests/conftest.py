"""Fixtures shared by the Raft core's test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from raft_cluster import Cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """An empty in-process cluster (fast timers); every node is shut down afterwards."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()
