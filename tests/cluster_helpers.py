"""Start, call and kill ``raft-http node`` processes for multi-process tests.

Every wait is bounded in time and count. Ports are picked below the ephemeral
range so a killed node can get its port back on restart (FIELD-NOTES). Node
processes die with the test process (PR_SET_PDEATHSIG on Linux) and are killed
by ``ClusterDriver.close()`` and at interpreter exit otherwise. ``ClusterDriver``
is the logic every cluster harness shares (``ProcessCluster`` here, ``NetnsCluster``
in netns_helpers.py).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"
T = TypeVar("T")

_LIVE: weakref.WeakSet[ClusterDriver] = weakref.WeakSet()


def _kill_live_clusters() -> None:
    for cluster in list(_LIVE):
        cluster.close()


atexit.register(_kill_live_clusters)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 below the ephemeral range."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for _ in range(1000):
        port = random.randrange(max(1024, low - 20000), low - 1)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports below the ephemeral range")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http(
    method: str,
    url: str,
    body: Any = None,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request, redirects not followed: (status, headers, decoded JSON or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            payload = resp.read()
            return resp.status, dict(resp.headers), json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        payload = e.read()
        try:
            answer = json.loads(payload) if payload else None
        except ValueError:
            answer = payload.decode(errors="replace")
        return e.code, dict(e.headers), answer


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll ``probe`` every 50 ms until it answers something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / 0.05) + 1):
        try:
            value = probe()
        except OSError as e:
            value, last = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last})")


class ClusterDriver(ABC):
    """Start, kill and call the ``raft-http node`` processes of one test, wherever they live.

    The driving logic (following 307s, retrying 503s, agreeing on a leader) is written once
    here; a subclass says only where a node listens, which node ids it has, how one HTTP
    request reaches a node, and (optionally) how to wrap the node's command line.
    """

    start_timeout = 20.0  # how long start()/start_all() wait for a node to serve /metrics
    call_attempts = 200  # requests call() makes (redirects and retries) before giving up
    call_request_timeout = 10.0  # one request of call()
    log_lines = 30  # logs(): lines kept per node

    def __init__(self, root: Path, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.extra_args = list(extra_args)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        _LIVE.add(self)

    # --- what a subclass says ---------------------------------------------------

    @abstractmethod
    def node_ids(self) -> list[int]:
        """Every node this cluster knows (started or not)."""

    @abstractmethod
    def addr(self, node_id: int) -> str:
        """``host:port`` the node listens on (and is told to listen on)."""

    @abstractmethod
    def http(
        self, method: str, url: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        """One request to ``url``, redirects not followed: (status, headers, JSON or None)."""

    def command(self, node_id: int) -> list[str]:
        """The node's argv; a subclass may wrap it (e.g. in ``ip netns exec``)."""
        return [
            sys.executable,
            "-m",
            "raft_http.kv.cli",
            "node",
            "--id",
            str(node_id),
            "--listen",
            self.addr(node_id),
            "--data-dir",
            str(self.root / f"data{node_id}"),
            *self.extra_args,
        ]

    # An optional hook, so empty (not abstract) here.
    def _release(self) -> None:  # noqa: B027
        """Undo whatever else the cluster set up, once its processes are dead."""

    # --- the processes ------------------------------------------------------------

    def url(self, node_id: int, route: str) -> str:
        return f"http://{self.addr(node_id)}{route}"

    def log_path(self, node_id: int) -> Path:
        return self.root / f"node{node_id}.log"

    def start(self, node_id: int, *, wait: bool = True) -> None:
        """Start (or restart) a node on its address and data dir; wait until it serves /metrics."""
        assert node_id not in self.procs or self.procs[node_id].poll() is not None
        with open(self.log_path(node_id), "ab") as log:
            self.procs[node_id] = subprocess.Popen(
                self.command(node_id),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        if wait:
            self._wait_serving(node_id)

    def start_all(self) -> None:
        for node_id in self.node_ids():
            self.start(node_id, wait=False)
        for node_id in self.node_ids():
            self._wait_serving(node_id)

    def _wait_serving(self, node_id: int) -> None:
        wait_for(
            f"node {node_id} to serve /metrics", lambda: self.metrics(node_id), self.start_timeout
        )

    def kill(self, node_id: int) -> None:
        """SIGKILL: no chance to flush or say goodbye."""
        proc = self.procs[node_id]
        proc.kill()
        proc.wait(timeout=10)

    def terminate(self, node_id: int, timeout: float = 15.0) -> int:
        """SIGTERM and the exit code (killed and failed if it does not stop in time)."""
        proc = self.procs[node_id]
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"node {node_id} ignored SIGTERM for {timeout:g}s") from None

    def running(self, node_id: int) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        """Kill every process, then release the rest (see ``_release``); safe to call twice."""
        try:
            for proc in self.procs.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        finally:
            self._release()
            _LIVE.discard(self)

    def logs(self, lines: int | None = None) -> str:
        keep = self.log_lines if lines is None else lines
        out = []
        for node_id in self.node_ids():
            path = self.log_path(node_id)
            if path.exists():
                tail = path.read_bytes().decode(errors="replace").splitlines()[-keep:]
                out.append(f"--- node {node_id} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # --- the API ---------------------------------------------------------------

    def metrics(self, node_id: int) -> dict[str, Any] | None:
        if not self.running(node_id):
            return None
        try:
            status, _, answer = self.http("GET", self.url(node_id, "/metrics"), timeout=5)
        except OSError:
            return None
        metrics: dict[str, Any] | None = answer if status == 200 else None
        return metrics

    def call(self, node_id: int, route: str, body: Any = None, timeout: float = 20.0) -> Any:
        """POST to a node, following 307s and retrying 503s and timeouts until ``timeout``."""
        url = self.url(node_id, route)
        deadline = time.monotonic() + timeout
        for _ in range(self.call_attempts):
            try:
                status, headers, answer = self.http("POST", url, body, self.call_request_timeout)
            except OSError:
                # The leader we were sent to may have just died: start over at the node asked.
                if time.monotonic() > deadline:
                    raise
                url = self.url(node_id, route)
                time.sleep(0.1)
                continue
            if status == 307:
                url = headers["Location"]
                if not url.startswith("http"):
                    url = f"http://{url}"
                continue
            if status == 503 and time.monotonic() < deadline:
                time.sleep(0.1)
                url = self.url(node_id, route)
                continue
            assert status == 200, f"POST {url} {body!r} answered {status}: {answer}"
            return answer
        raise AssertionError(f"POST {route} to node {node_id}: too many redirects or retries")

    def write(self, node_id: int, key: str, value: str, timeout: float = 20.0) -> dict[str, Any]:
        answer: dict[str, Any] = self.call(
            node_id, "/write", {"Set": {"key": key, "value": value}}, timeout
        )
        assert answer["data"] == {"value": value}, answer
        return answer

    def leader(self, among: Iterable[int] | None = None) -> int | None:
        """The leader every running node in ``among`` agrees on and that says it leads."""
        ids = [n for n in (among if among is not None else self.node_ids()) if self.running(n)]
        seen = {n: self.metrics(n) for n in ids}
        if not seen or any(m is None for m in seen.values()):
            return None
        leaders = {m["current_leader"] for m in seen.values() if m is not None}
        if len(leaders) != 1:
            return None
        (leader,) = leaders
        m = seen.get(leader)
        return leader if m is not None and m["state"] == "Leader" else None

    def wait_leader(self, among: Iterable[int] | None = None, timeout: float = 20.0) -> int:
        ids = list(among) if among is not None else None
        return wait_for("a leader all nodes agree on", lambda: self.leader(ids), timeout)

    def applied(self, node_id: int) -> int:
        m = self.metrics(node_id)
        return -1 if not m or m["last_applied"] is None else int(m["last_applied"]["index"])

    def wait_applied(self, node_ids: Iterable[int], index: int, timeout: float = 30.0) -> None:
        for node_id in node_ids:
            wait_for(
                f"node {node_id} to apply index {index}",
                lambda n=node_id: self.applied(n) >= index,
                timeout,
            )


class ProcessCluster(ClusterDriver):
    """Node processes on 127.0.0.1, each with its own port and data dir under ``root``."""

    def __init__(self, root: Path, node_ids: Iterable[int], extra_args: Sequence[str] = ()) -> None:
        super().__init__(root, ["--log-level", "info", *extra_args])
        ids = list(node_ids)
        self.ports = dict(zip(ids, free_ports(len(ids)), strict=True))

    def add_ports(self, node_ids: Iterable[int]) -> None:
        ids = [i for i in node_ids if i not in self.ports]
        taken = set(self.ports.values())
        fresh = [p for p in free_ports(len(ids) + len(taken)) if p not in taken]
        self.ports.update(zip(ids, fresh, strict=False))

    def node_ids(self) -> list[int]:
        return list(self.ports)

    def addr(self, node_id: int) -> str:
        return f"{HOST}:{self.ports[node_id]}"

    def http(
        self, method: str, url: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        return http(method, url, body, timeout)  # the module-level function: 127.0.0.1 is local
