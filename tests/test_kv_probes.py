"""``/health``, ``/ready`` and ``/metrics`` (JSON and Prometheus) on real in-process nodes.

The Prometheus answer is parsed with prometheus-client's own parser and checked against
the JSON metrics of the same node, so a wrong or stale figure fails.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from raft_http.kv import KVClient, KVNode
from raft_http.kv.instruments import NodeInstruments
from raft_http.kv.probes import wants_exposition
from raft_http.raft import Config

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "exposition"),
    [
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        ("text/plain", True),
        ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
        (PROMETHEUS_ACCEPT, True),
        ("application/json, text/plain", False),  # a tie goes to JSON
        ("application/json;q=0.4, text/plain;q=0.5", True),
        ("text/plain;q=bogus, */*", False),
    ],
)
def test_accept_negotiation(accept: str, exposition: bool) -> None:
    assert wants_exposition(accept) is exposition


# --- readiness, from the metrics the core reports -----------------------------------------


class FakeRaft:
    """Metrics set by the test; ``wait_for`` wakes when they change."""

    def __init__(self, **fields: Any) -> None:
        self.m = SimpleNamespace(
            current_leader=None, committed=None, last_applied=None, running=True, **fields
        )
        self.changed = asyncio.Event()

    def metrics(self) -> Any:
        return SimpleNamespace(**vars(self.m))

    def set(self, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(self.m, k, v)
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait_for(self, predicate: Any, timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            while not predicate(self.metrics()):
                await self.changed.wait()
        return self.metrics()

    wait_for_server = wait_for  # wakes at every change: a superset of the server's


def log(index: int) -> Any:
    return SimpleNamespace(index=index)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_ready_waits_for_the_commit_index_known_at_start_and_from_the_leader() -> None:
    raft = FakeRaft()
    raft.m.committed, raft.m.last_applied = log(5), log(3)
    instruments = NodeInstruments()
    instruments.watch(raft)
    try:
        await _settle()
        assert not instruments.ready
        raft.set(last_applied=log(5))
        await _settle()
        assert not instruments.ready, "no leader known yet"
        raft.set(current_leader=2, committed=log(9))
        await _settle()
        assert instruments.ready_at_index == 9
        assert not instruments.ready, "the leader's commit index is not applied yet"
        raft.set(last_applied=log(9))
        await _settle()
        assert instruments.ready
        assert instruments.leader_changes == 1
        raft.set(current_leader=None)
        raft.set(current_leader=3)
        await _settle()
        assert instruments.leader_changes == 2
        raft.set(running=False)
        await _settle()
        assert not instruments.ready
    finally:
        await instruments.close()


# --- real nodes ------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


@pytest.fixture
async def nodes() -> AsyncIterator[list[KVNode]]:
    started: list[KVNode] = []
    yield started
    for node in started:
        await node.stop()


async def start(nodes: list[KVNode], node: KVNode) -> KVNode:
    nodes.append(node)
    await node.start()
    return node


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with session.get(url, headers=headers) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, (resp.headers["Content-Type"], await resp.text())


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


async def wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_probes_and_prometheus_metrics_on_a_cluster(
    tmp_path: Path, session: aiohttp.ClientSession, nodes: list[KVNode]
) -> None:
    config = Config(snapshot_logs_since_last=10, max_in_snapshot_log_to_keep=0)
    for n in (1, 2, 3):
        await start(nodes, KVNode(n, tmp_path / str(n), port=0, config=config))
    assert await get(session, nodes[0].url + "/health") == (
        503,
        {"status": "down", "reason": "not_initialized"},
    )
    assert (await get(session, nodes[0].url + "/ready"))[0] == 503

    async with KVClient([n.addr for n in nodes]) as client:
        await client.init({n.node_id: n.addr for n in nodes})
        for i in range(25):
            await client.put(f"k{i}", "v" * 100)
        leader = next(n for n in nodes if n.url == client.leader_url)
        for node in nodes:
            await wait(lambda node=node: node.state_machine.get("k24") is not None, "applied")
            assert await get(session, node.url + "/health") == (200, {"status": "up"})
            await wait(lambda node=node: node.instruments.ready, "ready")
            assert await get(session, node.url + "/ready") == (200, {"status": "up"})

        # A learner that joins after the logs were purged is sent a snapshot.
        learner = await start(nodes, KVNode(4, tmp_path / "4", port=0, config=config))
        await client.add_learner(4, learner.addr)
        await wait(lambda: learner.state_machine.get("k24") is not None, "the learner caught up")

    status, body = await get(session, leader.url + "/metrics")
    assert status == 200
    assert body["id"] == leader.node_id  # JSON by default: the core's RaftMetrics
    # Compare a scrape with the core's metrics taken just before and after it, unchanged (a
    # busy machine may slip an election in: then ask the new leader again).
    for _ in range(50):
        leader = next((n for n in nodes if n.raft.metrics().state == "Leader"), leader)
        before = leader.raft.metrics()
        status, (content_type, text) = await get(
            session, leader.url + "/metrics", Accept="text/plain"
        )
        m = leader.raft.metrics()
        if (
            before.state == m.state == "Leader"
            and before.current_term == m.current_term
            and before.in_memory_log_bytes == m.in_memory_log_bytes
        ):
            break
        await asyncio.sleep(0.1)
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    s = scrape(text)
    assert s["raft_http_term", ()] == m.current_term
    assert s["raft_http_role", (("role", "Leader"),)] == 1
    assert s["raft_http_role", (("role", "Follower"),)] == 0
    assert s["raft_http_leader_id", ()] == leader.node_id
    assert m.committed is not None
    assert s["raft_http_committed_index", ()] <= m.committed.index
    assert s["raft_http_committed_index", ()] >= 26
    assert s["raft_http_leader_changes_total", ()] >= 1
    assert s["raft_http_pending_writes", ()] == 0
    assert s["raft_http_in_memory_log_bytes", ()] == m.in_memory_log_bytes
    assert s["raft_http_in_memory_log_entries", ()] == m.in_memory_log_entries
    peers = [n for n in nodes if n is not leader]
    for peer in peers:
        p = (("peer", str(peer.node_id)),)
        assert s["raft_http_peer_matched_index", p] <= m.last_log_index
        assert s["raft_http_peer_lag_entries", p] >= 0
        assert s["raft_http_peer_reachable", p] == 1
        # AppendEntries travel over the WebSocket; each message counts as one RPC.
        route = ("route", "/raft/append-stream")
        sent = s["raft_http_rpc_sent_total", (("peer", str(peer.node_id)), route)]
        assert sent >= 1
    assert s["raft_http_snapshot_sends_total", (("peer", "4"),)] >= 1
    assert s["raft_http_snapshot_sent_bytes_total", (("peer", "4"),)] > 100 * 10
    assert s["raft_http_log_fsync_duration_seconds_count", (("op", "append"),)] >= 25
    assert s["raft_http_http_requests_total", (("route", "/write"), ("status", "200"))] >= 1

    # The learner counted the snapshot it installed; a follower counted what it served.
    _, (_, learner_text) = await get(session, learner.url + "/metrics", Accept="text/plain")
    ls = scrape(learner_text)
    assert ls["raft_http_snapshot_installs_total", ()] >= 1
    assert ls["raft_http_snapshot_received_bytes_total", ()] > 100 * 10
    # The leader's AppendEntries arrive on one open WebSocket (answered when it closes).
    assert ls["raft_http_pending_requests", (("route", "/raft/append-stream"),)] >= 1

    # A follower commits most appends on its loop (append_inline): those are timed too.
    follower = peers[1]
    inline = follower.raft._writer.inline_batches
    assert inline > 0
    _, (_, follower_text) = await get(session, follower.url + "/metrics", Accept="text/plain")
    fs = scrape(follower_text)
    assert fs["raft_http_log_fsync_duration_seconds_count", (("op", "append"),)] >= inline

    # OpenMetrics to a Prometheus scrape.
    status, (content_type, text) = await get(
        session, leader.url + "/metrics", Accept=PROMETHEUS_ACCEPT
    )
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")

    # A follower that stops is soon unreachable in the leader's metrics.
    stopped = peers[0]
    await stopped.stop()
    nodes.remove(stopped)

    async def reachable() -> float:
        _, (_, text) = await get(session, leader.url + "/metrics", Accept="text/plain")
        return scrape(text)["raft_http_peer_reachable", (("peer", str(stopped.node_id)),)]

    for _ in range(100):
        if await reachable() == 0:
            break
        await asyncio.sleep(0.05)
    assert await reachable() == 0


async def test_with_an_api_token_probes_stay_open_and_say_only_up_or_down(
    tmp_path: Path, session: aiohttp.ClientSession, nodes: list[KVNode]
) -> None:
    node = await start(nodes, KVNode(1, tmp_path / "1", port=0, api_token="s3cret"))
    assert await get(session, node.url + "/health") == (503, {"status": "down"})
    assert await get(session, node.url + "/ready") == (503, {"status": "down"})
    assert (await get(session, node.url + "/metrics"))[0] == 401
    assert (await get(session, node.url + "/metrics", Accept="text/plain"))[0] == 401
    async with KVClient(node.addr, token="s3cret") as client:
        await client.init()
        await client.put("a", "1")
    assert await get(session, node.url + "/health") == (200, {"status": "up"})
    await wait(lambda: node.instruments.ready, "ready")
    assert await get(session, node.url + "/ready") == (200, {"status": "up"})


async def test_without_prometheus_client_the_text_format_is_a_json_406(
    tmp_path: Path,
    session: aiohttp.ClientSession,
    nodes: list[KVNode],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = await start(nodes, KVNode(1, tmp_path / "1", port=0))
    monkeypatch.setitem(sys.modules, "raft_http.kv.prometheus", None)  # import fails
    status, body = await get(session, node.url + "/metrics", Accept="text/plain")
    assert status == 406
    assert body["error"]["kind"] == "not_acceptable"
    assert "raft-http[metrics]" in body["error"]["message"]
    status, body = await get(session, node.url + "/metrics")
    assert (status, body["id"]) == (200, 1)
