"""The KV HTTP API: routes, redirects to the leader, and clear 4xx JSON errors for bad input.

The first part drives ``kv_api`` with a scripted Raft (every failure path, exactly);
the second runs real ``KVNode``s over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from raft_http.errors import APIError, Fatal
from raft_http.kv.api import kv_api
from raft_http.kv.node import KVNode
from raft_http.kv.state_machine import KVStateMachine
from raft_http.raft import LearnerNotCaughtUp, NodeRemoved, NotAllowed, ServerState
from raft_http.types import LeaderId, LogId, Node

LOG_ID = LogId(LeaderId(1, 1), 7)


@dataclass
class _Written:
    log_id: LogId
    data: Any


@dataclass
class _Metrics:
    id: int
    state: str


class _NotLeader(APIError):
    def __init__(self, leader_id: int | None, leader_node: Node | None) -> None:
        super().__init__("forward_to_leader", "not the leader")
        self.leader_id = leader_id
        self.leader_node = leader_node


class ScriptedRaft:
    """Records calls; raises ``fail`` when set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: BaseException | None = None

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def initialize(self, nodes: dict[int, Node]) -> None:
        self._maybe_fail()
        self.calls.append(("initialize", nodes))

    async def client_write(self, data: bytes) -> _Written:
        self._maybe_fail()
        self.calls.append(("client_write", data))
        return _Written(LOG_ID, {"value": "bar"})

    async def ensure_linearizable(self) -> LogId | None:
        self._maybe_fail()
        self.calls.append(("ensure_linearizable", None))
        return LOG_ID

    async def add_learner(
        self, node_id: int, node: Node, blocking: bool = True, timeout: float = 60.0
    ) -> _Written:
        self._maybe_fail()
        self.calls.append(("add_learner", (node_id, node)))
        return _Written(LOG_ID, None)

    async def remove_learner(self, node_ids: Iterable[int]) -> _Written:
        self._maybe_fail()
        self.calls.append(("remove_learner", set(node_ids)))
        return _Written(LOG_ID, None)

    async def change_membership(self, voters: Iterable[int], retain: bool = False) -> _Written:
        self._maybe_fail()
        self.calls.append(("change_membership", set(voters)))
        return _Written(LOG_ID, None)

    async def transfer_leader(self, to: int | None = None) -> int:
        self._maybe_fail()
        self.calls.append(("transfer_leader", to))
        return 2 if to is None else to

    state = ServerState.LEADER

    def metrics(self) -> Any:
        return _Metrics(1, self.state)


@pytest.fixture
def raft() -> ScriptedRaft:
    return ScriptedRaft()


@pytest.fixture
async def client(raft: ScriptedRaft, aiohttp_client: Any) -> TestClient[Any, Any]:
    sm = KVStateMachine()
    sm._data["foo"] = "local"
    app = kv_api(raft, sm, node_id=1, addr="127.0.0.1:21001", write_timeout=5.0)
    return await aiohttp_client(app, headers={"Content-Type": "application/json"})


async def _error(resp: Any, status: int, kind: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"]["kind"] == kind
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


async def test_write_validates_then_proposes(client: Any, raft: ScriptedRaft) -> None:
    body = b'{"Set":{"key":"foo","value":"bar"}}'
    resp = await client.post("/write", data=body)
    assert resp.status == 200
    assert await resp.json() == {
        "log_id": {"leader_id": {"term": 1, "node_id": 1}, "index": 7},
        "data": {"value": "bar"},
    }
    assert raft.calls == [("client_write", body)]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "truncated"),
        (b"nope", "malformed"),
        (b'{"Set":{"key":1,"value":"b"}}', "$.Set.key"),
        (b'{"Put":{"key":"a"}}', "Put"),
        (b"{}", "exactly one key"),
    ],
)
async def test_write_rejects_bad_commands(
    client: Any, raft: ScriptedRaft, body: bytes, fragment: str
) -> None:
    error = await _error(await client.post("/write", data=body), 400, "bad_request")
    assert fragment in error["message"]
    assert raft.calls == []


async def test_write_on_follower_redirects_to_leader(client: Any, raft: ScriptedRaft) -> None:
    raft.fail = _NotLeader(2, Node("127.0.0.1:21002"))
    resp = await client.post("/write", data=b'{"Delete":{"key":"a"}}', allow_redirects=False)
    error = await _error(resp, 307, "forward_to_leader")
    assert resp.headers["Location"] == "http://127.0.0.1:21002/write"
    assert error["leader_id"] == 2
    assert error["leader_addr"] == "127.0.0.1:21002"


async def test_redirect_keeps_a_url_address_and_the_route(client: Any, raft: ScriptedRaft) -> None:
    raft.fail = _NotLeader(3, Node("https://node3.example:8443/"))
    resp = await client.post("/consistent_read", data=b'"foo"', allow_redirects=False)
    await _error(resp, 307, "forward_to_leader")
    assert resp.headers["Location"] == "https://node3.example:8443/consistent_read"


async def test_no_leader_answers_503_with_retry_after(client: Any, raft: ScriptedRaft) -> None:
    raft.fail = _NotLeader(None, None)
    resp = await client.post("/change-membership", data=b"[1,2]")
    await _error(resp, 503, "no_leader")
    assert resp.headers["Retry-After"] == "1"


async def test_core_errors_map_to_honest_statuses(client: Any, raft: ScriptedRaft) -> None:
    raft.fail = APIError("not_allowed", "already initialized")
    error = await _error(await client.post("/init", data=b"[]"), 409, "not_allowed")
    assert error["message"] == "already initialized"
    for kind in ("quorum_not_enough", "write_aborted", "write_outcome_unknown"):
        raft.fail = APIError(kind, "try again")
        resp = await client.post("/consistent_read", data=b'"a"')
        await _error(resp, 503, kind)
        assert resp.headers["Retry-After"] == "1"
    raft.fail = Fatal("storage failed")
    error = await _error(await client.post("/write", data=b'{"Delete":{"key":"a"}}'), 503, "fatal")
    assert "storage failed" in error["message"]


async def test_transfer_leader_route(client: Any, raft: ScriptedRaft) -> None:
    resp = await client.post("/transfer-leader", data=b"3")
    assert resp.status == 200
    assert await resp.json() == {"leader_id": 3}
    resp = await client.post("/transfer-leader", data=b"null")
    assert await resp.json() == {"leader_id": 2}
    assert raft.calls == [("transfer_leader", 3), ("transfer_leader", None)]
    for bad in (b"-1", b'"2"', b"", b"[2]"):
        await _error(await client.post("/transfer-leader", data=bad), 400, "bad_request")
    raft.fail = APIError("transfer_failed", "node 3 did not take over within 2s")
    resp = await client.post("/transfer-leader", data=b"3")
    await _error(resp, 503, "transfer_failed")
    assert resp.headers["Retry-After"] == "1"
    raft.fail = APIError("not_allowed", "node 7 is not a voter")
    await _error(await client.post("/transfer-leader", data=b"7"), 409, "not_allowed")
    assert len(raft.calls) == 2


async def test_overloaded_write_answers_503_with_retry_after(
    client: Any, raft: ScriptedRaft
) -> None:
    raft.fail = APIError("overloaded", "10000 entries are not committed yet")
    resp = await client.post("/write", data=b'{"Set":{"key":"a","value":"1"}}')
    error = await _error(resp, 503, "overloaded")
    assert "not committed" in error["message"]
    assert resp.headers["Retry-After"] == "1"
    assert raft.calls == []


async def test_init_with_members_and_alone(client: Any, raft: ScriptedRaft) -> None:
    resp = await client.post("/init", data=b'[[1,"127.0.0.1:21001"],[2,"127.0.0.1:21002"]]')
    assert resp.status == 200
    resp = await client.post("/init", data=b"[]")
    assert resp.status == 200
    assert raft.calls == [
        ("initialize", {1: Node("127.0.0.1:21001"), 2: Node("127.0.0.1:21002")}),
        ("initialize", {1: Node("127.0.0.1:21001")}),
    ]


@pytest.mark.parametrize(
    ("route", "body", "fragment"),
    [
        ("/init", b'[[1,"127.0.0.1:21001"],[1,"127.0.0.1:21002"]]', "twice"),
        ("/init", b'[[-1,"127.0.0.1:21001"]]', "$[0][0]"),
        ("/init", b'[[1,"no-port"]]', "$[0][1]"),
        ("/init", b'[[1,"127.0.0.1:1","x"]]', "length 2"),
        ("/init", b'{"1":"127.0.0.1:21001"}', "array"),
        ("/add-learner", b'[4,"ftp://h:1"]', "$[1]"),
        ("/add-learner", b'["4","127.0.0.1:21004"]', "$[0]"),
        ("/change-membership", b"[]", "at least one voter"),
        ("/change-membership", b'[1,"2"]', "$[1]"),
        ("/read", b"42", "str"),
        ("/consistent_read", b"", "truncated"),
    ],
)
async def test_bad_bodies_get_400_naming_the_field(
    client: Any, raft: ScriptedRaft, route: str, body: bytes, fragment: str
) -> None:
    error = await _error(await client.post(route, data=body), 400, "bad_request")
    assert fragment in error["message"]
    assert raft.calls == []


async def test_add_learner_and_change_membership(client: Any, raft: ScriptedRaft) -> None:
    assert (await client.post("/add-learner", data=b'[4,"127.0.0.1:21004"]')).status == 200
    assert (await client.post("/change-membership", data=b"[1,2,3,4]")).status == 200
    assert raft.calls == [
        ("add_learner", (4, Node("127.0.0.1:21004"))),
        ("change_membership", {1, 2, 3, 4}),
    ]


async def test_add_learner_that_does_not_catch_up_is_202_and_says_why(
    client: Any, raft: ScriptedRaft
) -> None:
    raft.fail = LearnerNotCaughtUp(4, LOG_ID, None, "Unreachable: connection refused", 5.0)
    resp = await client.post("/add-learner", data=b'[4,"127.0.0.1:21004"]')
    assert resp.status == 202
    body = await resp.json()
    assert body["caught_up"] is False
    assert body["unreachable"] is True
    assert body["log_id"]["index"] == LOG_ID.index
    assert body["error"]["kind"] == "learner_not_caught_up"
    assert "unreachable" in body["error"]["message"]
    assert "remove_learner" in body["error"]["message"]
    raft.fail = LearnerNotCaughtUp(4, LOG_ID, LOG_ID, None, 5.0)
    resp = await client.post("/add-learner", data=b'[4,"127.0.0.1:21004"]')
    assert resp.status == 202
    body = await resp.json()
    assert body["unreachable"] is False
    assert "still catching up" in body["error"]["message"]


async def test_remove_learner(client: Any, raft: ScriptedRaft) -> None:
    resp = await client.post("/remove-learner", data=b"[4, 5]")
    assert resp.status == 200
    assert (await resp.json())["log_id"]["index"] == LOG_ID.index
    assert raft.calls == [("remove_learner", {4, 5})]
    await _error(await client.post("/remove-learner", data=b'["x"]'), 400, "bad_request")
    raft.fail = NotAllowed("nodes [2] are voters; change the membership to remove them")
    await _error(await client.post("/remove-learner", data=b"[2]"), 409, "not_allowed")


async def test_a_removed_node_refuses_reads_and_writes(client: Any, raft: ScriptedRaft) -> None:
    raft.state = ServerState.REMOVED
    error = await _error(await client.post("/read", data=b'"foo"'), 409, "node_removed")
    assert "removed" in error["message"]
    raft.fail = NodeRemoved(1)
    await _error(await client.post("/consistent_read", data=b'"foo"'), 409, "node_removed")
    write = b'{"Set": {"key": "a", "value": "b"}}'
    await _error(await client.post("/write", data=write), 409, "node_removed")


async def test_reads(client: Any, raft: ScriptedRaft) -> None:
    assert await (await client.post("/read", data=b'"foo"')).json() == {"value": "local"}
    assert await (await client.post("/read", data=b'"bar"')).json() == {"value": None}
    assert raft.calls == []
    resp = await client.post("/consistent_read", data=b'"foo"')
    assert await resp.json() == {"value": "local"}
    assert raft.calls == [("ensure_linearizable", None)]


async def test_unknown_route_method_and_oversized_body_are_json(client: Any) -> None:
    await _error(await client.get("/nope"), 404, "not_found")
    await _error(await client.get("/write"), 405, "method_not_allowed")
    error = await _error(
        await client.post("/write", data=b"x" * (1024**2 + 1)), 413, "payload_too_large"
    )
    assert error["limit"] == 1024**2


async def test_metrics(client: Any) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert await resp.json() == {"id": 1, "state": "Leader"}


async def test_unexpected_error_is_a_json_500_without_traceback(
    client: Any, raft: ScriptedRaft
) -> None:
    raft.fail = ZeroDivisionError("secret detail")
    error = await _error(
        await client.post("/write", data=b'{"Delete":{"key":"a"}}'), 500, "internal"
    )
    assert "secret" not in error["message"]


# --- real nodes over HTTP on 127.0.0.1 ---------------------------------------------------


async def _wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def test_single_node_round_trip_and_restart(
    tmp_path: Path, session: aiohttp.ClientSession, nodes: list[KVNode]
) -> None:
    node = KVNode(1, tmp_path / "1", port=0)
    nodes.append(node)
    await node.start()
    assert node.port != 0
    resp = await session.post(f"{node.url}/init", data=b"[]")
    assert resp.status == 200, await resp.text()
    await node.raft.wait_for(lambda m: m.state == "Leader", timeout=10, msg="leader")
    resp = await session.post(f"{node.url}/write", data=b'{"Set":{"key":"foo","value":"bar"}}')
    assert resp.status == 200, await resp.text()
    written = await resp.json()
    assert written["data"] == {"value": "bar"}
    resp = await session.post(f"{node.url}/consistent_read", data=b'"foo"')
    assert await resp.json() == {"value": "bar"}
    resp = await session.post(f"{node.url}/write", data=b'{"Delete":{"key":"foo"}}')
    assert (await resp.json())["data"] == {"value": "bar"}
    resp = await session.post(f"{node.url}/write", data=b'{"Set":{"key":"k","value":"v"}}')
    assert resp.status == 200
    # A second init is refused with the core's kind.
    await _error(await session.post(f"{node.url}/init", data=b"[]"), 409, "not_allowed")
    # The Raft routes share the server under /raft, with JSON errors there too.
    await _error(await session.get(f"{node.url}/raft/nope"), 404, "not_found")
    await _error(await session.post(f"{node.url}/raft/vote", json={}), 400, "bad_request")
    metrics = await (await session.get(f"{node.url}/metrics")).json()
    assert metrics["state"] == "Leader"
    await node.stop()
    nodes.remove(node)

    again = KVNode(1, tmp_path / "1", port=0)
    nodes.append(again)
    await again.start()
    await _wait(lambda: again.state_machine.get("k") == "v", "the log replayed at start")
    assert again.state_machine.get("foo") is None


async def test_three_nodes_redirect_and_protect_the_raft_routes(
    tmp_path: Path, session: aiohttp.ClientSession, nodes: list[KVNode]
) -> None:
    for n in (1, 2, 3):
        node = KVNode(n, tmp_path / str(n), port=0, token="s3cret", cluster="kv-test")
        nodes.append(node)
        await node.start()
    members = [[node.node_id, node.addr] for node in nodes]
    # The Raft token guards the KV API too (no --api-token): send it on every API call.
    session.headers["Authorization"] = "Bearer s3cret"
    resp = await session.post(f"{nodes[0].url}/init", json=members)
    assert resp.status == 200, await resp.text()

    def agreed_leader() -> int | None:
        leaders = {node.raft.metrics().current_leader for node in nodes}
        if len(leaders) != 1 or None in leaders:
            return None
        (leader_id,) = leaders
        return leader_id if nodes[leader_id - 1].raft.metrics().state == "Leader" else None

    # A busy loop may delay a heartbeat into a new election: retry (bounded) until a
    # follower answers with the leader it knows, then check the redirect points there.
    for _ in range(50):
        await _wait(lambda: agreed_leader() is not None, "a leader all nodes agree on")
        leader_id = agreed_leader()
        follower = next(node for node in nodes if node.node_id != leader_id)
        resp = await session.post(
            f"{follower.url}/write", data=b'{"Set":{"key":"a","value":"1"}}', allow_redirects=False
        )
        if resp.status != 503:
            break
        await asyncio.sleep(0.1)
    error = await _error(resp, 307, "forward_to_leader")
    leader = next(node for node in nodes if node.node_id == error["leader_id"])
    assert resp.headers["Location"] == f"{leader.url}/write"
    assert error["leader_addr"] == leader.addr
    # Following the redirect lands the write on the leader. aiohttp (like curl without
    # --location-trusted) drops Authorization on a redirect to another host:port, so a
    # client with a token follows it itself.
    resp = await session.post(resp.headers["Location"], data=b'{"Set":{"key":"a","value":"1"}}')
    assert resp.status == 200, await resp.text()
    resp = await session.post(f"{leader.url}/consistent_read", data=b'"a"')
    assert await resp.json() == {"value": "1"}
    await _wait(lambda: all(node.state_machine.get("a") == "1" for node in nodes), "replication")

    vote = b'{"vote":{"leader_id":{"term":99,"node_id":9}},"last_log_id":null}'
    raft_vote = f"{follower.url}/raft/vote"
    del session.headers["Authorization"]
    headers = {"Content-Type": "application/json"}
    await _error(await session.post(raft_vote, data=vote, headers=headers), 401, "unauthorized")
    wrong_cluster = {**headers, "Authorization": "Bearer s3cret", "Raft-Cluster": "other"}
    resp = await session.post(raft_vote, data=vote, headers=wrong_cluster)
    await _error(resp, 412, "cluster_mismatch")
    # Neither request reached Raft: the follower did not grant a vote for term 99.
    assert follower.raft.metrics().current_term < 99


async def test_three_nodes_transfer_leadership_and_hand_over_on_stop(
    tmp_path: Path, session: aiohttp.ClientSession, nodes: list[KVNode]
) -> None:
    for n in (1, 2, 3):
        node = KVNode(n, tmp_path / str(n), port=0)
        nodes.append(node)
        await node.start()
    members = [[node.node_id, node.addr] for node in nodes]
    resp = await session.post(f"{nodes[0].url}/init", json=members)
    assert resp.status == 200, await resp.text()
    by_id = {node.node_id: node for node in nodes}

    def leader() -> KVNode | None:
        found = [n for n in nodes if n.raft.metrics().state == "Leader"]
        if len(found) != 1:
            return None
        followed = {n.raft.metrics().current_leader for n in nodes}
        return found[0] if followed == {found[0].node_id} else None

    # A busy machine may slip an election in (timeouts of 150-300 ms): retry, bounded.
    for _ in range(20):
        await _wait(lambda: leader() is not None, "a leader every node follows")
        old = leader()
        assert old is not None
        target = next(n for n in nodes if n is not old)
        # Sent to a follower, the request is redirected to the leader, which hands over.
        resp = await session.post(f"{target.url}/transfer-leader", data=str(target.node_id))
        if resp.status != 503:
            break
        await asyncio.sleep(0.1)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"leader_id": target.node_id}
    resp = await session.post(f"{target.url}/write", data=b'{"Set":{"key":"a","value":"1"}}')
    assert resp.status == 200, await resp.text()
    # hand_over (what SIGTERM runs): a follower does nothing, the leader hands over.
    for _ in range(20):
        await _wait(lambda: leader() is not None, "a leader every node follows")
        current = leader()
        assert current is not None
        follower = next(n for n in nodes if n is not current)
        assert await follower.hand_over(2.0) is None
        new_leader = await current.hand_over(2.0)
        if new_leader is not None:
            break
    assert new_leader in by_id
    assert new_leader != current.node_id
    assert current.state_machine.get("a") == "1"
