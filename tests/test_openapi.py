"""``GET /openapi.json`` is a valid OpenAPI 3.1 document naming every route a node serves,
and schemathesis, fuzzing a live node from it, never gets a server error.

A 503 is part of the contract (no leader, no quorum, stopped) and must be the JSON error
shape with a known kind; any other 5xx, or a 503 that is not that, fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from raft_http.kv import KVClient, KVNode
from raft_http.kv.openapi import openapi_document


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route of ``app`` and its sub-apps, HEAD-of-GET left out."""
    routes = set()
    for resource in app.router.resources():
        sub = getattr(resource, "_app", None)
        if isinstance(sub, web.Application):
            routes |= served_routes(sub)  # a mounted app's paths already carry the prefix
            continue
        for route in resource:
            routes.add((route.method.lower(), resource.canonical))
    gets = {path for method, path in routes if method == "get"}
    return {(m, p) for m, p in routes if not (m == "head" and p in gets)}


class NodeThread:
    """A single-node cluster in its own thread and loop, for synchronous fuzzing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.node = KVNode(1, root, port=0, write_timeout=0.5)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> NodeThread:
        self.thread.start()
        self.run(self.node.start())
        return self

    async def _init(self) -> None:
        async with KVClient(self.node.addr) as client:
            await client.init()
            await client.put("k", "v")

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self.run(self.node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[NodeThread]:
    with tempfile.TemporaryDirectory() as d, NodeThread(Path(d)) as node:
        node.run(node._init())
        yield node


def test_the_document_is_valid_openapi_and_is_what_the_node_serves(live: NodeThread) -> None:
    import urllib.request

    with urllib.request.urlopen(live.node.url + "/openapi.json", timeout=10) as resp:
        served = msgspec.json.decode(resp.read())
    assert served == msgspec.json.decode(msgspec.json.encode(openapi_document()))
    validate(served)
    documented = {(m, p) for p, ops in served["paths"].items() for m in ops}
    app = live.node._runner.app if live.node._runner else None
    assert app is not None
    assert served_routes(app) == documented
    # Schemas come from the msgspec types, so the core's own structs are there by name.
    for name in ("AppendEntriesRequest", "VoteResponse", "RaftMetrics", "ClusterStatus", "Set"):
        assert name in served["components"]["schemas"]
    assert served["paths"]["/health"]["get"]["security"] == []
    assert served["paths"]["/write"]["post"]["security"] == [{"apiToken": []}]
    assert served["paths"]["/raft/vote"]["post"]["security"] == [{"raftToken": []}]


KNOWN_503 = {
    "no_leader",
    "not_initialized",
    "quorum_not_enough",
    "write_aborted",
    "write_outcome_unknown",
    "timeout",
    "fatal",
    "raft_error",
    "overloaded",
    "transfer_failed",
}

schema = schemathesis.openapi.from_dict(openapi_document())


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    status = response.status_code
    if status < 500:
        return None
    assert status == 503, f"{case.method} {case.path} answered {status}: {response.text[:300]}"
    kind = response.json()["error"]["kind"]
    assert kind in KNOWN_503, f"{case.method} {case.path}: 503 of unknown kind {kind!r}"
    return None


@schema.parametrize()
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")  # theirs
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzz_every_route_from_the_document(case: Any, live: NodeThread) -> None:
    response = case.call(base_url=live.node.url, timeout=15)
    no_server_error(None, response, case)
    assert response.status_code != 404 or case.path == "/raft/snapshot", case.path
