"""``GET /health``, ``GET /ready`` and ``GET /metrics`` (JSON, or Prometheus to a scrape).

- ``/health``: 200 while the core runs and knows a leader, else 503. For a liveness or
  load-balancer probe.
- ``/ready``: 200 once the node knows a leader and has applied the commit index it had at
  start (or the first one a leader taught it, if higher); 503 before. For a readiness
  probe: a restarted node is not sent local reads until it caught up.
- Both stay open when an API token is set; then they say only ``up`` or ``down``, no reason.
- ``/metrics``: the core's ``RaftMetrics`` as JSON by default; the Prometheus text or
  OpenMetrics exposition when ``Accept`` prefers ``text/plain`` or
  ``application/openmetrics-text`` (needs ``pip install 'raft-http[metrics]'``, else 406).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import hdrs, web
from msgspec import Struct

from ..raft import RaftMetrics
from ..types import encode_json
from .instruments import NodeInstruments

EXPOSITION_TYPES: Final = ("text/plain", "application/openmetrics-text")
JSON_TYPES: Final = ("application/json", "application/*", "*/*")
INSTRUMENTS: Final = web.AppKey("instruments", NodeInstruments)


class ProbeAnswer(Struct, frozen=True, omit_defaults=True):
    """What ``/health`` and ``/ready`` answer: ``up`` or ``down``, and why when allowed."""

    status: str
    reason: str | None = None


def wants_exposition(accept: str) -> bool:
    """True when ``accept`` ranks a Prometheus format strictly above JSON (``*/*`` is JSON)."""
    best = {"exposition": 0.0, "json": 0.0}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in EXPOSITION_TYPES:
            best["exposition"] = max(best["exposition"], q)
        elif media in JSON_TYPES:
            best["json"] = max(best["json"], q)
    return best["exposition"] > best["json"]


class Probes:
    """The three routes; ``reveal`` False (an API token is set) keeps reasons to itself."""

    def __init__(self, raft: Any, instruments: NodeInstruments, *, reveal: bool) -> None:
        self.raft = raft
        self.instruments = instruments
        self.reveal = reveal

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health),
            web.get("/ready", self.ready),
            web.get("/metrics", self.metrics),
        ]

    def _answer(self, reason: str | None) -> web.Response:
        body = ProbeAnswer("up" if reason is None else "down", reason if self.reveal else None)
        return web.Response(
            status=200 if reason is None else 503,
            body=encode_json(body),
            content_type="application/json",
            headers={hdrs.CACHE_CONTROL: "no-store"},
        )

    def _down_reason(self) -> str | None:
        m = msgspec.to_builtins(self.raft.metrics())
        if not m.get("running", True):
            return "fatal" if m.get("fatal") else "stopped"
        if m.get("current_leader") is None:
            nodes = m.get("membership_config", {}).get("membership", {}).get("nodes")
            return "not_initialized" if not nodes else "no_leader"
        return None

    async def health(self, request: web.Request) -> web.Response:
        return self._answer(self._down_reason())

    async def ready(self, request: web.Request) -> web.Response:
        reason = self._down_reason()
        if reason is None and not self.instruments.ready:
            reason = "catching_up"
        return self._answer(reason)

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = self.raft.metrics()
        accept = request.headers.get(hdrs.ACCEPT, "")
        if not wants_exposition(accept):
            return web.Response(body=encode_json(metrics), content_type="application/json")
        try:
            from .prometheus import render
        except ImportError:
            refusal = {
                "error": {
                    "kind": "not_acceptable",
                    "message": "the Prometheus format needs prometheus-client: "
                    "pip install 'raft-http[metrics]'; without Accept: text/plain "
                    "/metrics answers JSON",
                }
            }
            return web.Response(
                status=406, body=encode_json(refusal), content_type="application/json"
            )
        if not isinstance(metrics, RaftMetrics):
            metrics = msgspec.convert(metrics, RaftMetrics)
        body, content_type = render(metrics, self.instruments, accept)
        resp = web.Response(body=body)
        resp.headers[hdrs.CONTENT_TYPE] = content_type  # keeps its version= and charset=
        return resp


def install_probes(
    app: web.Application, raft: Any, instruments: NodeInstruments | None, *, reveal: bool
) -> NodeInstruments:
    """Add the three routes to ``app``; follow ``raft``'s metrics while the app runs."""
    instruments = instruments or NodeInstruments()
    app[INSTRUMENTS] = instruments
    app.add_routes(Probes(raft, instruments, reveal=reveal).routes())

    async def watch(_: web.Application) -> Any:
        if hasattr(raft, "wait_for"):
            instruments.watch(raft)
        yield
        await instruments.close()

    app.cleanup_ctx.append(watch)
    return instruments
