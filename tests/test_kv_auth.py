"""Access control on the KV API: no route but the probes answers a caller without the token.

The attack this guards against (issue 9, item 1): with nodes started with ``--token``, an
unauthenticated ``POST /add-learner [9, "<attacker>"]`` to the leader, or ``/init`` on a fresh
node, made the node send its Raft token and cluster name to the attacker's server. Each attack
runs against a fake attacker server that records what reaches it, with a positive control (the
same request WITH the token does reach it), so the test can tell "refused" from "not looked at".
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cluster_helpers import HOST, free_ports, http, wait_for
from raft_http.kv.api import OPEN_PATHS, kv_api
from raft_http.kv.node import KVNode
from raft_http.kv.state_machine import KVStateMachine
from test_kv_api import ScriptedRaft

TOKEN = "raft-s3cret"
API_TOKEN = "api-s3cret"
CLUSTER = "kv-auth-test"
JSON = {"Content-Type": "application/json"}

# A body each route accepts, so a refusal can only come from the missing credential.
GOOD_BODIES: dict[str, bytes] = {
    "/init": b"[]",
    "/add-learner": b'[4,"127.0.0.1:21004"]',
    "/change-membership": b"[1,2]",
    "/write": b'{"Set":{"key":"k","value":"v"}}',
    "/read": b'"k"',
    "/consistent_read": b'"k"',
}


def _bearer(token: str) -> dict[str, str]:
    return {**JSON, "Authorization": f"Bearer {token}"}


async def _refused(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 401, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["kind"] == "unauthorized"
    assert "Bearer" in resp.headers["WWW-Authenticate"]


# --- every route of kv_api, with a scripted Raft --------------------------------------------


@pytest.fixture
async def guarded(raft: ScriptedRaft, aiohttp_client: Any) -> TestClient[Any, Any]:
    app = kv_api(raft, KVStateMachine(), node_id=1, addr="127.0.0.1:21001", api_token=API_TOKEN)
    return await aiohttp_client(app, headers={"Content-Type": "application/json"})


@pytest.fixture
def raft() -> ScriptedRaft:
    return ScriptedRaft()


def _guarded_routes(client: TestClient[Any, Any]) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from its router (new routes are covered too)."""
    routes = []
    for route in client.server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path and path not in OPEN_PATHS:
            routes.append((route.method, path))
    return routes


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", f"Bearer {TOKEN}", f"bearer {API_TOKEN}", f"Basic {API_TOKEN}"],
)
async def test_every_route_refuses_a_missing_or_wrong_token(
    guarded: TestClient[Any, Any], raft: ScriptedRaft, authorization: str | None
) -> None:
    routes = _guarded_routes(guarded)
    assert {path for _, path in routes} >= {*GOOD_BODIES, "/metrics"}
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization
    for method, path in routes:
        body = GOOD_BODIES.get(path, b"")
        await _refused(await guarded.request(method, path, data=body, headers=headers))
    # Unknown routes and methods too: a caller without the token cannot even map the API.
    await _refused(await guarded.get("/nope", headers=headers))
    await _refused(await guarded.get("/write", headers=headers))
    assert raft.calls == []


async def test_the_right_token_passes_and_probes_stay_open(
    guarded: TestClient[Any, Any], raft: ScriptedRaft
) -> None:
    for path, body in GOOD_BODIES.items():
        resp = await guarded.post(path, data=body, headers=_bearer(API_TOKEN))
        assert resp.status == 200, (path, await resp.text())
    resp = await guarded.get("/metrics", headers=_bearer(API_TOKEN))
    assert resp.status == 200
    assert [name for name, _ in raft.calls] == [
        "initialize",
        "add_learner",
        "change_membership",
        "client_write",
        "ensure_linearizable",
    ]
    for path in OPEN_PATHS:  # open: never a 401 (404 until the route exists)
        assert (await guarded.get(path)).status != 401


async def test_without_a_token_the_api_is_open(raft: ScriptedRaft, aiohttp_client: Any) -> None:
    app = kv_api(raft, KVStateMachine(), node_id=1, addr="h:1")
    client = await aiohttp_client(app, headers=JSON)
    assert (await client.post("/write", data=GOOD_BODIES["/write"])).status == 200


# --- the attack on real nodes: nothing reaches the attacker's server ------------------------


class Attacker:
    """A server that records every request (path and headers) that reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers)))
        self.arrived.set()
        return web.Response(status=404)

    async def nothing_within(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.arrived.wait()
        assert self.seen == []

    async def reached_within(self, seconds: float) -> dict[str, str]:
        async with asyncio.timeout(seconds):
            await self.arrived.wait()
        return self.seen[0][1]


@pytest.fixture
async def attacker() -> AsyncIterator[tuple[Attacker, str]]:
    spy = Attacker()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", spy.handle)
    server = TestServer(app, host=HOST, port=0)
    await server.start_server()
    try:
        yield spy, f"{HOST}:{server.port}"
    finally:
        await server.close()


async def _node(nodes: list[KVNode], tmp_path: Path, **options: Any) -> KVNode:
    node = KVNode(1, tmp_path / "1", port=0, cluster=CLUSTER, write_timeout=2.0, **options)
    nodes.append(node)
    await node.start()
    return node


async def test_add_learner_without_a_credential_leaks_nothing(
    tmp_path: Path,
    nodes: list[KVNode],
    session: aiohttp.ClientSession,
    attacker: tuple[Attacker, str],
) -> None:
    spy, spy_addr = attacker
    leader = await _node(nodes, tmp_path, token=TOKEN)
    resp = await session.post(f"{leader.url}/init", data=b"[]", headers=_bearer(TOKEN))
    assert resp.status == 200, await resp.text()
    await leader.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
    membership_before = leader.raft.metrics().membership_config

    body = f'[9,"{spy_addr}"]'.encode()
    await _refused(await session.post(f"{leader.url}/add-learner", data=body, headers=JSON))
    wrong = {**JSON, "Authorization": "Bearer guess"}
    await _refused(await session.post(f"{leader.url}/add-learner", data=body, headers=wrong))
    await spy.nothing_within(2.0)
    assert leader.raft.metrics().membership_config == membership_before

    # Positive control: with the token the leader does contact the new learner, and that
    # request carries exactly what the attack was after.
    resp = await session.post(f"{leader.url}/add-learner", data=body, headers=_bearer(TOKEN))
    headers = await spy.reached_within(10.0)
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Raft-Cluster"] == CLUSTER


async def test_init_without_a_credential_leaks_nothing(
    tmp_path: Path,
    nodes: list[KVNode],
    session: aiohttp.ClientSession,
    attacker: tuple[Attacker, str],
) -> None:
    spy, spy_addr = attacker
    fresh = await _node(nodes, tmp_path, token=TOKEN)
    body = f'[[1,"{fresh.addr}"],[2,"{spy_addr}"]]'.encode()
    await _refused(await session.post(f"{fresh.url}/init", data=body, headers=JSON))
    await spy.nothing_within(2.0)
    assert fresh.raft.metrics().membership_config.membership.configs == []

    resp = await session.post(f"{fresh.url}/init", data=body, headers=_bearer(TOKEN))
    assert resp.status == 200, await resp.text()
    headers = await spy.reached_within(10.0)  # the vote requests of the first election
    assert headers["Authorization"] == f"Bearer {TOKEN}"


async def test_separate_api_and_raft_tokens(
    tmp_path: Path, nodes: list[KVNode], session: aiohttp.ClientSession
) -> None:
    node = await _node(nodes, tmp_path, token=TOKEN, api_token=API_TOKEN)
    # The Raft token is not an API credential, and the API token is not a Raft credential.
    await _refused(await session.post(f"{node.url}/init", data=b"[]", headers=_bearer(TOKEN)))
    vote = b'{"vote":{"leader_id":{"term":99,"node_id":9}},"last_log_id":null}'
    raft_vote = f"{node.url}/raft/vote"
    wrong = {**_bearer(API_TOKEN), "Raft-Cluster": CLUSTER}
    await _refused(await session.post(raft_vote, data=vote, headers=wrong))
    assert node.raft.metrics().current_term < 99
    # Each with its own: the API initializes and writes; the Raft routes answer the vote.
    resp = await session.post(f"{node.url}/init", data=b"[]", headers=_bearer(API_TOKEN))
    assert resp.status == 200, await resp.text()
    await node.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
    resp = await session.post(
        f"{node.url}/write", data=GOOD_BODIES["/write"], headers=_bearer(API_TOKEN)
    )
    assert resp.status == 200, await resp.text()
    right = {**_bearer(TOKEN), "Raft-Cluster": CLUSTER}
    assert (await session.post(raft_vote, data=vote, headers=right)).status == 200


# --- the CLI takes both tokens from the environment ------------------------------------------


def test_cli_takes_the_tokens_from_the_environment(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    env = {**os.environ, "RAFT_HTTP_TOKEN": TOKEN, "RAFT_HTTP_API_TOKEN": API_TOKEN}
    argv = [sys.executable, "-m", "raft_http.kv.cli", "node", "--id", "1"]
    argv += ["--listen", f"{HOST}:{port}", "--data-dir", str(tmp_path / "d")]
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://{HOST}:{port}/metrics"
        answer = wait_for("the node to answer", lambda: http("GET", url, timeout=2), 20)
        assert answer[0] == 401, answer
        status, _, metrics = http("GET", url, headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert status == 200
        assert metrics["id"] == 1, metrics
        status, _, _ = http("GET", url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 401
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert TOKEN not in log.read_text()
    assert API_TOKEN not in log.read_text()


def test_cli_refuses_an_empty_token() -> None:
    argv = [sys.executable, "-m", "raft_http.kv.cli", "node", "--id", "1"]
    argv += ["--listen", "127.0.0.1:1", "--data-dir", "x"]
    for option in ("--token", "--api-token"):
        proc = subprocess.run(
            [*argv, option, ""],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "non-empty" in proc.stderr
