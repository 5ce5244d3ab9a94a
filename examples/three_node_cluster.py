#!/usr/bin/env python3
"""A three-node key-value cluster on 127.0.0.1, driven through its HTTP API.

Starts three ``raft-http node`` processes, initialises the cluster, writes and
reads through every node (following the 307 redirects to the leader), kills the
leader with SIGKILL and shows a new leader with no acknowledged write lost,
writes enough for the leader to snapshot and purge its log, restarts the old
leader and shows it catching up by snapshot, then shuts everything down.

Run it from the repository: ``python examples/three_node_cluster.py``. It exits 0
when every check passed and 1 otherwise; every wait is bounded; every process it
started is killed on exit, failure or SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
SNAPSHOT_LOGS = 50  # the nodes build a snapshot every 50 applied logs ...
KEEP_LOGS = 5  # ... and keep only 5 logs behind it, so a lagging node needs the snapshot
STEP_TIMEOUT = 20.0  # seconds any single wait may take

PROCS: dict[int, subprocess.Popen[bytes]] = {}
TMP = Path(tempfile.mkdtemp(prefix="raft-http-example-"))


class CheckFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- processes ---------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range, so a killed node can get its port back."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for _ in range(500):
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
    raise CheckFailed("could not find free ports below the ephemeral range")


def start_node(node_id: int, port: int) -> None:
    log = open(TMP / f"node{node_id}.log", "ab")  # noqa: SIM115 - the child owns it
    PROCS[node_id] = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raft_http.kv.cli",
            "node",
            "--id",
            str(node_id),
            "--listen",
            f"{HOST}:{port}",
            "--data-dir",
            str(TMP / f"data{node_id}"),
            "--snapshot-logs",
            str(SNAPSHOT_LOGS),
            "--keep-logs",
            str(KEEP_LOGS),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()


def kill_all() -> None:
    for proc in PROCS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    PROCS.clear()


def cleanup() -> None:
    kill_all()
    shutil.rmtree(TMP, ignore_errors=True)


def on_sigterm(signum: int, frame: Any) -> None:
    cleanup()
    sys.exit(128 + signum)


# --- HTTP --------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """One request, no redirect followed: (status, headers, decoded JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        payload = e.read()
        return e.code, dict(e.headers), json.loads(payload) if payload else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def call(port: int, route: str, body: Any = None, method: str = "POST", quiet: bool = False) -> Any:
    """Call a node, following 307s to the leader and retrying a 503 (no leader yet)."""
    url = f"http://{HOST}:{port}{route}"
    deadline = time.monotonic() + STEP_TIMEOUT
    for _ in range(100):
        status, headers, answer = http(method, url, body)
        if status == 307:
            if not quiet:
                print(f"    {url} -> 307 to {headers['Location']}")
            url = headers["Location"]
            continue
        if status == 503 and time.monotonic() < deadline:
            time.sleep(float(headers.get("Retry-After", "1")) / 4)
            continue
        check(status == 200, f"{method} {url} answered {status}: {answer}")
        return answer
    raise CheckFailed(f"{route}: too many redirects or retries")


def metrics(port: int) -> dict[str, Any] | None:
    try:
        status, _, answer = http("GET", f"http://{HOST}:{port}/metrics")
    except OSError:
        return None
    return answer if status == 200 else None


def wait_for(what: str, predicate: Any, timeout: float = STEP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise CheckFailed(f"timed out after {timeout:g}s waiting for {what}")


def leader_among(ports: dict[int, int]) -> int | None:
    """The node every listed node reports as leader, if they agree and it says it leads."""
    seen = {node_id: metrics(port) for node_id, port in ports.items()}
    leaders = {m["current_leader"] if m else None for m in seen.values()}
    if len(leaders) != 1:
        return None
    (leader,) = leaders
    if leader is None or leader not in seen:
        return None
    m = seen[leader]
    return leader if m is not None and m["state"] == "Leader" else None


def applied_index(port: int) -> int:
    m = metrics(port)
    return -1 if not m or m["last_applied"] is None else int(m["last_applied"]["index"])


# --- the journey -------------------------------------------------------------------


def main() -> None:
    ports = dict(zip((1, 2, 3), free_ports(3), strict=True))
    say(f"starting 3 nodes on {HOST} ports {list(ports.values())}, data in {TMP}")
    for node_id, port in ports.items():
        start_node(node_id, port)
    for node_id, port in ports.items():
        wait_for(f"node {node_id} to serve /metrics", lambda p=port: metrics(p))
    say("all nodes up")

    members = [[node_id, f"{HOST}:{port}"] for node_id, port in ports.items()]
    say(f"POST /init {json.dumps(members)} to node 1")
    call(ports[1], "/init", members)
    leader = wait_for("a leader all nodes agree on", lambda: leader_among(ports))
    say(f"node {leader} is the leader")

    acknowledged: dict[str, str] = {}
    for node_id, port in ports.items():
        key, value = f"written-through-{node_id}", f"value-{node_id}"
        answer = call(port, "/write", {"Set": {"key": key, "value": value}})
        check(answer["data"]["value"] == value, f"write answered {answer}")
        acknowledged[key] = value
        say(f"wrote {key}={value} through node {node_id} at log index {answer['log_id']['index']}")
    answer = call(ports[1], "/write", {"Delete": {"key": "written-through-1"}})
    check(answer["data"]["value"] == "value-1", f"delete answered {answer}")
    del acknowledged["written-through-1"]
    say("deleted written-through-1 (the answer carries the removed value)")

    for node_id, port in ports.items():
        for key, value in acknowledged.items():
            got = call(port, "/consistent_read", key)["value"]
            check(got == value, f"consistent_read {key} on node {node_id}: {got!r} != {value!r}")
    target = applied_index(ports[leader])
    for node_id, port in ports.items():
        wait_for(f"node {node_id} to apply {target}", lambda p=port: applied_index(p) >= target)
        got = call(port, "/read", "written-through-2")["value"]
        check(got == "value-2", f"local read on node {node_id} gave {got!r}")
    say("every node reads every write (consistent and local reads)")

    old = leader
    old_metrics = metrics(ports[old])
    check(old_metrics is not None, "no metrics from the leader")
    assert old_metrics is not None
    say(f"killing leader node {old} with SIGKILL (last log index {old_metrics['last_log_index']})")
    PROCS[old].kill()
    PROCS[old].wait(timeout=10)
    survivors = {n: p for n, p in ports.items() if n != old}
    leader = wait_for("a new leader", lambda: leader_among(survivors))
    check(leader != old, "the killed node is still the leader")
    say(f"node {leader} took over")
    for key, value in acknowledged.items():
        got = call(ports[leader], "/consistent_read", key)["value"]
        check(got == value, f"after failover, {key} is {got!r}, not {value!r}")
    say("no acknowledged write lost")

    count = 3 * SNAPSHOT_LOGS
    say(f"writing {count} keys while node {old} is down, to force snapshots and log purges")
    for i in range(count):
        port = survivors[random.choice(list(survivors))]
        key = f"bulk-{i}"
        call(port, "/write", {"Set": {"key": key, "value": str(i)}}, quiet=True)
        acknowledged[key] = str(i)
    lm = wait_for(
        "the leader to purge its log",
        lambda: (m := metrics(ports[leader])) and m["purged"] is not None and m,
    )
    check(lm["snapshot"] is not None, "the leader has purged logs but reports no snapshot")
    purged = lm["purged"]["index"]
    check(
        purged > old_metrics["last_log_index"],
        f"the leader still holds the logs node {old} lacks (purged {purged})",
    )
    say(
        f"leader snapshot at index {lm['snapshot']['index']}, log purged up to {purged} > "
        f"node {old}'s last log {old_metrics['last_log_index']}: only a snapshot can catch it up"
    )

    say(f"restarting node {old} on its port and data dir")
    start_node(old, ports[old])
    target = applied_index(ports[leader])
    wait_for(
        f"node {old} to catch up to index {target}",
        lambda: applied_index(ports[old]) >= target,
        timeout=3 * STEP_TIMEOUT,
    )
    rm = metrics(ports[old])
    check(rm is not None and rm["snapshot"] is not None, f"node {old} reports no snapshot")
    assert rm is not None
    say(
        f"node {old} caught up: applied {rm['last_applied']['index']}, "
        f"snapshot at {rm['snapshot']['index']}, following leader {rm['current_leader']}"
    )
    for key in ("written-through-2", "written-through-3", f"bulk-{count - 1}"):
        got = call(ports[old], "/read", key)["value"]
        check(got == acknowledged[key], f"node {old} local read {key}: {got!r}")
    for node_id, port in ports.items():
        got = call(port, "/consistent_read", "bulk-0")["value"]
        check(got == "0", f"node {node_id}: bulk-0 is {got!r}")
    say(f"node {old} serves every write, old and new")

    say("shutting down with SIGTERM")
    for proc in PROCS.values():
        proc.send_signal(signal.SIGTERM)
    for node_id, proc in PROCS.items():
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"node {node_id} did not stop within 15 s of SIGTERM") from None
        check(code == 0, f"node {node_id} exited with {code}")
    say("all nodes stopped cleanly; every check passed")


def print_logs() -> None:
    for path in sorted(TMP.glob("node*.log")):
        lines = path.read_text(errors="replace").splitlines()
        print(f"--- last lines of {path.name} ---", file=sys.stderr)
        print("\n".join(lines[-25:]), file=sys.stderr)


if __name__ == "__main__":
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_sigterm)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        main()
    except (CheckFailed, OSError, KeyError, TypeError, subprocess.SubprocessError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        print_logs()
        sys.exit(1)
