"""The live status page (``GET /``) in a real headless chromium against three node processes.

The page must render every member, and after the leader is SIGKILLed show the new leader
(and the old one unreachable) within a few seconds, in the same page, without a reload.
Screenshots go to a temp dir whose path is printed. Skips only when chromium is absent
outside CI; in CI (CI=true) a missing browser fails.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from .browser_helpers import Chromium
    from .cluster_helpers import ProcessCluster, http, wait_for
except ImportError:
    from browser_helpers import Chromium  # type: ignore[no-redef]
    from cluster_helpers import ProcessCluster, http, wait_for  # type: ignore[no-redef]

CHROMIUM = Chromium.find()
IN_CI = os.environ.get("CI") == "true"

ROWS = "JSON.stringify([...document.querySelectorAll('#members tr')].map(r => [+r.dataset.node, r.dataset.role]))"  # noqa: E501
# Null-safe: the first evaluation may run before the page's document is in place.
LEADER = "document.getElementById('leader')?.dataset.leader || null"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ProcessCluster]:
    c = ProcessCluster(tmp_path, [1, 2, 3])
    try:
        c.start_all()
        c.call(1, "/init", [[n, c.addr(n)] for n in (1, 2, 3)])
        c.wait_leader()
        yield c
    finally:
        c.close()
        print(c.logs())


def test_the_page_is_self_contained(cluster: ProcessCluster) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{cluster.addr(1)}/", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        page = resp.read().decode()
    assert "<script" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "an external asset"
    assert "<link" not in page

    def three_members() -> dict[str, Any] | None:
        status, _, body = http("GET", f"http://{cluster.addr(2)}/cluster-status")
        assert status == 200, body
        return body if [m["id"] for m in body["members"]] == [1, 2, 3] else None

    body = wait_for("node 2 to report three members", three_members, 15)
    assert body["leader"] == cluster.leader()


async def _wait_page(page: Chromium, predicate: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        rows = json.loads(await page.evaluate(ROWS) or "[]")
        leader = await page.evaluate(LEADER)
        last = (rows, None if leader is None else int(leader))
        if predicate(*last):
            return last
        await _sleep(0.1)
    raise AssertionError(f"the page did not show {what} within {timeout:g}s; it shows {last}")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.mark.skipif(
    CHROMIUM is None and not IN_CI, reason="chromium is not installed (CI installs it)"
)
async def test_the_page_follows_a_failover_live(cluster: ProcessCluster) -> None:
    assert CHROMIUM is not None, "CI must have chromium (.ci/run installs it)"
    shots = Path(tempfile.mkdtemp(prefix="raft-http-status-page-"))
    print(f"status page screenshots in {shots}")
    leader = cluster.wait_leader()
    follower = next(n for n in (1, 2, 3) if n != leader)
    async with Chromium(CHROMIUM) as page:
        await page.goto(f"http://{cluster.addr(follower)}/")
        rows, shown = await _wait_page(
            page,
            lambda rows, shown: (
                sorted(r for _, r in rows) == ["Follower", "Follower", "Leader"]
                and dict(rows)[shown] == "Leader"
                and shown == cluster.leader()
            ),
            "three members, the leader the nodes agree on and two followers",
            timeout=15,
        )
        leader = shown
        assert sorted(n for n, _ in rows) == [1, 2, 3]
        assert dict(rows)[leader] == "Leader"
        assert sorted(r for n, r in rows if n != leader) == ["Follower", "Follower"]
        await page.screenshot(shots / "1-three-nodes.png")
        if leader == follower:  # re-elected meanwhile: the page must still be served by a survivor
            await page.goto(f"http://{cluster.addr(next(n for n in (1, 2, 3) if n != leader))}/")

        cluster.kill(leader)
        killed_at = time.monotonic()
        rows, shown = await _wait_page(
            page,
            lambda rows, shown: (
                shown not in (None, leader)
                and dict(rows).get(leader) == "unreachable"
                and dict(rows).get(shown) == "Leader"
            ),
            "a new leader and the old one unreachable",
            timeout=10,
        )
        took = time.monotonic() - killed_at
        await page.screenshot(shots / "2-after-failover.png")
        print(f"the page showed leader {shown} {took:.1f}s after leader {leader} was killed")
        assert shown == cluster.wait_leader(among=[n for n in (1, 2, 3) if n != leader])
        text = await page.evaluate("document.body.innerText")
        assert "raft-http cluster" in text


async def test_with_an_api_token_the_page_is_open_and_its_data_is_not(tmp_path: Path) -> None:
    import aiohttp

    from raft_http.kv import KVClient, KVNode

    open_node = KVNode(1, tmp_path / "open", port=0)
    guarded = KVNode(2, tmp_path / "guarded", port=0, api_token="s3cret")
    try:
        for node in (open_node, guarded):
            await node.start()
        async with KVClient(guarded.addr, token="s3cret") as client:
            await client.init()
        await guarded.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
        async with aiohttp.ClientSession() as s:
            async with s.get(guarded.url + "/") as resp:
                assert resp.status == 200
                assert "cluster-status" in await resp.text()
            async with s.get(guarded.url + "/cluster-status") as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer s3cret"}
            async with s.get(guarded.url + "/cluster-status", headers=auth) as resp:
                assert resp.status == 200
                assert "Access-Control-Allow-Origin" not in resp.headers
                body = await resp.json()
            assert [(m["id"], m["role"]) for m in body["members"]] == [(2, "Leader")]
            # Without a token, other members' pages may ask this one (the page's fallback).
            async with s.get(open_node.url + "/cluster-status") as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        for node in (open_node, guarded):
            await node.stop()
