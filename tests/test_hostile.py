"""Attacks that must fail: one request or one peer may never stop a node (issue #9).

Each test sends what an attacker (or a peer holding the Raft token) sent on main
before the fix, and checks the answer is a JSON 4xx, the node keeps running, and
nothing it stored is lost or changed.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from raft_cluster import Cluster, cmd, snapshotting
from raft_http import (
    MAX_INDEX,
    MAX_NODE_ID,
    MAX_TERM,
    InvalidRequest,
    SnapshotRejected,
    raft_app,
)
from raft_http.raft import Raft, SqliteLogStore
from raft_http.serving import ParseErrorLogger, runner_options
from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    AppendEntriesRequest,
    Blank,
    Entry,
    LeaderId,
    LogId,
    Normal,
    Snapshot,
    SnapshotMeta,
    Success,
    Vote,
)
from server_helpers import RecordingHandler

JSON = {"Content-Type": "application/json"}


def leader_vote(raft: Raft) -> Vote:
    return raft.current_vote().committed_vote()


def follower_of(cluster: Cluster, leader: Raft) -> Raft:
    return next(n for i, n in cluster.nodes.items() if i != leader.id)


async def assert_still_serves(cluster: Cluster, n: int) -> None:
    """Every node runs, and a new write commits and is applied everywhere."""
    leader = await cluster.leader()
    response = await leader.client_write(cmd(n))
    await cluster.wait_applied(response.log_id.index)
    for node in cluster.nodes.values():
        assert node.metrics().running


async def error_of(resp: Any, status: int, kind: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["kind"] == kind, error
    return str(error["message"])


# --- 2. values the store cannot hold -------------------------------------------------


def append_json(term: int = 2, index: int = 5, node_id: int = 1) -> bytes:
    vote = {"leader_id": {"term": term, "node_id": node_id}, "committed": True}
    return msgspec.json.encode(
        {
            "vote": vote,
            "prev_log_id": None,
            "entries": [],
            "leader_commit": {"leader_id": {"term": 1, "node_id": 1}, "index": index},
        }
    )


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> Any:
    handler = RecordingHandler(my_vote=Vote(LeaderId(1, 1), True))
    c = await aiohttp_client(raft_app(handler))
    c.handler = handler
    return c


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (append_json(term=2**63 - 1), "$.vote.leader_id.term"),
        (append_json(node_id=2**63), "$.vote.leader_id.node_id"),
        (append_json(index=2**63 - 1), "$.leader_commit.index"),
    ],
)
async def test_a_term_index_or_id_past_the_store_is_a_400_naming_it(
    client: Any, body: bytes, path: str
) -> None:
    message = await error_of(
        await client.post("/append", data=body, headers=JSON), 400, "bad_request"
    )
    assert path in message
    assert client.handler.calls == []


async def test_sqlite_holds_the_greatest_values_the_wire_accepts(tmp_path: Path) -> None:
    """What passes the wire fits the store: no OverflowError can reach SQLite."""
    store = await SqliteLogStore.open(tmp_path / "raft.sqlite3")
    try:
        vote = Vote(LeaderId(MAX_TERM, MAX_NODE_ID), True)
        await store.save_vote(vote)
        last = LogId(LeaderId(MAX_TERM, MAX_NODE_ID), MAX_INDEX)
        await store.purge(LogId(LeaderId(MAX_TERM, MAX_NODE_ID), MAX_INDEX - 1))
        await store.append([Entry(last, Blank())])
        await store.save_committed(last)
        assert await store.read_vote() == vote
        assert (await store.get_log_state()).last_log_id == last
        assert await store.read_committed() == last
    finally:
        await store.close()


async def test_a_node_at_the_greatest_term_stops_campaigning_but_keeps_running(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A token holder can push the term to MAX_TERM (peers are trusted); no node may crash."""
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(1))
    follower = follower_of(cluster, leader)
    last = follower.log.last_log_id
    forged = AppendEntriesRequest(Vote(LeaderId(MAX_TERM, 99), True), last, [], None)
    assert await follower.append_entries(forged) == Success()
    assert follower.current_vote().term == MAX_TERM
    with caplog.at_level(logging.ERROR, logger="raft_http"):
        await asyncio.sleep(1.0)  # several election timeouts: the others learn the term
    for node in cluster.nodes.values():
        m = node.metrics()
        assert m.running
        assert m.current_term <= MAX_TERM
    assert "cannot campaign" in caplog.text


# --- 3. malformed batches ----------------------------------------------------------------


def entry(term: int, index: int, node_id: int = 1) -> Entry:
    return Entry(LogId(LeaderId(term, node_id), index), Normal(msgspec.Raw(b'{"n":-1}')))


@pytest.mark.parametrize(
    ("prev", "entries", "why"),
    [
        (None, [entry(1, 10**9)], "expected 0"),
        (LogId(LeaderId(1, 1), 4), [entry(1, 5), entry(1, 7)], "expected 6"),
        (LogId(LeaderId(1, 1), 4), [entry(2, 5), entry(1, 6)], "below 2"),
        (LogId(LeaderId(1, 1), 4), [entry(3, 5)], "above the sender's vote 2"),
        (LogId(LeaderId(3, 1), 4), [], "prev_log_id is of term 3"),
    ],
)
def test_append_shape_rules(prev: LogId | None, entries: list[Entry], why: str) -> None:
    rpc = AppendEntriesRequest(Vote(LeaderId(2, 1), True), prev, entries, None)
    error = rpc.shape_error()
    assert error is not None
    assert why in error


def test_a_well_formed_append_has_no_shape_error() -> None:
    prev = LogId(LeaderId(1, 1), 4)
    rpc = AppendEntriesRequest(
        Vote(LeaderId(2, 1), True), prev, [entry(1, 5), entry(2, 6), entry(2, 7)], prev
    )
    assert rpc.shape_error() is None
    assert (
        AppendEntriesRequest(Vote(LeaderId(0, 0)), None, [entry(0, 0, 0)], None).shape_error()
        is None
    )


async def test_malformed_batches_are_a_400_and_reach_no_handler(client: Any) -> None:
    for entries in ([entry(1, 10**9)], [entry(1, 0), entry(1, 2)]):
        rpc = AppendEntriesRequest(Vote(LeaderId(1, 1), True), None, entries, None)
        body = APPEND_ENTRIES_REQUEST.encode(rpc)
        resp = await client.post("/append", data=body, headers=JSON)
        assert "indexes must run on" in await error_of(resp, 400, "bad_request")
    assert client.handler.calls == []


async def test_a_core_refuses_malformed_batches_and_keeps_running(cluster: Cluster) -> None:
    """The same rules hold without HTTP (any transport): InvalidRequest, never fatal."""
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(1))
    follower = follower_of(cluster, leader)
    before = follower.log.last_log_id
    assert before is not None
    term = leader.current_vote().term
    bad = [
        AppendEntriesRequest(leader_vote(leader), None, [entry(term, 10**9)], None),
        AppendEntriesRequest(
            leader_vote(leader),
            before,
            [entry(term, before.index + 1), entry(term, before.index + 3)],
            None,
        ),
    ]
    for rpc in bad:
        with pytest.raises(InvalidRequest):
            await follower.append_entries(rpc)
        assert follower.metrics().running
        assert follower.log.last_log_id == before
    await assert_still_serves(cluster, 2)


async def test_an_append_replacing_a_committed_entry_is_refused_not_fatal(
    cluster: Cluster,
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    for n in range(3):
        await leader.client_write(cmd(n))
    follower = follower_of(cluster, leader)
    await cluster.wait_applied(leader.log.last_index)
    committed = follower.metrics().committed
    assert committed is not None
    kept = follower.log.entry(committed.index)
    prev = follower.log.log_id_at(committed.index - 1)
    term = leader.current_vote().term
    # The leader's own vote, an entry of another proposer: well-formed, but it contradicts
    # a committed entry (only a forged or buggy leader sends that).
    forged = Entry(LogId(LeaderId(term, 99), committed.index), Blank())
    rpc = AppendEntriesRequest(leader_vote(leader), prev, [forged], None)
    with pytest.raises(InvalidRequest, match="would replace committed entry"):
        await follower.append_entries(rpc)
    assert follower.metrics().running
    assert follower.log.entry(committed.index) == kept
    await assert_still_serves(cluster, 10)


# --- 4. a garbage snapshot -----------------------------------------------------------------


def garbage_snapshot(raft: Raft, leader: Raft, snapshot_id: str = "evil") -> Snapshot:
    committed = raft.metrics().committed
    assert committed is not None
    term = leader.current_vote().term
    meta = SnapshotMeta(
        last_log_id=LogId(LeaderId(term, leader.id), committed.index + 100),
        last_membership=raft.membership,
        snapshot_id=snapshot_id,
    )
    return Snapshot(meta, io.BytesIO(b"\x00not json at all"))


async def test_a_snapshot_the_state_machine_refuses_changes_nothing(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, snapshotting(every=5, keep=0))
    try:
        leader = await cluster.initialized([1, 2, 3])
        for n in range(12):
            await leader.client_write(cmd(n))
        await cluster.wait_applied(leader.log.last_index)
        follower = follower_of(cluster, leader)
        # Settled: a snapshot of its own up to the last entry, and no build under way (a
        # trigger while a build runs is a no-op, hence the bounded retry).
        for _ in range(50):
            m = follower.metrics()
            if m.snapshot is not None and m.snapshot == m.last_applied:
                break
            await follower.trigger_snapshot()
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the follower never snapshotted everything it applied")
        snapshot_before = await follower.snapshot_store.latest()
        log_before = (follower.log.last_purged, follower.log.last_log_id)
        applied_before = list(cluster.machines[follower.id].applied)

        with pytest.raises(SnapshotRejected):
            await follower.install_full_snapshot(
                leader_vote(leader), garbage_snapshot(follower, leader)
            )

        assert follower.metrics().running
        assert await follower.snapshot_store.latest() == snapshot_before
        assert (follower.log.last_purged, follower.log.last_log_id) == log_before
        assert cluster.machines[follower.id].applied == applied_before
        # A restart loads what was there before, and the node catches up.
        await cluster.restart(follower.id)
        await assert_still_serves(cluster, 100)
        assert cluster.machines[follower.id].applied == cluster.machines[leader.id].applied
    finally:
        await cluster.close()


async def test_a_refused_snapshot_is_a_422_over_http(
    cluster: Cluster, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]
) -> None:
    leader = await cluster.initialized([1, 2, 3])
    await leader.client_write(cmd(1))
    follower = follower_of(cluster, leader)
    http = await aiohttp_client(raft_app(follower))
    snapshot = garbage_snapshot(follower, leader, "evil-http")
    data = snapshot.data.read()
    headers = {
        "Content-Type": "application/octet-stream",
        "Raft-Vote": msgspec.json.encode(leader_vote(leader)).decode(),
        "Raft-Snapshot-Meta": msgspec.json.encode(snapshot.meta).decode(),
        "Raft-Snapshot-Size": str(len(data)),
        "Raft-Snapshot-Offset": "0",
    }
    resp = await http.post("/snapshot", data=data, headers=headers)
    assert "refused its data" in await error_of(resp, 422, "snapshot_rejected")
    assert follower.metrics().running
    assert await follower.snapshot_store.latest() is None
    await assert_still_serves(cluster, 2)


# --- 5. deep nesting -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data", "unknown field"])
async def test_deeply_nested_json_is_a_400(client: Any, where: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    rpc = AppendEntriesRequest(Vote(LeaderId(1, 1), True), None, [entry(1, 0)], None)
    body = APPEND_ENTRIES_REQUEST.encode(rpc)
    if where == "data":
        body = body.replace(b'{"n":-1}', deep)
    else:
        body = body[:-1] + b',"junk":' + deep + b"}"
    resp = await client.post("/append", data=body, headers=JSON)
    assert "nested too deeply" in await error_of(resp, 400, "bad_request")
    assert client.handler.calls == []


# --- compressed bodies and unparseable requests ------------------------------------------


@pytest.fixture
async def node_server() -> Any:
    """raft_app behind a runner set up the way ``raft-http node`` sets its own up."""
    handler = RecordingHandler(my_vote=Vote(LeaderId(1, 1), True))
    server = TestServer(raft_app(handler))
    await server.start_server(**runner_options())  # TestServer() drops runner arguments
    async with TestClient(server) as c:
        c.handler = handler
        yield c


ENCODED = [
    ("gzip", b"not gzip at all"),
    ("gzip", gzip.compress(append_json())),
    ("deflate", b"xx"),
    ("deflate", zlib.compress(append_json())),
    ("br", b"xx"),
    ("zstd", b"xx"),
    ("x-unknown", b"{}"),
]


@pytest.mark.parametrize(
    ("encoding", "body"), ENCODED, ids=[f"{e}-{i}" for i, (e, _) in enumerate(ENCODED)]
)
@pytest.mark.parametrize("route", ["/append", "/vote", "/snapshot"])
async def test_compressed_bodies_are_a_json_415_on_every_route(
    node_server: Any, route: str, encoding: str, body: bytes
) -> None:
    headers = {**JSON, "Content-Encoding": encoding}
    resp = await node_server.post(route, data=body, headers=headers)
    assert encoding in await error_of(resp, 415, "unsupported_media_type")
    assert node_server.handler.calls == []


async def test_gzip_is_refused_before_reading_even_with_aiohttps_defaults(client: Any) -> None:
    headers = {**JSON, "Content-Encoding": "gzip"}
    resp = await client.post("/vote", data=b"\x1f\x8bnot really", headers=headers)
    await error_of(resp, 415, "unsupported_media_type")


async def test_unparseable_requests_log_one_warning_per_source_not_tracebacks(
    node_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = node_server.server.host, node_server.server.port
    with caplog.at_level(logging.DEBUG, logger="raft_http.http"):
        for _ in range(5):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /vote HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5.0)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400", answer
    records = [r for r in caplog.records if r.name == "raft_http.http"]
    assert [r.levelno for r in records].count(logging.WARNING) == 1
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert not any(r.exc_info for r in records if r.levelno > logging.DEBUG)


def test_parse_error_logger_keeps_other_errors_loud(caplog: pytest.LogCaptureFixture) -> None:
    logger = ParseErrorLogger()
    with caplog.at_level(logging.DEBUG, logger="raft_http.http"):
        try:
            raise RuntimeError("a bug in a handler")
        except RuntimeError as exc:
            logger.exception("Error handling request from %s", "1.2.3.4", exc_info=exc)
    [record] = [r for r in caplog.records if r.name == "raft_http.http"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
