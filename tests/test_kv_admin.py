"""``KVClient`` and the ``raft-http`` admin subcommands against real nodes and scripted servers.

The scripted servers pin down what the client retries (only what is safe) and what it
sends (the token); the real three-node cluster runs every subcommand with its exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from raft_http.kv import KVClient, KVNode
from raft_http.kv.admin import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from raft_http.kv.client import (
    RAFT_TOKEN_ENV,
    TOKEN_ENV,
    KVOutcomeUnknown,
    KVRefused,
    KVUnavailable,
    KVUnreachable,
)

# --- scripted servers: what is retried, what is not -------------------------------------


class Script:
    """Answers ``answers`` in turn (the last one forever) and records each request."""

    def __init__(self, *answers: tuple[int, Any]) -> None:
        self.answers = list(answers)
        self.seen: list[tuple[str, str, str | None, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(
            (
                request.method,
                request.path,
                request.headers.get("Authorization"),
                await request.read(),
            )
        )
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return web.json_response(body, status=status, headers={"Retry-After": "1"})


@pytest.fixture
async def scripted() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def serve(script: Script) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", script.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield serve
    for server in servers:
        await server.close()


def _err(kind: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": f"scripted {kind}", **extra}}


OK_WRITE = (200, {"log_id": None, "data": {"value": "v"}})


async def test_a_write_whose_outcome_is_unknown_is_not_retried(scripted: Any) -> None:
    for kind in ("timeout", "write_outcome_unknown"):
        script = Script((503, _err(kind)), OK_WRITE)
        async with KVClient(await scripted(script), deadline=5) as client:
            with pytest.raises(KVOutcomeUnknown) as caught:
                await client.put("k", "v")
        assert caught.value.kind == kind
        assert len(script.seen) == 1


async def test_what_was_not_done_is_retried_until_it_succeeds(scripted: Any) -> None:
    script = Script(
        (503, _err("no_leader")),
        (503, _err("write_aborted")),
        (503, _err("quorum_not_enough")),
        (503, _err("overloaded")),
        OK_WRITE,
    )
    async with KVClient(await scripted(script), deadline=10) as client:
        result = await client.put("k", "v")
    assert result.data == {"value": "v"}
    assert len(script.seen) == 5
    assert all(body == b'{"Set":{"key":"k","value":"v"}}' for *_, body in script.seen)


async def test_reads_retry_a_timeout_but_refusals_are_final(scripted: Any) -> None:
    script = Script((503, _err("timeout")), (200, {"value": "x"}))
    async with KVClient(await scripted(script)) as client:
        assert await client.get("k") == "x"
    assert [path for _, path, *_ in script.seen] == ["/consistent_read"] * 2
    refused = Script((409, _err("not_allowed")), OK_WRITE)
    async with KVClient(await scripted(refused)) as client:
        with pytest.raises(KVRefused) as caught:
            await client.init({1: "127.0.0.1:1"})
    assert (caught.value.kind, caught.value.status, len(refused.seen)) == ("not_allowed", 409, 1)


async def test_a_redirect_moves_the_client_to_the_leader_and_it_stays(scripted: Any) -> None:
    leader = Script(OK_WRITE)
    leader_addr = await scripted(leader)
    follower = Script((307, _err("forward_to_leader", leader_id=2, leader_addr=leader_addr)))
    async with KVClient(await scripted(follower)) as client:
        await client.put("a", "1")
        await client.put("b", "2")
        assert client.leader_url == f"http://{leader_addr}"
    assert len(follower.seen) == 1
    assert len(leader.seen) == 2


async def test_the_token_comes_from_the_option_or_the_environment(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script((200, {"value": None}))
    addr = await scripted(script)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setenv(RAFT_TOKEN_ENV, "raft-token")
    async with KVClient(addr) as client:
        await client.get("k", stale=True)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    async with KVClient(addr) as client:
        await client.get("k", stale=True)
    async with KVClient(addr, token="from-option") as client:
        await client.get("k", stale=True)
    assert [auth for _, _, auth, _ in script.seen] == [
        "Bearer raft-token",
        "Bearer from-env",
        "Bearer from-option",
    ]


async def test_unreachable_and_unavailable_are_told_apart(scripted: Any) -> None:
    async with KVClient("127.0.0.1:1", deadline=2, unreachable_rounds=1) as client:
        with pytest.raises(KVUnreachable, match="connection refused"):
            await client.get("k")
    script = Script((503, _err("no_leader")))
    async with KVClient(await scripted(script), deadline=1) as client:
        with pytest.raises(KVUnavailable) as caught:
            await client.get("k")
    assert caught.value.kind == "no_leader"
    assert 2 <= len(script.seen) <= 20


# --- a real cluster, in process; the CLI as a subprocess ---------------------------------


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[KVNode]]:
    started: list[KVNode] = []
    for n in (1, 2, 3):
        node = KVNode(n, tmp_path / str(n), port=0, token="raft-secret", api_token=API_TOKEN)
        started.append(node)
        await node.start()
    yield started
    for node in started:
        await node.stop()


API_TOKEN = "api-secret"
WITH_TOKEN = {**os.environ, TOKEN_ENV: API_TOKEN}


async def cli(*args: str, env: dict[str, str] | None = WITH_TOKEN) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "raft_http.kv.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_kvclient_round_trip_and_failover(nodes: list[KVNode]) -> None:
    members = {n.node_id: n.addr for n in nodes}
    async with KVClient(nodes[0].addr, token=API_TOKEN) as admin:
        await admin.init(members)
    addrs = [n.addr for n in reversed(nodes)]
    async with KVClient(addrs, deadline=20, token=API_TOKEN) as client:
        written = await client.put("foo", "bar")
        assert written.data == {"value": "bar"}
        assert written.log_id is not None
        assert await client.get("foo") == "bar"
        assert (await client.delete("foo")).data == {"value": "bar"}
        assert await client.get("foo") is None
        await client.put("k", "v1")
        leader = next(n for n in nodes if n.url == client.leader_url)
        await leader.stop()
        await client.put("k", "v2")  # through the new leader
        assert client.leader_url != leader.url
        assert await client.get("k") == "v2"
        status = await client.cluster_status()
    assert status.leader is not None
    assert status.leader != leader.node_id
    by_id = {m.id: m for m in status.members}
    assert set(by_id) == {1, 2, 3}
    assert not by_id[leader.node_id].reachable
    assert by_id[status.leader].role == "Leader"


@pytest.mark.timeout(400)  # ~30 CLI processes, each a fresh interpreter
async def test_cli_subcommands_and_exit_codes(nodes: list[KVNode], tmp_path: Path) -> None:
    a = ["--addr", nodes[1].addr]
    members = [f"{n.node_id}={n.addr}" for n in nodes]
    no_token = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, RAFT_TOKEN_ENV)}
    code, out, err = await cli("init", *a, *members, env=no_token)
    assert (code, out) == (EXIT_REFUSED, "")
    assert err.startswith("raft-http init: unauthorized: ")
    token_file = tmp_path / "token"
    token_file.write_text(API_TOKEN + "\n")
    code, out, err = await cli("status", *a, "--api-token-file", str(token_file), env=no_token)
    assert code == EXIT_OK, err
    assert "leader: none" in out
    assert await cli("init", *a, *members) == (EXIT_OK, f"initialized: {', '.join(members)}\n", "")
    code, out, err = await cli("init", *a, *members)
    assert code == EXIT_REFUSED
    assert err.startswith("raft-http init: not_allowed: ")
    assert err.count("\n") == 1

    assert (await cli("put", *a, "foo", "bar"))[:2] == (EXIT_OK, "OK\n")
    assert (await cli("get", *a, "foo"))[:2] == (EXIT_OK, "bar\n")
    code, out, _ = await cli("get", *a, "foo", "--json")
    assert (code, json.loads(out)) == (EXIT_OK, {"key": "foo", "value": "bar"})
    assert (await cli("delete", *a, "foo"))[:2] == (EXIT_OK, "deleted\n")
    code, out, err = await cli("get", *a, "foo")
    assert (code, out) == (EXIT_OK, "")
    assert "not found" in err

    code, out, _ = await cli("status", *a)
    assert code == EXIT_OK, out
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["ID", "ADDRESS", "VOTER", "ROLE"]
    assert [r.split()[0] for r in rows[:3]] == ["1", "2", "3"]
    assert sum(" Leader " in r for r in rows[:3]) == 1
    assert rows[3].startswith("leader: ")
    code, out, _ = await cli("status", *a, "--json")
    status = json.loads(out)
    assert [m["id"] for m in status["members"]] == [1, 2, 3]
    assert all(m["reachable"] and m["voter"] for m in status["members"])
    leader_id = status["leader"]

    # A fourth node: learner, then voter, then removed again.
    fourth = KVNode(4, tmp_path / "4", port=0)
    nodes.append(fourth)
    await fourth.start()
    code, out, err = await cli("add-learner", *a, "4", fourth.addr)
    assert code == EXIT_OK, err
    assert out.startswith("learner 4 added at log index ")
    code, out, err = await cli("change-membership", *a, "1", "2", "3", "4", "--json")
    assert code == EXIT_OK, err
    assert json.loads(out)["log_id"]["index"] > 0
    code, out, _ = await cli("status", *a, "--json")
    assert {m["id"]: m["voter"] for m in json.loads(out)["members"]} == {
        1: True,
        2: True,
        3: True,
        4: True,
    }
    assert (await cli("change-membership", *a, "1", "2", "3"))[0] == EXIT_OK
    code, out, err = await cli("remove-learner", *a, "4")
    assert (code, out.split(" (")[0]) == (EXIT_OK, "removed learner(s) 4"), err
    code, out, _ = await cli("status", *a, "--json")
    assert [m["id"] for m in json.loads(out)["members"]] == [1, 2, 3]
    code, out, err = await cli("transfer-leader", *a, "--json")
    assert code == EXIT_OK, err
    new_leader = json.loads(out)["leader_id"]
    assert new_leader != leader_id
    code, out, err = await cli("transfer-leader", *a, str(leader_id))
    assert (code, out) == (EXIT_OK, f"node {leader_id} leads now\n"), err
    code, _, err = await cli("remove-learner", *a, "2")
    assert code == EXIT_REFUSED, "a voter is not removed as a learner"
    assert err.startswith("raft-http remove-learner: ")

    # Usage errors are 2, a dead address is 3 with one line, a stopped member shows as such.
    assert (await cli("put", *a, "only-a-key"))[0] == EXIT_USAGE
    assert (await cli("add-learner", *a, "-1", "x:1"))[0] == EXIT_USAGE
    follower = next(n for n in nodes[:3] if n.node_id != leader_id)
    await follower.stop()
    code, _, err = await cli("get", "--addr", follower.addr, "foo", "--stale")
    assert code == EXIT_UNREACHABLE
    assert err == (
        f"raft-http get: unreachable: cannot connect to http://{follower.addr}: "
        "connection refused (is the node running?)\n"
    )
    code, out, _ = await cli("status", "--addr", follower.addr, *a)
    assert code == EXIT_OK
    row = next(r for r in out.splitlines() if r.startswith(f"{follower.node_id} "))
    assert row.split()[-1] == "no"
    assert f"node {follower.node_id}: cannot connect" in out


async def test_version_and_help() -> None:
    code, out, _ = await cli("--version")
    assert (code, out.split()[0]) == (0, "raft-http")
    code, out, _ = await cli("--help")
    commands = ("status", "init", "add-learner", "remove-learner", "change-membership", "put")
    for command in (*commands, "get", "delete", "transfer-leader"):
        assert command in out
