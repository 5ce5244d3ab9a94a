"""What the KV API refuses before a handler runs: encodings, content types, sizes, slow bodies.

Each refusal is a JSON 4xx, comes before the body is read (a declared 50 MB body is
refused at once, not after the write timeout), and reaches no Raft call.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from raft_http.kv.api import kv_api
from raft_http.kv.intake import ADMIN_MAX_BODY_SIZE, ADMIN_PATHS
from raft_http.kv.state_machine import KVStateMachine
from test_fuzz_http import assert_json_error
from test_kv_api import ScriptedRaft

ROUTES: dict[str, bytes] = {
    "/init": b"[]",
    "/add-learner": b'[4,"127.0.0.1:21004"]',
    "/change-membership": b"[1,2]",
    "/write": b'{"Set":{"key":"k","value":"v"}}',
    "/read": b'"k"',
    "/consistent_read": b'"k"',
}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def raft() -> ScriptedRaft:
    return ScriptedRaft()


async def _server(raft: ScriptedRaft) -> TestServer:
    """The KV app under the runner option KVNode uses: bodies left as sent, so every
    Content-Encoding reaches the app."""
    app = kv_api(raft, KVStateMachine(), node_id=1, addr="127.0.0.1:21001", body_timeout=0.5)
    server = TestServer(app)
    await server.start_server(auto_decompress=False)
    return server


@pytest.fixture
async def client(raft: ScriptedRaft, aiohttp_client: Any) -> TestClient[Any, Any]:
    return await aiohttp_client(await _server(raft))


@pytest.fixture
async def raw(raft: ScriptedRaft) -> AsyncIterator[TestServer]:
    server = await _server(raft)
    try:
        yield server
    finally:
        await server.close()


async def _exchange(server: TestServer, head: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``head`` (and no more), read one answer: (status, JSON body). Bounded in time.

    Only the answer is read, not up to EOF: after refusing an unread body aiohttp keeps
    the connection a few seconds so the answer is not lost to a reset.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
            lines = answer.decode().split("\r\n")
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(lines[0].split(" ", 2)[1]), json.loads(body)["error"]


def _compressed(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    return body


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, gzip", "x"])
@pytest.mark.parametrize("valid", [True, False])
async def test_compressed_bodies_are_415_on_every_route(
    client: TestClient[Any, Any], raft: ScriptedRaft, route: str, encoding: str, valid: bool
) -> None:
    body = _compressed(encoding, ROUTES[route]) if valid else b"\x1f\x8b not gzip at all"
    headers = {**JSON, "Content-Encoding": encoding}
    resp = await client.post(route, data=body, headers=headers)
    error = await assert_json_error(resp, 415)
    assert error["kind"] == "unsupported_media_type"
    assert "Content-Encoding" in error["message"]
    assert raft.calls == []


async def test_identity_encoding_is_accepted(
    client: TestClient[Any, Any], raft: ScriptedRaft
) -> None:
    headers = {**JSON, "Content-Encoding": "identity"}
    resp = await client.post("/write", data=ROUTES["/write"], headers=headers)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/octet-stream", "application/jsonx"]
)
async def test_other_content_types_are_415(
    client: TestClient[Any, Any], raft: ScriptedRaft, route: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    skip = {"Content-Type"} if content_type is None else set()
    resp = await client.post(route, data=ROUTES[route], headers=headers, skip_auto_headers=skip)
    error = await assert_json_error(resp, 415)
    assert "Content-Type must be application/json" in error["message"]
    assert raft.calls == []


async def test_json_with_a_charset_is_accepted(client: TestClient[Any, Any]) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert (await client.post("/read", data=b'"k"', headers=headers)).status == 200


@pytest.mark.parametrize("route", list(ROUTES))
async def test_a_declared_length_over_the_limit_is_413_at_once(
    raw: TestServer, raft: ScriptedRaft, route: str
) -> None:
    limit = ADMIN_MAX_BODY_SIZE if route in ADMIN_PATHS else 1024**2
    head = (
        f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 50000000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    status, error = await _exchange(raw, head)  # no body sent: answered anyway
    assert status == 413, error
    assert error == {
        "kind": "payload_too_large",
        "message": f"request body exceeds {limit} bytes",
        "limit": limit,
    }
    assert time.monotonic() - started < 5  # not the write timeout (10 s) nor the body's
    assert raft.calls == []


@pytest.mark.parametrize("route", list(ADMIN_PATHS))
async def test_admin_routes_have_a_small_limit(
    client: TestClient[Any, Any], raft: ScriptedRaft, route: str
) -> None:
    body = b"[" + b" " * ADMIN_MAX_BODY_SIZE + b"]"
    error = await assert_json_error(await client.post(route, data=body, headers=JSON), 413)
    assert error["limit"] == ADMIN_MAX_BODY_SIZE

    # Chunked (no Content-Length): refused once the limit is passed.
    async def chunks() -> Any:
        for _ in range(4):
            yield b" " * (ADMIN_MAX_BODY_SIZE // 2)

    resp = await client.post(route, data=chunks(), headers=JSON)
    await assert_json_error(resp, 413)
    assert raft.calls == []


async def test_a_write_may_be_larger_than_an_admin_body(
    client: TestClient[Any, Any], raft: ScriptedRaft
) -> None:
    value = "v" * (4 * ADMIN_MAX_BODY_SIZE)
    body = json.dumps({"Set": {"key": "k", "value": value}}).encode()
    resp = await client.post("/write", data=body, headers=JSON)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("route", ["/write", "/read", "/init"])
async def test_a_slow_body_gets_408_without_touching_raft(
    raw: TestServer, raft: ScriptedRaft, route: str
) -> None:
    head = (
        f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n["
    ).encode()
    status, error = await _exchange(raw, head)  # the body deadline is 0.5 s
    assert status == 408, error
    assert error["kind"] == "request_timeout"
    assert "nothing was done" in error["message"]
    assert raft.calls == []


async def test_get_routes_and_unknown_routes_are_not_held_to_post_rules(
    client: TestClient[Any, Any],
) -> None:
    assert (await client.get("/metrics")).status == 200
    await assert_json_error(await client.post("/nope", data=b"x"), 404)
    await assert_json_error(await client.post("/metrics", data=b"x"), 405)
