"""What a node tells its operator: one INFO line per event that changes what the cluster is.

Per-RPC detail stays at DEBUG (the core and the transport log it there). An operator
wants the rare events, each on one line with the node's id, term and role:

- each change of leader, term, role or membership (``RaftEventLog.watch`` follows the
  core's metrics, so an election that cannot finish shows at INFO as terms go by, and an
  ``/add-learner`` or ``/change-membership`` shows on the leader);
- each peer becoming unreachable, and reachable again (``RaftEventLog.trace_config`` on
  the peers' sessions: the first failure to connect, not every retry);
- snapshot sends and installs (the core logs those at INFO).

``RaftContext`` puts the term and role on every log record, and ``JsonFormatter`` writes
one JSON object per line for log shippers (``--log-format json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import aiohttp

from ..raft import RaftMetrics

logger = logging.getLogger("raft_http.kv.events")

_UNREACHABLE = (aiohttp.ClientConnectionError, OSError, TimeoutError)


def _facts(m: RaftMetrics) -> tuple[Any, ...]:
    return (m.current_leader, m.current_term, str(m.state), m.membership_config.log_id, m.running)


def _leader(node_id: int | None) -> str:
    return "none" if node_id is None else f"node {node_id}"


def _membership(m: RaftMetrics) -> str:
    membership = m.membership_config.membership
    voters = sorted({n for config in membership.configs for n in config})
    learners = sorted(set(membership.nodes) - set(voters))
    joint = " (joint)" if len(membership.configs) > 1 else ""
    log_id = m.membership_config.log_id
    at = "" if log_id is None else f" at log {log_id.leader_id.term}-{log_id.index}"
    return f"voters {voters}{joint}, learners {learners}{at}"


def describe_changes(before: RaftMetrics, after: RaftMetrics) -> list[str]:
    """What changed between two metrics, in the words of the log line."""
    changes = []
    if after.current_term != before.current_term:
        changes.append(f"term {before.current_term} -> {after.current_term}")
    if str(after.state) != str(before.state):
        changes.append(f"role {before.state} -> {after.state}")
    if after.current_leader != before.current_leader:
        changes.append(
            f"leader {_leader(before.current_leader)} -> {_leader(after.current_leader)}"
        )
    if after.membership_config.log_id != before.membership_config.log_id:
        changes.append(f"membership now {_membership(after)}")
    if before.running and not after.running:
        changes.append("stopped" + (f": {after.fatal}" if after.fatal else ""))
    return changes


class RaftEventLog:
    """Logs a node's events at INFO; ``watch(raft)`` once started, ``close()`` at stop."""

    def __init__(self, node_id: int, metrics: Callable[[], RaftMetrics] | None = None) -> None:
        self.node_id = node_id
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._unreachable: dict[str, str] = {}  # peer address -> why

    def _prefix(self) -> str:
        if self._metrics is None:
            return f"node {self.node_id}"
        m = self._metrics()
        return f"node {self.node_id} (term {m.current_term}, {m.state})"

    # --- the core's metrics ---------------------------------------------------------------

    def watch(self, raft: Any) -> None:
        """Follow ``raft`` (a ``raft_http.raft.Raft``) until it stops or ``close()``."""
        self._metrics = raft.metrics
        self._task = asyncio.get_running_loop().create_task(
            self._watch(raft), name=f"kv-events-{self.node_id}"
        )

    async def _watch(self, raft: Any) -> None:
        before: RaftMetrics = raft.metrics()
        logger.info("%s: %s, %s", self._prefix(), _leader_line(before), _membership(before))
        while before.running:
            seen = _facts(before)
            try:
                after: RaftMetrics = await raft.wait_for_server(
                    lambda m, seen=seen: _facts(m) != seen, timeout=3600.0
                )
            except TimeoutError:
                continue
            changes = describe_changes(before, after)
            if changes:
                logger.info("%s: %s", self._prefix(), "; ".join(changes))
            before = after

    # --- the peers' reachability ----------------------------------------------------------

    def trace_config(self) -> aiohttp.TraceConfig:
        """For the sessions that reach the peers: logs each peer going away and coming back."""
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_end)
        trace.on_request_exception.append(self._on_exception)
        return trace

    async def _on_end(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        peer = f"{params.url.host}:{params.url.port}"
        why = self._unreachable.pop(peer, None)
        if why is not None:
            logger.info("%s: peer %s is reachable again", self._prefix(), peer)

    async def _on_exception(self, _: Any, ctx: SimpleNamespace, params: Any) -> None:
        if not isinstance(params.exception, _UNREACHABLE):
            return
        peer = f"{params.url.host}:{params.url.port}"
        if peer in self._unreachable:
            return
        why = f"{type(params.exception).__name__}: {params.exception}"
        self._unreachable[peer] = why
        logger.info("%s: peer %s is unreachable (%s)", self._prefix(), peer, why)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _leader_line(m: RaftMetrics) -> str:
    return f"leader {_leader(m.current_leader)}"


class RaftContext(logging.Filter):
    """Adds ``raft_term`` and ``raft_role`` to every record (``-`` before the core runs)."""

    def __init__(self, metrics: Callable[[], RaftMetrics | None]) -> None:
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        m = None
        with contextlib.suppress(Exception):  # a log line must never fail for its context
            m = self.metrics()
        record.raft_term = "-" if m is None else m.current_term
        record.raft_role = "-" if m is None else str(m.state)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, node, term, role, message (and error)."""

    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "node": self.node_id,
            "term": getattr(record, "raft_term", None),
            "role": getattr(record, "raft_role", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)
