"""``KVClient``: talk to a key-value cluster from an application (after Openraft's ExampleClient).

It follows the leader: a ``307`` (or an error naming ``leader_addr``) moves it to the leader,
which it remembers for the next call. It retries only what is safe to retry:

- anything refused before it was sent (connection refused, DNS), on the next known address;
- ``503 no_leader`` / ``not_initialized`` / ``quorum_not_enough`` / ``write_aborted`` /
  ``overloaded`` / ``transfer_failed`` (the write was NOT applied) after ``Retry-After``;
- reads and the idempotent membership calls, also after a timeout or a dropped answer.

A write whose outcome is unknown (``timeout``, ``write_outcome_unknown``, a connection lost
after sending) is NOT retried: ``KVOutcomeUnknown`` tells the caller to re-read first.

The API token comes from ``token=``, else ``$RAFT_HTTP_API_TOKEN``, else ``$RAFT_HTTP_TOKEN``
(a node without ``--api-token`` requires its Raft token on the API).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as ssl_module
import time
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
import msgspec
from msgspec import Struct

from ..types import LogId, encode_json
from .api import base_url

TOKEN_ENV: Final = "RAFT_HTTP_API_TOKEN"
"""The environment variable ``KVClient`` and ``raft-http`` read the API token from."""
RAFT_TOKEN_ENV: Final = "RAFT_HTTP_TOKEN"
"""Read when ``TOKEN_ENV`` is unset: a node's API token defaults to its Raft token."""

_RETRY_LATER: Final = frozenset(
    {
        "no_leader",
        "not_initialized",
        "quorum_not_enough",
        "write_aborted",
        "overloaded",
        "transfer_failed",
    }
)
"""503 kinds after which nothing was done: any request may be sent again."""


class KVError(Exception):
    """Root of what ``KVClient`` raises; ``kind`` is the node's error kind when it sent one."""

    def __init__(self, message: str, kind: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class KVUnreachable(KVError):
    """No node answered (refused, timed out or unknown host): check the address, or the node."""


class KVRefused(KVError):
    """The cluster answered and refused (4xx, 409): sending the same again will not help."""


class KVUnavailable(KVError):
    """The cluster answered but could not serve in time (503 after every retry): retry later."""


class KVOutcomeUnknown(KVUnavailable):
    """A write was sent but its outcome is unknown: it may be applied; read before retrying."""


class WriteResult(Struct, frozen=True):
    """A write's answer: where it is in the log, and the state machine's answer."""

    log_id: LogId | None
    data: Any


class MemberStatus(Struct, frozen=True):
    """One member as ``raft-http status`` shows it; the numbers are None when unreachable."""

    id: int
    addr: str
    voter: bool
    reachable: bool
    role: str | None = None
    term: int | None = None
    leader: int | None = None
    last_log: int | None = None
    committed: int | None = None
    applied: int | None = None
    lag: int | None = None
    error: str | None = None


class ClusterStatus(Struct, frozen=True):
    """The whole cluster as seen from one address: its members and the leader they name."""

    leader: int | None
    term: int | None
    members: list[MemberStatus]


def _index(log_id: Any) -> int | None:
    return None if log_id is None else int(log_id["index"])


def _error_of(status: int, payload: Any) -> tuple[str, str, dict[str, Any]]:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        detail = payload["error"]
        return str(detail.get("kind", "error")), str(detail.get("message", "")), detail
    return "http_error", f"HTTP {status}: {str(payload)[:200]}", {}


class KVClient:
    """An async client for a ``raft-http node`` cluster; ``async with KVClient([...]) as c:``.

    ``addrs`` are any members' addresses (``host:port`` or URLs); the client tries them in
    turn and keeps the leader it learns. ``deadline`` bounds each call, retries included;
    ``unreachable_rounds`` (default: until the deadline) gives up sooner, once every address
    was unreachable that many times in a row.
    """

    def __init__(
        self,
        addrs: str | Sequence[str],
        *,
        token: str | None = None,
        ssl: ssl_module.SSLContext | bool | None = None,
        deadline: float = 10.0,
        request_timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
        unreachable_rounds: int | None = None,
    ) -> None:
        seeds = [addrs] if isinstance(addrs, str) else list(addrs)
        if not seeds:
            raise ValueError("KVClient needs at least one node address")
        scheme = "https" if isinstance(ssl, ssl_module.SSLContext) else "http"
        self.urls = [base_url(a, scheme) for a in seeds]
        self.scheme = scheme
        self.token = token or os.environ.get(TOKEN_ENV) or os.environ.get(RAFT_TOKEN_ENV) or None
        self.ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl
        self.deadline = deadline
        self.request_timeout = request_timeout
        self.unreachable_rounds = unreachable_rounds
        self._borrowed = session
        self._session: aiohttp.ClientSession | None = None
        self.leader_url: str | None = None

    async def __aenter__(self) -> KVClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._borrowed is not None:
            return self._borrowed
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _headers(self, body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def request_once(
        self, method: str, url: str, body: Any = None
    ) -> tuple[int, dict[str, str], Any]:
        """One request, no redirect followed: (status, headers, decoded JSON or text).

        Raises ``aiohttp.ClientConnectorError`` (not sent) or another ``aiohttp.ClientError``
        / ``TimeoutError`` (maybe sent).
        """
        data = None if body is None else encode_json(body)
        async with (
            asyncio.timeout(self.request_timeout),
            self.session().request(
                method,
                url,
                data=data,
                headers=self._headers(data is not None),
                allow_redirects=False,
                ssl=self.ssl,
            ) as resp,
        ):
            raw = await resp.read()
            payload: Any
            try:
                payload = msgspec.json.decode(raw) if raw else None
            except msgspec.DecodeError:
                payload = raw.decode(errors="replace")
            return resp.status, dict(resp.headers), payload

    async def call(
        self, method: str, route: str, body: Any = None, *, idempotent: bool, leader: bool = True
    ) -> Any:
        """Send ``route`` to the leader (or, ``leader=False``, the first node that answers).

        Follows 307s, moves on past unreachable nodes, retries what is safe (see the module's
        docstring) until ``deadline``; answers the decoded 200 body or raises ``KVError``.
        """
        deadline = time.monotonic() + self.deadline
        candidates = self._candidates(leader)
        url = candidates.pop(0)
        last: KVError | None = None
        unreachable = 0
        for _ in range(1000):
            if time.monotonic() > deadline:
                break
            try:
                status, headers, payload = await self.request_once(method, url + route, body)
            except (aiohttp.ClientError, TimeoutError) as e:
                # Refused before sending is always safe to retry; anything later only if
                # the request is idempotent.
                sent = not isinstance(e, aiohttp.ClientConnectorError)
                if sent and not idempotent:
                    raise KVOutcomeUnknown(
                        f"{method} {url}{route}: {_reason(e)}; the write may still be applied",
                        "outcome_unknown",
                    ) from None
                last = _unreachable(url, e)
                unreachable += url in self.urls  # a dead leader we were sent to: no
                if self._given_up(unreachable):
                    raise last from None
                if url == self.leader_url:
                    self.leader_url = None
                url = await self._next(candidates, leader, deadline)
                continue
            unreachable = 0
            if status == 200:
                if leader:
                    self.leader_url = url
                return payload
            kind, message, detail = _error_of(status, payload)
            if status == 307:
                target = detail.get("leader_addr")
                location = headers.get("Location", "")
                if target or location.endswith(route):
                    url = base_url(target, self.scheme) if target else location[: -len(route)]
                    self.leader_url = url
                    continue
                kind = "no_leader"  # a redirect to nowhere: ask again shortly
            if status in (307, 503):
                if kind not in _RETRY_LATER and not (idempotent and kind != "fatal"):
                    unknown = kind in ("timeout", "write_outcome_unknown")
                    raise (KVOutcomeUnknown if unknown else KVUnavailable)(message, kind, status)
                last = KVUnavailable(message, kind, status)
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                if kind in ("no_leader", "not_initialized", "fatal"):
                    url = await self._next(candidates, leader, deadline)
                continue
            raise KVRefused(message or f"HTTP {status}", kind, status)
        raise last or KVUnavailable(f"no answer within {self.deadline:g}s", "timeout")

    def _given_up(self, unreachable: int) -> bool:
        rounds = self.unreachable_rounds
        return rounds is not None and unreachable >= rounds * len(self.urls)

    def _candidates(self, leader: bool) -> list[str]:
        urls = list(self.urls)
        if leader and self.leader_url is not None:
            urls = [self.leader_url, *(u for u in urls if u != self.leader_url)]
        return urls

    async def _next(self, candidates: list[str], leader: bool, deadline: float) -> str:
        """The next address to try; after a full round, pause a little and start over."""
        if not candidates:
            candidates.extend(self._candidates(leader))
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return candidates.pop(0)

    # --- the application's calls ----------------------------------------------------------

    async def put(self, key: str, value: str) -> WriteResult:
        """Set ``key`` to ``value`` once committed and applied (not retried if unknown)."""
        return await self.write({"Set": {"key": key, "value": value}})

    async def delete(self, key: str) -> WriteResult:
        """Delete ``key``; the answer's ``data`` holds the value removed (or None)."""
        return await self.write({"Delete": {"key": key}})

    async def write(self, command: Any) -> WriteResult:
        payload = await self.call("POST", "/write", command, idempotent=False)
        return msgspec.convert(payload, WriteResult)

    async def get(self, key: str, *, stale: bool = False) -> str | None:
        """Linearizable by default (confirmed by the leader's quorum); ``stale``: any one node."""
        route = "/read" if stale else "/consistent_read"
        payload = await self.call("POST", route, key, idempotent=True, leader=not stale)
        value = payload.get("value") if isinstance(payload, dict) else None
        return None if value is None else str(value)

    async def init(self, members: dict[int, str] | None = None) -> Any:
        """Initialize the cluster at the first address (``None``: that node alone)."""
        body = [] if not members else [[i, a] for i, a in sorted(members.items())]
        return await self.call("POST", "/init", body, idempotent=False, leader=False)

    async def add_learner(self, node_id: int, addr: str) -> WriteResult:
        payload = await self.call("POST", "/add-learner", [node_id, addr], idempotent=True)
        return msgspec.convert(payload, WriteResult)

    async def remove_learner(self, *node_ids: int) -> WriteResult:
        """Remove learners (a voter must first leave the voters by ``change_membership``)."""
        body = sorted(set(node_ids))
        payload = await self.call("POST", "/remove-learner", body, idempotent=True)
        return msgspec.convert(payload, WriteResult)

    async def transfer_leader(self, to: int | None = None) -> int:
        """Hand leadership to voter ``to`` (None: the most up-to-date); answers the new leader."""
        body = msgspec.Raw(b"null") if to is None else to  # a JSON null body, not no body
        payload = await self.call("POST", "/transfer-leader", body, idempotent=True)
        self.leader_url = None  # it moved
        return int(payload["leader_id"])

    async def change_membership(self, voters: Sequence[int]) -> WriteResult:
        payload = await self.call(
            "POST", "/change-membership", sorted(set(voters)), idempotent=True
        )
        return msgspec.convert(payload, WriteResult)

    async def metrics(self, addr: str | None = None) -> dict[str, Any]:
        """One node's JSON metrics: ``addr``'s, or the first address that answers."""
        if addr is None:
            answer: dict[str, Any] = await self.call(
                "GET", "/metrics", idempotent=True, leader=False
            )
            return answer
        url = base_url(addr, self.scheme)
        try:
            status, _, payload = await self.request_once("GET", url + "/metrics")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _unreachable(url, e) from None
        if status != 200 or not isinstance(payload, dict):
            kind, message, _ = _error_of(status, payload)
            raise KVRefused(message, kind, status)
        return payload

    async def cluster_status(self) -> ClusterStatus:
        """Every member, found from the first address that answers, each asked in parallel."""
        first = await self.metrics()
        nodes: dict[str, Any] = first["membership_config"]["membership"]["nodes"]
        voters = {
            n for config in first["membership_config"]["membership"]["configs"] for n in config
        }
        ids = sorted(int(i) for i in nodes)

        async def ask(node_id: int) -> tuple[int, dict[str, Any] | str]:
            if node_id == first["id"]:
                return node_id, first
            try:
                return node_id, await self.metrics(nodes[str(node_id)]["addr"])
            except KVError as e:
                return node_id, str(e)

        seen = dict(await asyncio.gather(*(ask(i) for i in ids)))
        if first["id"] not in seen:  # a node not (yet) in its own membership
            seen[first["id"]] = first
        leaders = [m for m in seen.values() if isinstance(m, dict) and m["state"] == "Leader"]
        leader = max(leaders, key=lambda m: int(m["current_term"]), default=None)
        members = []
        for node_id, m in sorted(seen.items()):
            addr = nodes.get(str(node_id), {}).get("addr") or "(not a member)"
            if isinstance(m, str):
                members.append(MemberStatus(node_id, addr, node_id in voters, False, error=m))
                continue
            members.append(
                MemberStatus(
                    node_id,
                    addr,
                    node_id in voters,
                    True,
                    role=str(m["state"]),
                    term=int(m["current_term"]),
                    leader=m["current_leader"],
                    last_log=int(m["last_log_index"]),
                    committed=_index(m["committed"]),
                    applied=_index(m["last_applied"]),
                    lag=_lag(leader, node_id, m),
                    error=m.get("fatal"),
                )
            )
        return ClusterStatus(
            leader=None if leader is None else int(leader["id"]),
            term=None if leader is None else int(leader["current_term"]),
            members=members,
        )


def _lag(leader: dict[str, Any] | None, node_id: int, metrics: dict[str, Any]) -> int | None:
    """How many entries ``node_id`` is behind the leader's log (by the leader's own count)."""
    if leader is None:
        return None
    last = int(leader["last_log_index"])
    if node_id == leader["id"]:
        applied = _index(metrics["last_applied"])
        return 0 if applied is None else max(0, last - applied)
    replication = leader.get("replication") or {}
    if str(node_id) in replication:
        matched = _index(replication[str(node_id)])
        return last - (matched or 0)
    return None


def _unreachable(url: str, e: BaseException) -> KVUnreachable:
    if isinstance(e, aiohttp.ClientConnectorError):
        return KVUnreachable(f"cannot connect to {url}: {_reason(e)}", "unreachable")
    return KVUnreachable(f"{url}: {_reason(e)}", "unreachable")


def _reason(e: BaseException) -> str:
    """The one line an operator needs: the innermost OS error, without the traceback."""
    if isinstance(e, TimeoutError):
        return "no answer in time"
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, OSError):
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused (is the node running?)"
        if isinstance(os_error, socket.gaierror):
            return f"cannot resolve the host: {os_error.strerror}"
        return os_error.strerror or str(os_error)
    return str(e) or type(e).__name__
