"""``GET /metrics`` for a Prometheus scrape, rendered by ``prometheus-client`` (extra ``metrics``).

Read at scrape time from the core's ``RaftMetrics`` and the node's ``NodeInstruments``:
nothing is kept twice and nothing is global (one registry per scrape, so several nodes in
one process never mix). Peers are labelled by node id where the membership knows their
address, else by ``host:port``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from yarl import URL

from ..raft import ServerState
from .api import base_url
from .instruments import NodeInstruments

ROLES = tuple(state.value for state in ServerState)


def render(metrics: Any, instruments: NodeInstruments, accept: str) -> tuple[bytes, str]:
    """The exposition (OpenMetrics when ``accept`` asks for it, else text 0.0.4) and its type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_NodeCollector(metrics, instruments))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def _peer_names(metrics: Any) -> dict[str, str]:
    names = {}
    for node_id, node in metrics.membership_config.membership.nodes.items():
        url = URL(base_url(node.addr))
        names[f"{url.host}:{url.port}"] = str(node_id)
    return names


class _NodeCollector(Collector):
    def __init__(self, metrics: Any, instruments: NodeInstruments) -> None:
        self.m = metrics
        self.i = instruments

    def collect(self) -> Iterable[Metric]:
        yield from self._state()
        yield from self._replication()
        yield from self._rpcs()
        yield from self._served()
        yield from self._storage()

    def _gauge(self, name: str, doc: str, value: float | None) -> Iterator[Metric]:
        if value is not None:
            yield GaugeMetricFamily(f"raft_http_{name}", doc, value=value)

    def _state(self) -> Iterator[Metric]:
        m = self.m
        yield from self._gauge("term", "Current term", m.current_term)
        role = GaugeMetricFamily("raft_http_role", "1 for this node's role", labels=["role"])
        for name in ROLES:
            role.add_metric([name], 1.0 if str(m.state) == name else 0.0)
        yield role
        yield from self._gauge(
            "leader_id", "The leader this node knows (absent when none)", m.current_leader
        )
        yield from self._gauge("is_leader", "1 if this node leads", float(m.state == "Leader"))
        yield from self._gauge(
            "running", "1 while the core runs (0 after a fatal error)", m.running
        )
        yield from self._gauge("last_log_index", "Index of the last log entry", m.last_log_index)
        yield from self._gauge(
            "in_memory_log_bytes",
            "Application bytes of the log entries held in memory",
            m.in_memory_log_bytes,
        )
        yield from self._gauge(
            "in_memory_log_entries", "Log entries held in memory", m.in_memory_log_entries
        )
        for name, log_id in (
            ("committed_index", m.committed),
            ("applied_index", m.last_applied),
            ("snapshot_index", m.snapshot),
            ("purged_index", m.purged),
        ):
            yield from self._gauge(name, f"{name.replace('_', ' ')}", _idx(log_id))
        yield from self._gauge(
            "since_quorum_ack_seconds",
            "Leader only: seconds since a quorum last acknowledged it",
            m.since_quorum_ack,
        )
        yield CounterMetricFamily(
            "raft_http_leader_changes",
            "Times this node saw a new leader since it started",
            value=self.i.leader_changes,
        )
        pending = GaugeMetricFamily(
            "raft_http_pending_requests",
            "Requests being served now, by route (POST /write: writes not yet applied)",
            labels=["route"],
        )
        for route, count in sorted(self.i.in_flight.items()):
            pending.add_metric([route], count)
        yield pending
        yield from self._gauge(
            "pending_writes", "Client writes not yet answered", self.i.in_flight.get("/write", 0)
        )

    def _replication(self) -> Iterator[Metric]:
        matched = GaugeMetricFamily(
            "raft_http_peer_matched_index",
            "Leader only: each peer's matched index",
            labels=["peer"],
        )
        lag = GaugeMetricFamily(
            "raft_http_peer_lag_entries",
            "Leader only: entries each peer is behind",
            labels=["peer"],
        )
        for peer, log_id in sorted((self.m.replication or {}).items()):
            index = _idx(log_id) or 0
            matched.add_metric([str(peer)], index)
            lag.add_metric([str(peer)], max(0, self.m.last_log_index - index))
        yield matched
        yield lag
        names = _peer_names(self.m)
        reachable = GaugeMetricFamily(
            "raft_http_peer_reachable",
            "1 if the last RPC to the peer got an answer, 0 if it failed to connect or timed out",
            labels=["peer"],
        )
        for addr, ok in sorted(self.i.reachable.items()):
            reachable.add_metric([names.get(addr, addr)], 1.0 if ok else 0.0)
        yield reachable

    def _rpcs(self) -> Iterator[Metric]:
        names = _peer_names(self.m)
        labels = ["route", "peer"]
        sent = CounterMetricFamily(
            "raft_http_rpc_sent", "RPCs sent, by route and peer", labels=labels
        )
        errors = CounterMetricFamily(
            "raft_http_rpc_errors",
            "RPCs that failed (exception name or http_<status>), by route and peer",
            labels=[*labels, "error"],
        )
        latency = HistogramMetricFamily(
            "raft_http_rpc_duration_seconds", "RPC round trips, by route and peer", labels=labels
        )
        snap_sent = CounterMetricFamily(
            "raft_http_snapshot_sends", "Snapshot uploads started, by peer", labels=["peer"]
        )
        snap_bytes = CounterMetricFamily(
            "raft_http_snapshot_sent_bytes", "Snapshot bytes uploaded, by peer", labels=["peer"]
        )
        for (addr, route), rpcs in sorted(self.i.sent.items()):
            key = [route, names.get(addr, addr)]
            sent.add_metric(key, rpcs.sent)
            for error, count in sorted(rpcs.errors.items()):
                errors.add_metric([*key, error], count)
            latency.add_metric(key, rpcs.latency.cumulative(), rpcs.latency.total)
            if route.endswith("/snapshot"):
                snap_sent.add_metric(key[1:], rpcs.sent)
                snap_bytes.add_metric(key[1:], rpcs.bytes_sent)
        yield from (sent, errors, latency, snap_sent, snap_bytes)

    def _served(self) -> Iterator[Metric]:
        served = CounterMetricFamily(
            "raft_http_http_requests",
            "Requests answered, by route and status",
            labels=["route", "status"],
        )
        latency = HistogramMetricFamily(
            "raft_http_http_request_duration_seconds", "Time to answer, by route", labels=["route"]
        )
        installs = 0
        received = 0
        for route, s in sorted(self.i.served.items()):
            for status, count in sorted(s.by_status.items()):
                served.add_metric([route, str(status)], count)
            latency.add_metric([route], s.latency.cumulative(), s.latency.total)
            if route.endswith("/snapshot"):
                installs += s.by_status.get(200, 0)
                received += s.bytes_received
        yield from (served, latency)
        yield CounterMetricFamily(
            "raft_http_snapshot_installs",
            "Snapshot uploads received and answered 200",
            value=installs,
        )
        yield CounterMetricFamily(
            "raft_http_snapshot_received_bytes", "Snapshot bytes received", value=received
        )

    def _storage(self) -> Iterator[Metric]:
        fsync = HistogramMetricFamily(
            "raft_http_log_fsync_duration_seconds",
            "Durable log writes (one fsync each, with the hand-off to the store's thread), by op",
            labels=["op"],
        )
        for op, h in sorted(self.i.storage.items()):
            fsync.add_metric([op], h.cumulative(), h.total)
        yield fsync


def _idx(log_id: Any) -> int | None:
    return None if log_id is None else int(log_id.index)
