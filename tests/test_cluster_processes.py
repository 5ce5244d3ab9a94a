"""Whole clusters of ``raft-http node`` processes over real HTTP on 127.0.0.1.

Election, replication, failover after SIGKILL, restart and catch-up by snapshot,
membership changes from 3 to 5 voters and back, clean SIGTERM shutdown, and the
example script end to end. Every wait polls metrics with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .cluster_helpers import ProcessCluster, free_ports, http, wait_for
except ImportError:
    from cluster_helpers import (  # type: ignore[no-redef]
        ProcessCluster,
        free_ports,
        http,
        wait_for,
    )

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_ARGS = ["--snapshot-logs", "30", "--keep-logs", "3"]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., ProcessCluster]]:
    made: list[ProcessCluster] = []

    def make(node_ids: list[int], extra_args: list[str] | None = None) -> ProcessCluster:
        cluster = ProcessCluster(tmp_path, node_ids, extra_args or SNAPSHOT_ARGS)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
        print(cluster.logs())  # shown by pytest when the test failed


def _voters(metrics: dict[str, Any]) -> list[list[int]]:
    return [sorted(c) for c in metrics["membership_config"]["membership"]["configs"]]


def _nodes(metrics: dict[str, Any]) -> set[int]:
    return {int(n) for n in metrics["membership_config"]["membership"]["nodes"]}


def test_failover_and_catch_up_by_snapshot(make_cluster: Callable[..., ProcessCluster]) -> None:
    cluster = make_cluster([1, 2, 3])
    cluster.start_all()
    members = [[n, cluster.addr(n)] for n in (1, 2, 3)]
    cluster.call(2, "/init", members)
    leader = cluster.wait_leader()

    # Writes sent to any node reach the leader (307) and are answered once applied.
    acknowledged: dict[str, str] = {}
    for n in (1, 2, 3):
        cluster.write(n, f"k{n}", f"v{n}")
        acknowledged[f"k{n}"] = f"v{n}"
    for n in (1, 2, 3):
        assert cluster.call(n, "/consistent_read", "k1") == {"value": "v1"}
    cluster.wait_applied((1, 2, 3), cluster.applied(leader))
    for n in (1, 2, 3):
        assert cluster.call(n, "/read", "k3") == {"value": "v3"}

    # A second /init is refused: the cluster is initialized already.
    status, _, answer = http("POST", cluster.url(leader, "/init"), members)
    assert status == 409, answer
    assert answer["error"]["kind"] == "not_allowed"

    old = leader
    old_last_log = cluster.metrics(old)["last_log_index"]  # type: ignore[index]
    cluster.kill(old)
    survivors = [n for n in (1, 2, 3) if n != old]
    leader = cluster.wait_leader(survivors)
    assert leader != old
    for key, value in acknowledged.items():
        assert cluster.call(leader, "/consistent_read", key) == {"value": value}

    # Enough writes for the leader to snapshot and purge what the dead node lacks.
    for i in range(100):
        key = f"bulk{i}"
        cluster.write(survivors[i % 2], key, str(i))
        acknowledged[key] = str(i)
    lm = wait_for(
        "the leader to purge past the dead node's log",
        lambda: (
            (m := cluster.metrics(leader))
            and m["purged"] is not None
            and m["purged"]["index"] > old_last_log
            and m
        ),
    )
    assert lm["snapshot"] is not None

    cluster.start(old)
    cluster.wait_applied([old], cluster.applied(leader), timeout=40)
    rm = cluster.metrics(old)
    assert rm is not None
    assert rm["snapshot"] is not None
    assert rm["current_leader"] == leader
    for key in ("k1", "k2", "bulk0", "bulk50", "bulk99"):
        assert cluster.call(old, "/read", key) == {"value": acknowledged[key]}

    for n in (1, 2, 3):
        assert cluster.terminate(n) == 0


def test_membership_from_three_to_five_and_back(
    make_cluster: Callable[..., ProcessCluster],
) -> None:
    cluster = make_cluster([1, 2, 3, 4, 5], ["--snapshot-logs", "1000"])
    for n in (1, 2, 3):
        cluster.start(n, wait=False)
    cluster.call(1, "/init", [[n, cluster.addr(n)] for n in (1, 2, 3)], timeout=30)
    leader = cluster.wait_leader([1, 2, 3])
    cluster.write(leader, "before", "1")

    for n in (4, 5):
        cluster.start(n)
        cluster.call(1, "/add-learner", [n, cluster.addr(n)])
    m = wait_for(
        "learners 4 and 5 in the membership",
        lambda: (m := cluster.metrics(leader)) and _nodes(m) == {1, 2, 3, 4, 5} and m,
    )
    assert _voters(m) == [[1, 2, 3]]
    # A learner replicates but does not vote.
    cluster.wait_applied([4, 5], cluster.applied(leader))
    assert cluster.call(4, "/read", "before") == {"value": "1"}

    cluster.call(2, "/change-membership", [1, 2, 3, 4, 5])
    for n in (1, 2, 3, 4, 5):
        wait_for(
            f"node {n} to see five voters",
            lambda n=n: (m := cluster.metrics(n)) and _voters(m) == [[1, 2, 3, 4, 5]],
        )
    cluster.write(5, "five", "5")
    leader = cluster.wait_leader()
    cluster.wait_applied((1, 2, 3, 4, 5), cluster.applied(leader))

    cluster.call(4, "/change-membership", [1, 2, 3])
    leader = cluster.wait_leader([1, 2, 3])
    m = wait_for(
        "the leader to drop nodes 4 and 5",
        lambda: (m := cluster.metrics(leader)) and _voters(m) == [[1, 2, 3]] and m,
    )
    assert _nodes(m) == {1, 2, 3}
    cluster.write(1, "after", "3")
    for n in (1, 2, 3):
        assert cluster.call(n, "/consistent_read", "five") == {"value": "5"}
        assert cluster.call(n, "/consistent_read", "after") == {"value": "3"}
    for n in (1, 2, 3, 4, 5):
        assert cluster.terminate(n) == 0


def test_sigterm_on_the_leader_hands_leadership_over_under_writes(
    make_cluster: Callable[..., ProcessCluster],
) -> None:
    cluster = make_cluster([1, 2, 3])
    cluster.start_all()
    cluster.call(1, "/init", [[n, cluster.addr(n)] for n in (1, 2, 3)])
    cluster.wait_leader()
    acked: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def write_steadily() -> None:
        try:
            i = 0
            for _ in range(5000):
                if stop.is_set():
                    return
                via = next(n for n in (1, 2, 3) if cluster.running(n))
                try:
                    cluster.write(via, f"k{i}", str(i), timeout=5)
                except OSError:  # ``via`` stopped under us: the same (idempotent) Set elsewhere
                    continue
                acked.append(i)
                i += 1
        except BaseException as e:  # reported by the test thread
            failures.append(e)

    writer = threading.Thread(target=write_steadily, daemon=True)
    writer.start()
    try:
        wait_for("writes before the stop", lambda: len(acked) >= 20 or failures)
        leader = cluster.wait_leader()
        term = cluster.metrics(leader)["current_term"]  # type: ignore[index]
        assert cluster.terminate(leader) == 0
        before = len(acked)
        wait_for("writes after the stop", lambda: len(acked) >= before + 20 or failures)
    finally:
        stop.set()
        writer.join(30)
    assert not failures, failures
    handed = re.search(r"handed leadership to node (\d)", cluster.log_path(leader).read_text())
    assert handed, "the leader stopped without handing over"
    new = int(handed.group(1))
    # Elected in the very next term by the transfer (no pre-vote round, no lease wait),
    # not by an election after the old leader's heartbeats stopped.
    log = cluster.log_path(new).read_text()
    assert f"starts election for term {term + 1} (leadership transfer)" in log
    assert f"node {new} is leader of term {term + 1}" in log
    now = cluster.wait_leader([n for n in (1, 2, 3) if n != leader])
    for i in acked[:: max(1, len(acked) // 20)] + acked[-3:]:
        assert cluster.call(now, "/consistent_read", f"k{i}") == {"value": str(i)}


def test_the_in_memory_log_bound_option_bounds_what_metrics_show_held(
    make_cluster: Callable[..., ProcessCluster],
) -> None:
    bound = 4096
    cluster = make_cluster([1], ["--max-in-memory-log-bytes", "4KiB"])
    cluster.start_all()
    cluster.call(1, "/init", [[1, cluster.addr(1)]])
    cluster.wait_leader()
    held = []
    for i in range(12):  # 12 KB; the default bound (16 MiB) would keep every write in memory
        cluster.write(1, f"k{i}", "v" * 1000)  # answered once applied: then evictable
        m = cluster.metrics(1)
        assert m is not None
        held.append((m["in_memory_log_bytes"], m["in_memory_log_entries"]))
    sizes = [size for size, _ in held]
    assert 1000 < sizes[0] < sizes[1] < sizes[2], held  # it grows with the writes ...
    assert max(sizes) <= bound, held  # ... up to the bound, then the oldest leave memory
    assert held[-1][1] <= bound // 1000 < m["last_log_index"], held
    assert m["purged"] is None  # no snapshot yet: eviction, not a purge, let them go
    assert cluster.call(1, "/consistent_read", "k0") == {"value": "v" * 1000}


def test_example_script_passes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "three_node_cluster.py")],
        capture_output=True,
        text=True,
        timeout=100,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every check passed" in proc.stdout
    assert "caught up" in proc.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_script_passes(tmp_path: Path) -> None:
    """examples/test-cluster.sh: the same journey with curl alone."""
    base = _consecutive_free_ports(3)
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "BASE_PORT": str(base),
        "RAFT_HTTP": f"{sys.executable} -m raft_http.kv.cli",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "test-cluster.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "acknowledged writes survived" in proc.stdout
    assert "=== all good" in proc.stdout


def _consecutive_free_ports(count: int) -> int:
    """A base port such that ``base .. base+count-1`` are free (below the ephemeral range)."""
    for _ in range(200):
        base = free_ports(1)[0]
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raft_http.kv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_help_and_bad_arguments() -> None:
    helped = _cli("node", "--help")
    assert helped.returncode == 0
    for option in (
        "--listen",
        "--data-dir",
        "--snapshot-logs",
        "--max-in-memory-log-bytes",
        "--tls-cert",
        "--token",
    ):
        assert option in helped.stdout
    bad = _cli("node", "--id", "1", "--listen", "no-port", "--data-dir", "x")
    assert bad.returncode == 2
    assert "HOST:PORT" in bad.stderr
    half_tls = _cli(
        "node", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", "x", "--tls-cert", "c"
    )
    assert half_tls.returncode != 0
    assert "--tls-key" in half_tls.stderr


def test_cli_port_in_use_exits_1(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = _cli(
            "node", "--id", "1", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)
        )
    assert proc.returncode == 1, proc.stderr
    assert "cannot run node 1" in proc.stderr
