"""Property-based fuzzing of both HTTP surfaces: bad input is a JSON 4xx, never a 500.

Hypothesis drives ``@given`` async tests (pytest-asyncio runs each example on the
test's loop), so one app and one client serve every example of a test. The oracle
is the wire codec itself: a body the codec decodes must answer 200 and reach the
handler; anything else must answer a 4xx JSON error and reach nobody. Requests that
aiohttp's client cannot send (bytes that are not UTF-8 in a header) go over a raw
socket.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import re
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from yarl import URL

from raft_http.client import parse_node_address
from raft_http.kv.intake import ADMIN_MAX_BODY_SIZE, ADMIN_PATHS
from raft_http.kv.node import KVNode
from raft_http.kv.state_machine import Delete, InvalidCommand, Set, decode_command
from raft_http.server import raft_app
from raft_http.spool import SpoolLimits, free_bytes, spool_files
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    INSTALL_SNAPSHOT_REQUEST,
    SNAPSHOT_META,
    VOTE,
    VOTE_REQUEST,
    JsonCodec,
)

try:
    from .server_helpers import RecordingHandler
    from .wire_helpers import snapshot_headers, snapshot_meta, vote
except ImportError:
    from server_helpers import RecordingHandler  # type: ignore[no-redef]
    from wire_helpers import snapshot_headers, snapshot_meta, vote  # type: ignore[no-redef]

Client = TestClient[web.Request, web.Application]

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MY_VOTE = vote(2)

# --- strategies ------------------------------------------------------------------------

# Header-safe text: aiohttp's client refuses control characters; surrogates cannot be sent.
header_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=0, max_size=40
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
wrong_values = st.one_of(
    json_values,
    st.integers(min_value=2**64, max_value=2**80),
    st.integers(max_value=-1),
    st.sampled_from(["blank", "normal", "membership", "nonsense", "", "1", "success"]),
)


def _valid_vote_request() -> dict[str, Any]:
    return {
        "vote": {"leader_id": {"term": 3, "node_id": 2}, "committed": False},
        "last_log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 5},
        "pre_vote": False,
    }


def _valid_append() -> dict[str, Any]:
    def lid(index: int) -> dict[str, Any]:
        return {"leader_id": {"term": 2, "node_id": 1}, "index": index}

    return {
        "vote": {"leader_id": {"term": 2, "node_id": 1}, "committed": True},
        "prev_log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 4},
        "entries": [
            {"log_id": lid(5), "payload": {"type": "normal", "data": {"set": ["k", "v"]}}},
            {"log_id": lid(6), "payload": {"type": "blank"}},
            {
                "log_id": lid(7),
                "payload": {
                    "type": "membership",
                    "membership": {"configs": [[1, 2]], "nodes": {"1": {"addr": "h:1"}}},
                },
            },
        ],
        "leader_commit": None,
    }


def _valid_chunk() -> dict[str, Any]:
    return {
        "vote": {"leader_id": {"term": 3, "node_id": 1}, "committed": True},
        "meta": json.loads(SNAPSHOT_META.encode(snapshot_meta("fz"))),
        "offset": 0,
        "data": "YWJj",
        "done": True,
    }


def _malformed_append(body: bytes) -> bool:
    """Decodes, but no leader could have sent it (indexes, terms): the server refuses it."""
    return APPEND_ENTRIES_REQUEST.decode(body).shape_error() is not None


ROUTES: dict[str, tuple[Callable[[], dict[str, Any]], JsonCodec[Any]]] = {
    "/vote": (_valid_vote_request, VOTE_REQUEST),
    "/append": (_valid_append, APPEND_ENTRIES_REQUEST),
    "/snapshot": (_valid_chunk, INSTALL_SNAPSHOT_REQUEST),
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def near_miss(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """A valid request with one field replaced, removed, or joined by an extra one."""
    doc = copy.deepcopy(valid)
    path = draw(st.sampled_from(_paths(doc)))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    how = draw(st.sampled_from(["replace", "remove", "extra"]))
    if how == "replace":
        parent[last] = draw(wrong_values)
    elif how == "remove" and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return doc


def _decodes(codec: JsonCodec[Any], body: bytes) -> bool:
    try:
        codec.decode(body)
    except msgspec.DecodeError:
        return False
    return True


async def assert_json_error(resp: aiohttp.ClientResponse, *statuses: int) -> dict[str, Any]:
    """A 4xx (one of ``statuses`` if given) with the JSON error body of docs/protocol.md."""
    text = await resp.text()
    assert 400 <= resp.status < 500, (resp.status, text)
    if statuses:
        assert resp.status in statuses, (resp.status, text)
    assert resp.content_type == "application/json", text
    body = json.loads(text)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["kind"], str), body
    assert error["kind"], body
    assert isinstance(error["message"], str), body
    assert error["message"], body
    return dict(error)


# --- raft_app ---------------------------------------------------------------------------


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler(my_vote=MY_VOTE)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[Client]], handler: RecordingHandler, spool_dir: Path
) -> AsyncIterator[Client]:
    """One app for all the examples of a test; afterwards it must still serve a valid append."""
    client = await aiohttp_client(raft_app(handler, spool_dir=spool_dir))
    yield client
    await _still_serves(client, handler, spool_dir)


def _reset(handler: RecordingHandler) -> None:
    handler.calls.clear()
    handler.installed.clear()
    handler.my_vote = MY_VOTE


async def _still_serves(client: Client, handler: RecordingHandler, spool_dir: Path) -> None:
    """After a barrage: a valid append still works and no refused upload left a file."""
    _reset(handler)
    resp = await client.post("/append", data=json.dumps(_valid_append()), headers=JSON_CT)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"type": "success"}
    assert handler.names() == ["append_entries"]
    assert spool_files(spool_dir) == []


JSON_CT = {"Content-Type": "application/json"}
GOOD_JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON"]
BAD_TYPES = [
    "text/plain",
    "application/jsonx",
    "application/json-patch+json",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "json",
    "",
    ";;;",
    "application/",
    "/json",
]
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(list(ROUTES)).flatmap(
        lambda r: near_miss(ROUTES[r][0]()).map(lambda d: json.dumps(d).encode())
    ),
    st.sampled_from(list(ROUTES)).map(lambda r: json.dumps(ROUTES[r][0]()).encode()),
)


@FUZZ
@given(
    route=st.sampled_from(list(ROUTES)),
    body=bodies,
    ctype=st.sampled_from(GOOD_JSON_TYPES),
)
async def test_json_routes_answer_200_only_to_what_the_codec_accepts(
    client: Client, handler: RecordingHandler, spool_dir: Path, route: str, body: bytes, ctype: str
) -> None:
    _reset(handler)
    codec = ROUTES[route][1]
    resp = await client.post(route, data=body, headers={"Content-Type": ctype})
    event(f"{route} {resp.status}")
    if not _decodes(codec, body) or (route == "/append" and _malformed_append(body)):
        error = await assert_json_error(resp, 400)
        assert error["kind"] == "bad_request"
        assert handler.calls == []
    elif route == "/snapshot":
        # A decodable fragment: installed (200), or refused as not continuing what is held.
        if resp.status != 200:
            error = await assert_json_error(resp, 409)
            assert error["kind"] == "snapshot_mismatch"
    else:
        assert resp.status == 200, await resp.text()
        [(_, rpc)] = handler.calls
        assert rpc == codec.decode(body)
    assert spool_files(spool_dir) == []


@FUZZ
@given(
    route=st.sampled_from(list(ROUTES)),
    body=bodies,
    ctype=st.one_of(st.sampled_from(BAD_TYPES), header_text),
)
async def test_other_content_types_are_415_or_handled_as_their_kind(
    client: Client, handler: RecordingHandler, spool_dir: Path, route: str, body: bytes, ctype: str
) -> None:
    _reset(handler)
    resp = await client.post(route, data=body, headers={"Content-Type": ctype})
    event(f"{route} {resp.status}")
    if resp.status == 200:
        # Only a Content-Type that means JSON gets this far with a JSON body.
        assert ctype.split(";")[0].strip().lower() == "application/json", ctype
        assert handler.calls, ctype
    else:
        await assert_json_error(resp)
        assert handler.calls == [], ctype
    assert spool_files(spool_dir) == []


async def test_raft_app_still_serves_after_json_barrage(
    client: Client, handler: RecordingHandler, spool_dir: Path
) -> None:
    """The ``@given`` tests above share nothing with this one, so barrage inline, then check."""
    for body in (b"", b"{", b"[]", b"null", b'{"vote":1}', b"\xff" * 50):
        for route in ROUTES:
            await assert_json_error(await client.post(route, data=body, headers=JSON_CT), 400)
    await _still_serves(client, handler, spool_dir)


# --- streamed snapshots: garbled Raft-* headers -------------------------------------------

SNAPSHOT_HEADERS = (
    "Raft-Vote",
    "Raft-Snapshot-Meta",
    "Raft-Snapshot-Size",
    "Raft-Snapshot-Offset",
    "Raft-Snapshot-Sha256",
)
garbled = st.one_of(
    header_text,
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(
        [
            "-1",
            "18446744073709551616",
            "9" * 19,
            "9" * 40,
            "1e3",
            "0x10",
            " 1 ",
            "１２",  # noqa: RUF001 - full-width digits
            "{",
            "null",
            "[]",
            '{"leader_id":{"term":-1,"node_id":1}}',
            '{"leader_id":{"term":99999999999999999999999,"node_id":1},"committed":true}',
            '{"leader_id":{"term":"3","node_id":1}}',
            "a" * 64,
            "g" * 64,
            "ä" * 10,
            "../../etc/passwd",
        ]
    ),
    json_values.map(lambda v: json.dumps(v)),
)
_COUNT = re.compile(r"[0-9]{1,19}")
_SHA = re.compile(r"[0-9a-fA-F]{64}")


def _header_ok(name: str, value: str | None) -> bool:
    """What the server accepts in each header, by the protocol document."""
    if value is None:
        return name == "Raft-Snapshot-Sha256"
    value = value.strip()
    if name == "Raft-Vote":
        return _decodes(VOTE, value.encode())
    if name == "Raft-Snapshot-Meta":
        return _decodes(SNAPSHOT_META, value.encode())
    if name == "Raft-Snapshot-Sha256":
        return _SHA.fullmatch(value) is not None
    return _COUNT.fullmatch(value) is not None


@FUZZ
@given(
    changes=st.dictionaries(
        st.sampled_from(SNAPSHOT_HEADERS), st.none() | garbled, min_size=0, max_size=3
    ),
    body=st.binary(max_size=64),
    size=st.integers(min_value=0, max_value=80),
    offset=st.sampled_from([0, 0, 0, 1, 5]),
    term=st.integers(min_value=1, max_value=4),
)
async def test_streamed_snapshot_headers_are_checked_before_anything_is_kept(
    client: Client,
    handler: RecordingHandler,
    spool_dir: Path,
    changes: dict[str, str | None],
    body: bytes,
    size: int,
    offset: int,
    term: int,
) -> None:
    _reset(handler)
    headers: dict[str, str] = snapshot_headers(vote(term), snapshot_meta("fz"), size, offset)
    for name, value in changes.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    resp = await client.post("/snapshot", data=body, headers=headers)
    event(f"{resp.status} installed={bool(handler.installed)}")
    # What the server received: HTTP drops surrounding spaces and tabs.
    sent = {n: (headers[n].strip(" \t") if n in headers else None) for n in SNAPSHOT_HEADERS}
    headers_ok = all(_header_ok(n, v) for n, v in sent.items())
    if not headers_ok:
        error = await assert_json_error(resp, 400)
        assert error["kind"] == "bad_request"
        assert handler.calls == []
    elif resp.status == 200:
        answer = await resp.json()
        if handler.installed:
            [installed] = handler.installed
            assert installed.size == len(body)
            assert answer["vote"] == json.loads(VOTE.encode(installed.vote))
        else:  # a stale vote: refused without reading the body
            assert not VOTE.decode(sent["Raft-Vote"] or "") >= MY_VOTE
            assert answer["vote"] == json.loads(VOTE.encode(MY_VOTE))
    elif resp.status in (413, 507):  # the disk limits: only for a declared size past them
        declared = int(sent["Raft-Snapshot-Size"] or "")
        limits = SpoolLimits()
        assert resp.content_type == "application/json", await resp.text()
        error = (await resp.json())["error"]
        if resp.status == 413:
            assert error["kind"] == "snapshot_too_large"
            assert declared > limits.max_snapshot_size
        else:
            assert error["kind"] == "insufficient_storage"
            assert declared > free_bytes(spool_dir) - limits.reserve_bytes
        assert handler.calls == []
    else:
        error = await assert_json_error(resp, 400, 409)
        assert error["kind"] in {"bad_request", "size_mismatch", "checksum_mismatch"} | {
            "offset_mismatch"
        }
        assert handler.installed == []
    assert spool_files(spool_dir) == []  # refused or installed, nothing stays behind


@FUZZ
@given(sid=st.one_of(header_text, st.sampled_from(["../../x", "/etc/passwd", "..", ".", "a/b"])))
async def test_head_snapshot_with_any_id_answers_nothing_held(
    client: Client, handler: RecordingHandler, spool_dir: Path, sid: str
) -> None:
    resp = await client.head("/snapshot", headers={"Raft-Snapshot-Id": sid})
    assert resp.status == 200
    assert resp.headers["Raft-Snapshot-Offset"] == "0"
    assert handler.calls == []
    assert spool_files(spool_dir) == []


async def test_head_snapshot_without_id_is_400(client: Client) -> None:
    resp = await client.head("/snapshot")
    assert resp.status == 400


METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST", "HEAD", "TRACE"]


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    path=st.one_of(
        st.sampled_from(["/append", "/vote", "/snapshot", "/", "/append/", "/x", "//vote"]),
        st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=20).map(
            lambda s: "/" + s
        ),
    ),
    body=st.binary(max_size=32),
)
async def test_any_method_and_path_is_a_json_4xx(
    client: Client, handler: RecordingHandler, method: str, path: str, body: bytes
) -> None:
    _reset(handler)
    assume(not (method == "HEAD" and path == "/snapshot"))
    assume(not (method == "POST" and path in ("/append", "/vote", "/snapshot")))
    try:
        url = URL.build(scheme="http", host=str(client.host), port=client.port, path=path)
    except ValueError:
        assume(False)
    resp = await client.session.request(method, url, data=body or None)
    event(f"{resp.status}")
    if method == "HEAD":
        assert 400 <= resp.status < 500, resp.status
    else:
        await assert_json_error(resp)
    assert handler.calls == []


# --- found by the fuzzer: header bytes that are not UTF-8 ---------------------------------


async def _raw_exchange(server: TestServer, request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request`` as is; answers (status, head, body). Bounded in time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


def _raw_snapshot_request(bad: str) -> bytes:
    headers = snapshot_headers(vote(3), snapshot_meta("raw"), 0)
    headers.setdefault(bad, "")
    lines = b"".join(
        name.encode() + b": " + (b"\xff\xfe" if name == bad else value.encode()) + b"\r\n"
        for name, value in headers.items()
    )
    return (
        b"POST /snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n"
        + lines
        + b"\r\n"
    )


@pytest.fixture
async def raw_server(handler: RecordingHandler, spool_dir: Path) -> AsyncIterator[TestServer]:
    async with TestServer(raft_app(handler, spool_dir=spool_dir)) as server:
        yield server


@pytest.mark.parametrize(
    "name", ["Raft-Snapshot-Size", "Raft-Snapshot-Offset", "Raft-Snapshot-Sha256"]
)
async def test_non_utf8_count_headers_are_400(
    raw_server: TestServer, handler: RecordingHandler, name: str
) -> None:
    status, _head, body = await _raw_exchange(raw_server, _raw_snapshot_request(name))
    assert status == 400, body
    assert json.loads(body)["error"]["kind"] == "bad_request"
    assert handler.calls == []


@pytest.mark.parametrize("name", ["Raft-Vote", "Raft-Snapshot-Meta"])
async def test_non_utf8_json_headers_are_400(
    raw_server: TestServer, handler: RecordingHandler, name: str
) -> None:
    status, _head, body = await _raw_exchange(raw_server, _raw_snapshot_request(name))
    assert status == 400, body
    assert json.loads(body)["error"]["kind"] == "bad_request"
    assert handler.calls == []


async def test_non_utf8_content_type_is_415(
    raw_server: TestServer, handler: RecordingHandler
) -> None:
    request = (
        b"POST /vote HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/\xffjson\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _head, body = await _raw_exchange(raw_server, request)
    assert status == 415, body
    assert json.loads(body)["error"]["kind"] == "unsupported_media_type"
    assert handler.calls == []


# --- kv_api over a real single-node KVNode ------------------------------------------------


KV = tuple[KVNode, aiohttp.ClientSession, dict[str, str]]


@pytest.fixture
async def kv(tmp_path: Path) -> AsyncIterator[KV]:
    """A leader with seeded keys, and the model of what it stores (shared by all examples)."""
    node = KVNode(1, tmp_path / "kv", port=0, write_timeout=5.0)
    try:
        await node.start()
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=15), headers={"Content-Type": "application/json"}
        ) as session:
            resp = await session.post(f"{node.url}/init", data=b"[]")
            assert resp.status == 200, await resp.text()
            await node.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
            model: dict[str, str] = {}
            for i in range(5):
                command = {"Set": {"key": f"seed-{i}", "value": f"value {i}"}}
                await _kv_write(session, node.url, command)
                model[f"seed-{i}"] = f"value {i}"
            yield node, session, model
            # After the whole barrage: every key reads back, through the leader's quorum.
            for key, value in model.items():
                resp = await session.post(
                    f"{node.url}/consistent_read", data=json.dumps(key).encode()
                )
                assert await resp.json() == {"value": value}, key
    finally:
        await node.stop()


keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "foo", "ключ", "🔑", "a\u0000b", "\\", '"', "../x"]),
)
commands = st.one_of(
    st.builds(lambda k, v: {"Set": {"key": k, "value": v}}, keys, st.text(max_size=30)),
    st.builds(lambda k: {"Delete": {"key": k}}, keys),
    st.builds(
        lambda k, n: {"Set": {"key": k, "value": "v" * n}},
        keys,
        st.sampled_from([10_000, 100_000]),
    ),
)
near_miss_commands = st.one_of(
    st.sampled_from(
        [
            {"Set": {"key": 1}},
            {"Set": {"key": "a"}},
            {"Set": {"key": "a", "value": None}},
            {"Set": {"key": "a", "value": 1}},
            {"Set": {"key": "a", "value": "b", "extra": 1}},
            {"Set": {"key": "a", "value": "b"}, "Delete": {"key": "a"}},
            {"Delete": {}},
            {"Delete": None},
            {"Delete": {"key": ["a"]}},
            {"set": {"key": "a", "value": "b"}},
            {"Put": {"key": "a", "value": "b"}},
            {},
            [],
            "Set",
            {"Set": {"key": "k" * 100_000, "value": 7}},
        ]
    ),
    commands.flatmap(near_miss),
)
kv_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_miss_commands.map(lambda v: json.dumps(v).encode()),
    commands.map(lambda v: json.dumps(v).encode()),
    commands.map(lambda v: json.dumps(v).encode()),
    keys.map(lambda k: json.dumps(k).encode()),
    keys.map(lambda k: json.dumps(k).encode()),
    st.lists(st.tuples(st.integers(-3, 2**65), st.text(max_size=20)), max_size=3).map(
        lambda v: json.dumps(v).encode()
    ),
    st.lists(st.integers(-3, 5), max_size=4).map(lambda v: json.dumps(v).encode()),
)
KV_ROUTES = ["/write", "/read", "/consistent_read", "/init", "/add-learner", "/change-membership"]
_KEY = msgspec.json.Decoder(str)
_LEARNER = msgspec.json.Decoder(tuple[int, str])
_VOTERS = msgspec.json.Decoder(list[int])


def _valid_learner(body: bytes) -> bool:
    try:
        node_id, addr = _LEARNER.decode(body)
        parse_node_address(addr)
    except (msgspec.DecodeError, ValueError):
        return False
    return node_id >= 0


def _valid_voters(body: bytes) -> set[int] | None:
    try:
        voters = _VOTERS.decode(body)
    except msgspec.DecodeError:
        return None
    return set(voters) if voters and min(voters) >= 0 else None


async def _kv_write(session: aiohttp.ClientSession, url: str, command: dict[str, Any]) -> None:
    resp = await session.post(f"{url}/write", data=json.dumps(command).encode())
    assert resp.status == 200, await resp.text()


@settings(FUZZ, max_examples=500)
@given(route=st.sampled_from(KV_ROUTES), body=kv_bodies)
async def test_kv_api_answers_bad_input_with_json_4xx_and_loses_nothing(
    kv: KV, route: str, body: bytes
) -> None:
    node, session, model = kv
    before = dict(model)
    if route == "/add-learner":
        assume(not _valid_learner(body))  # a real learner would block until it caught up
    if route == "/change-membership":
        voters = _valid_voters(body)
        assume(voters is None or voters == {1})
    resp = await session.post(f"{node.url}{route}", data=body, allow_redirects=False)
    text = await resp.text()
    event(f"{route} {resp.status}")
    assert resp.status < 500, (route, body[:200], resp.status, text)
    if resp.status >= 400:
        await assert_json_error(resp)
    if resp.status == 413:
        assert len(body) > (ADMIN_MAX_BODY_SIZE if route in ADMIN_PATHS else 1024**2)
    if route == "/write":
        try:
            command = decode_command(body)
        except InvalidCommand:
            assert resp.status == 400, text
        else:
            assert resp.status == 200, text
            if isinstance(command, Set):
                model[command.key] = command.value
            elif isinstance(command, Delete):
                model.pop(command.key, None)
    elif route in ("/read", "/consistent_read"):
        try:
            key = _KEY.decode(body)
        except msgspec.DecodeError:
            assert resp.status == 400, text
        else:
            assert resp.status == 200, text
            assert await resp.json() == {"value": model.get(key)}
    elif route == "/init":
        # Initialized already: never re-initialized (413: over the admin routes' small limit).
        assert resp.status in (400, 409, 413), text
    elif resp.status != 200:
        assert resp.status in (400, 409, 413), text
    if route != "/write" or resp.status != 200:
        assert model == before
    # Nothing stored is lost: the state is exactly what the accepted writes made it.
    assert node.state_machine._data == model


# --- kv_api: compressed bodies and ids the store cannot hold (issue #7) ---------------------

content_encodings = st.one_of(
    st.sampled_from(["gzip", "deflate", "br", "zstd", "compress", "x-gzip", "GZIP", "gzip, br"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-, ", min_size=1, max_size=12).filter(
        lambda e: e.strip().lower() not in ("", "identity")
    ),
)


@settings(FUZZ, max_examples=200)
@given(
    route=st.sampled_from(KV_ROUTES),
    encoding=content_encodings,
    body=kv_bodies,
    compress=st.booleans(),
)
async def test_kv_api_refuses_every_compressed_body_with_415(
    kv: KV, route: str, encoding: str, body: bytes, compress: bool
) -> None:
    node, session, model = kv
    before = dict(model)
    if compress:
        body = zlib.compress(body) if encoding == "deflate" else gzip.compress(body)
    resp = await session.post(
        f"{node.url}{route}",
        data=body,
        headers={"Content-Encoding": encoding},
        allow_redirects=False,
    )
    error = await assert_json_error(resp, 415)
    assert "Content-Encoding" in error["message"]
    assert model == before
    assert node.state_machine._data == model


out_of_range_ids = st.one_of(
    st.integers(max_value=-1), st.integers(min_value=2**63, max_value=2**80)
)


@settings(FUZZ, max_examples=200)
@given(bad=out_of_range_ids, route=st.sampled_from(["/init", "/add-learner", "/change-membership"]))
async def test_kv_api_refuses_node_ids_the_store_cannot_hold(kv: KV, bad: int, route: str) -> None:
    node, session, model = kv
    membership = node.raft.metrics().membership_config
    body, path = {
        "/init": ([[bad, node.addr]], "$[0][0]"),
        "/add-learner": ([bad, "127.0.0.1:1"], "$[0]"),
        "/change-membership": ([1, bad], "$[1]"),
    }[route]
    resp = await session.post(f"{node.url}{route}", data=json.dumps(body).encode())
    error = await assert_json_error(resp, 400)
    assert path in error["message"], error
    assert node.raft.metrics().running
    assert node.raft.metrics().membership_config == membership
    assert node.state_machine._data == model
