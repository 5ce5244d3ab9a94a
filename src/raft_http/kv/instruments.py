"""What a node counts about its own traffic and storage, for ``/metrics`` and ``/ready``.

The core's ``RaftMetrics`` says where the node is (term, role, log, commit); this says how
it got there: RPCs sent to each peer (an aiohttp ``TraceConfig`` on the network factory's
sessions), requests served by route (a middleware), snapshot bytes both ways, log fsync
latency (``InstrumentedLogStore``), leader changes and in-flight writes. Plain counters,
no dependency: ``prometheus.py`` renders them with ``prometheus-client`` when installed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from aiohttp import web

from ..raft import SqliteLogStore
from ..types import Entry, LogId, Vote

LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the latency histograms: loopback fsyncs to WAN snapshot chunks."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Histogram:
    """Counts per bucket (not cumulative) plus the sum, as Prometheus histograms need."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs ending with ``+Inf``, for ``HistogramMetricFamily``."""
        out, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class PeerRPCs:
    """What this node sent to one peer address on one route."""

    sent: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency: Histogram = field(default_factory=Histogram)
    bytes_sent: int = 0


@dataclass
class ServedRoute:
    """What this node answered on one route (keyed by route and status)."""

    by_status: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    latency: Histogram = field(default_factory=Histogram)
    bytes_received: int = 0


class NodeInstruments:
    """One node's counters; ``trace_config()`` for the peers' sessions, ``middleware`` for the app.

    ``watch(raft)`` follows the core's metrics in a task: leader changes, and the commit
    index the node must apply before ``/ready`` says yes.
    """

    def __init__(self) -> None:
        self.sent: dict[tuple[str, str], PeerRPCs] = defaultdict(PeerRPCs)
        self.reachable: dict[str, bool] = {}
        self.served: dict[str, ServedRoute] = defaultdict(ServedRoute)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.storage: dict[str, Histogram] = defaultdict(Histogram)
        self.leader_changes = 0
        self.ready_at_index: int | None = None
        self.ready = False
        self._watcher: asyncio.Task[None] | None = None

    # --- what this node sends: a TraceConfig on the network's sessions --------------------

    def trace_config(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._on_start)
        trace.on_request_chunk_sent.append(self._on_chunk)
        trace.on_request_end.append(self._on_end)
        trace.on_request_exception.append(self._on_exception)
        return trace

    @staticmethod
    def _key(url: Any) -> tuple[str, str]:
        return f"{url.host}:{url.port}", url.path

    async def _on_start(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        ctx.started = time.monotonic()
        ctx.key = self._key(params.url)
        self.sent[ctx.key].sent += 1

    async def _on_chunk(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        key = getattr(ctx, "key", None)
        if key is not None:
            self.sent[key].bytes_sent += len(params.chunk)

    async def _on_end(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        peer, route = self._key(params.url)
        rpcs = self.sent[peer, route]
        rpcs.latency.observe(time.monotonic() - ctx.started)
        if params.response.status >= 400:
            rpcs.errors[f"http_{params.response.status}"] += 1
        self.reachable[peer] = True

    async def _on_exception(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        peer, route = self._key(params.url)
        self.sent[peer, route].errors[type(params.exception).__name__] += 1
        if isinstance(params.exception, aiohttp.ClientConnectionError | OSError | TimeoutError):
            self.reachable[peer] = False

    def stream_message(self, url: Any, nbytes: int, seconds: float, error: str | None) -> None:
        """One AppendEntries of a ``/append-stream`` WebSocket, counted as an RPC of that route."""
        peer, route = self._key(url)
        rpcs = self.sent[peer, route]
        rpcs.sent += 1
        rpcs.bytes_sent += nbytes
        rpcs.latency.observe(seconds)
        if error is None:
            self.reachable[peer] = True
        else:
            rpcs.errors[error] += 1

    # --- what this node serves: a middleware ---------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
        started = time.monotonic()
        self.in_flight[route] += 1
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            self.in_flight[route] -= 1
            served = self.served[route]
            served.by_status[status] += 1
            served.latency.observe(time.monotonic() - started)
            served.bytes_received += request.content.total_bytes

    # --- the core's metrics, followed ----------------------------------------------------

    def watch(self, raft: Any) -> None:
        """Follow ``raft.metrics()`` (a ``raft_http.raft.Raft``) in a task until it stops."""
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(raft), name="kv-instruments-watch"
        )

    async def _watch(self, raft: Any) -> None:
        """Count leader changes; set ``ready`` once a leader is known and the node applied
        the commit index it had at start, or the first one a leader taught it if higher
        (what a restarted follower must catch up to before its local reads are fresh)."""
        m = raft.metrics()
        self.ready_at_index = _index(m.committed) or 0
        leader, learned = m.current_leader, False
        while m.running:
            if m.current_leader != leader:
                self.leader_changes += m.current_leader is not None
                leader = m.current_leader
            if not learned and m.current_leader is not None:
                learned = True
                self.ready_at_index = max(_index(m.committed) or 0, self.ready_at_index)
            if learned and (_index(m.last_applied) or 0) >= self.ready_at_index:
                self.ready = True
            # Once ready, the commit and apply indexes no longer matter here: waiting for
            # the server fields only, this task no longer wakes at every write.
            watched = _watched_ready if self.ready else _watched
            wait = raft.wait_for_server if self.ready else raft.wait_for
            seen = watched(m)
            try:
                m = await wait(lambda new, w=watched, s=seen: w(new) != s, timeout=5.0)
            except TimeoutError:
                m = raft.metrics()
        self.ready = False

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _watched(m: Any) -> tuple[Any, ...]:
    """The fields ``_watch`` acts on (``since_quorum_ack`` changes at every call)."""
    return (m.current_leader, m.committed, m.last_applied, m.running)


def _watched_ready(m: Any) -> tuple[Any, ...]:
    """The fields ``_watch`` acts on once the node is ready."""
    return (m.current_leader, m.running)


def _index(log_id: LogId | None) -> int | None:
    return None if log_id is None else log_id.index


class InstrumentedLogStore(SqliteLogStore):
    """The SQLite log store, timing its durable writes (each one fsync) into ``instruments``."""

    instruments: NodeInstruments | None = None

    @classmethod
    async def open_counted(cls, path: str | Path, instruments: NodeInstruments) -> SqliteLogStore:
        store = await cls.open(path)
        assert isinstance(store, InstrumentedLogStore)
        store.instruments = instruments
        return store

    async def append(self, entries: Sequence[Entry]) -> None:
        started = time.monotonic()
        await super().append(entries)
        self._observe("append", started)

    def append_inline(self, entries: Sequence[Entry]) -> bool:
        started = time.monotonic()
        done = super().append_inline(entries)
        if done and entries:
            self._observe("append", started)
        return done

    async def save_vote(self, vote: Vote) -> None:
        started = time.monotonic()
        await super().save_vote(vote)
        self._observe("save_vote", started)

    def _observe(self, op: str, started: float) -> None:
        if self.instruments is not None:
            self.instruments.storage[op].observe(time.monotonic() - started)
