"""Give each ``raft-http node`` process its own host: a network namespace per node.

Layout of one run (names carry the test process's pid, so runs never collide)::

    rhnt-<pid>-<n>-br   the bridge namespace: bridge ``br0`` at 10.213.7.254/24, and the
                        bridge-side ends ``v1``, ``v2`` ... of every node's veth pair
    rhnt-<pid>-<n>-1    node 1's host: ``lo`` and ``eth0`` at 10.213.7.2/24
    rhnt-<pid>-<n>-2    node 2's host: ``eth0`` at 10.213.7.3/24 ...

Nothing is created in, or changed in, the root namespace: the veth pair is created inside
the node's namespace with its peer end moved straight into the bridge namespace. Deleting
the namespaces (after every process in them is killed) removes the veths and the bridge.

The test process reaches the nodes from the bridge namespace without a helper process:
``ns_socket`` creates a socket in a short-lived thread that entered the bridge namespace
with ``setns(2)`` (a socket belongs to the namespace it was created in, whichever thread
uses it later). The partition routes live in the node namespaces and name peers' /32s
only, so the probes from 10.213.7.254 always get through.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    from .cluster_helpers import _die_with_parent, wait_for
except ImportError:
    from cluster_helpers import _die_with_parent, wait_for  # type: ignore[no-redef]

SUBNET = "10.213.7"  # a private /24 used only inside these namespaces
PROBE_ADDR = f"{SUBNET}.254"
PORT = 21001
PREFIX = "rhnt-"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_LIVE: weakref.WeakSet[NetnsCluster] = weakref.WeakSet()
_COUNTER = iter(range(1_000_000))


def _close_live() -> None:
    for cluster in list(_LIVE):
        cluster.close()


atexit.register(_close_live)


def run_ip(
    *args: str, ns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``ip [-n ns] args...`` with a bound on its run time."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def our_namespaces() -> list[str]:
    """Every namespace a run of this harness created (any pid) that still exists."""
    listed = run_ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(PREFIX)]


def remove_stale_namespaces() -> None:
    """Delete namespaces left behind by runs whose process is gone (e.g. SIGKILLed pytest)."""
    for name in our_namespaces():
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            run_ip("netns", "del", name, check=False)


def netns_unsupported() -> str | None:
    """Why these tests cannot run here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = run_ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        gone = run_ip("netns", "del", probe, check=False)
        if gone.returncode != 0:
            return f"cannot delete a network namespace: {gone.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot use `ip netns`: {e}"
    return None


def tc_tbf_unsupported() -> str | None:
    if shutil.which("tc") is None:
        return "tc is not installed"
    return None


def ns_socket(ns: str) -> socket.socket:
    """A TCP socket that belongs to namespace ``ns`` (created in a thread that entered it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as e:  # handed to the caller
            out.append(e)

    # The thread exits at once, so it holds no reference to the namespace afterwards.
    worker = threading.Thread(target=enter_and_create, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if not out:
        raise OSError(f"could not create a socket in namespace {ns}")
    result = out[0]
    if isinstance(result, BaseException):
        raise result
    return result


class _NsConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        sock = ns_socket(self._ns)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def ns_http(
    ns: str, method: str, url: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], Any]:
    """One request from inside ``ns``, redirects not followed: (status, headers, JSON or None)."""
    parts = urllib.parse.urlsplit(url)
    conn = _NsConnection(ns, parts.hostname or "", parts.port or 80, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, parts.path or "/", body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            answer = json.loads(payload) if payload else None
        except ValueError:
            answer = payload.decode(errors="replace")
        return resp.status, dict(resp.getheaders()), answer
    finally:
        conn.close()


class NetnsCluster:
    """Three (or more) node hosts on one bridge, and their ``raft-http node`` processes."""

    def __init__(self, root: Path, node_ids: Iterable[int], extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.ids = list(node_ids)
        self.extra_args = list(extra_args)
        base = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}"
        self.bridge_ns = f"{base}-br"
        self.ns = {n: f"{base}-{n}" for n in self.ids}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.blackholes: set[tuple[int, int]] = set()
        self._created: list[str] = []
        _LIVE.add(self)

    # --- the hosts ----------------------------------------------------------------

    def build(self) -> None:
        """Create the bridge namespace and one host namespace per node (undone by close())."""
        run_ip("netns", "add", self.bridge_ns)
        self._created.append(self.bridge_ns)
        br = self.bridge_ns
        run_ip("link", "set", "lo", "up", ns=br)
        run_ip("link", "add", "br0", "type", "bridge", ns=br)
        run_ip("addr", "add", f"{PROBE_ADDR}/24", "dev", "br0", ns=br)
        run_ip("link", "set", "br0", "up", ns=br)
        for n in self.ids:
            ns = self.ns[n]
            run_ip("netns", "add", ns)
            self._created.append(ns)
            veth = f"v{n}"
            run_ip("link", "add", "eth0", "type", "veth", "peer", "name", veth, "netns", br, ns=ns)
            run_ip("link", "set", veth, "master", "br0", ns=br)
            run_ip("link", "set", veth, "up", ns=br)
            run_ip("link", "set", "lo", "up", ns=ns)
            run_ip("addr", "add", f"{self.ip(n)}/24", "dev", "eth0", ns=ns)
            run_ip("link", "set", "eth0", "up", ns=ns)

    def ip(self, node_id: int) -> str:
        return f"{SUBNET}.{node_id + 1}"

    def addr(self, node_id: int) -> str:
        return f"{self.ip(node_id)}:{PORT}"

    def url(self, node_id: int, route: str) -> str:
        return f"http://{self.addr(node_id)}{route}"

    def blackhole(self, src: int, dst: int) -> None:
        """Drop everything ``src``'s host sends to ``dst`` (one direction)."""
        run_ip("route", "add", "blackhole", f"{self.ip(dst)}/32", ns=self.ns[src])
        self.blackholes.add((src, dst))

    def heal(self) -> None:
        for src, dst in sorted(self.blackholes):
            run_ip("route", "del", "blackhole", f"{self.ip(dst)}/32", ns=self.ns[src])
        self.blackholes.clear()

    def tc(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``tc`` inside the bridge namespace (where the bridge-side veth ends live)."""
        cmd = ["ip", "netns", "exec", self.bridge_ns, "tc", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc

    # --- the processes ------------------------------------------------------------

    def log_path(self, node_id: int) -> Path:
        return self.root / f"node{node_id}.log"

    def start(self, node_id: int, *, wait: bool = True) -> None:
        assert node_id not in self.procs or self.procs[node_id].poll() is not None
        with open(self.log_path(node_id), "ab") as log:
            self.procs[node_id] = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns[node_id],
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
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # `ip netns exec` execs, so this is the node
            )
        if wait:
            wait_for(f"node {node_id} to serve /metrics", lambda: self.metrics(node_id), 30)

    def start_all(self) -> None:
        for n in self.ids:
            self.start(n, wait=False)
        for n in self.ids:
            wait_for(f"node {n} to serve /metrics", lambda n=n: self.metrics(n), 30)

    def running(self, node_id: int) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        """Kill every process, then delete every namespace; safe to call twice."""
        try:
            for proc in self.procs.values():
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGKILL)
            for proc in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        finally:
            for ns in reversed(self._created):
                run_ip("netns", "del", ns, check=False)
            self._created.clear()
            _LIVE.discard(self)

    def leftovers(self) -> list[str]:
        mine = {self.bridge_ns, *self.ns.values()}
        return [ns for ns in our_namespaces() if ns in mine]

    def logs(self, lines: int = 40) -> str:
        out = []
        for n in self.ids:
            path = self.log_path(n)
            if path.exists():
                tail = path.read_bytes().decode(errors="replace").splitlines()[-lines:]
                out.append(f"--- node {n} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # --- the API, from the bridge namespace --------------------------------------

    def http(
        self, method: str, url: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        return ns_http(self.bridge_ns, method, url, body, timeout)

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
        for _ in range(400):
            try:
                status, headers, answer = self.http("POST", url, body, timeout=12)
            except OSError:
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
        """The leader every node in ``among`` agrees on and that says it leads."""
        ids = [n for n in (among if among is not None else self.ids) if self.running(n)]
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
        leader: int = wait_for("a leader all nodes agree on", lambda: self.leader(ids), timeout)
        return leader

    def applied(self, node_id: int) -> int:
        m = self.metrics(node_id)
        if not m or m["last_applied"] is None:
            return -1
        index: int = m["last_applied"]["index"]
        return index
