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

import ctypes
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    from .cluster_helpers import ClusterDriver
except ImportError:
    from cluster_helpers import ClusterDriver  # type: ignore[no-redef]

SUBNET = "10.213.7"  # a private /24 used only inside these namespaces
PROBE_ADDR = f"{SUBNET}.254"
PORT = 21001
PREFIX = "rhnt-"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")

_COUNTER = iter(range(1_000_000))


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


class NetnsCluster(ClusterDriver):
    """Three (or more) node hosts on one bridge, and their ``raft-http node`` processes."""

    start_timeout = 30.0
    call_attempts = 400
    call_request_timeout = 12.0
    log_lines = 40

    def __init__(self, root: Path, node_ids: Iterable[int], extra_args: Sequence[str] = ()) -> None:
        super().__init__(root, extra_args)
        self.ids = list(node_ids)
        base = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}"
        self.bridge_ns = f"{base}-br"
        self.ns = {n: f"{base}-{n}" for n in self.ids}
        self.blackholes: set[tuple[int, int]] = set()
        self._created: list[str] = []

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

    def node_ids(self) -> list[int]:
        return list(self.ids)

    def ip(self, node_id: int) -> str:
        return f"{SUBNET}.{node_id + 1}"

    def addr(self, node_id: int) -> str:
        return f"{self.ip(node_id)}:{PORT}"

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

    def command(self, node_id: int) -> list[str]:
        # `ip netns exec` execs, so the process started (and PR_SET_PDEATHSIG'd) is the node.
        return ["ip", "netns", "exec", self.ns[node_id], *super().command(node_id)]

    def _release(self) -> None:
        """Delete every namespace (the processes in them are dead by now)."""
        for ns in reversed(self._created):
            run_ip("netns", "del", ns, check=False)
        self._created.clear()

    def leftovers(self) -> list[str]:
        mine = {self.bridge_ns, *self.ns.values()}
        return [ns for ns in our_namespaces() if ns in mine]

    # --- the API, from the bridge namespace --------------------------------------

    def http(
        self, method: str, url: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        return ns_http(self.bridge_ns, method, url, body, timeout)
