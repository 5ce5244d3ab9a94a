"""Partitions over a real network: each node is its own host (a network namespace).

Needs root and iproute2; skipped otherwise. See docs/fault-testing.md for the layout,
how to run it and the figures observed. Timings are printed (``pytest -s``), never
asserted: every wait only has a generous deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from .cluster_helpers import wait_for
    from .netns_helpers import (
        NetnsCluster,
        netns_unsupported,
        our_namespaces,
        remove_stale_namespaces,
        tc_tbf_unsupported,
    )
except ImportError:
    from cluster_helpers import wait_for  # type: ignore[no-redef]
    from netns_helpers import (  # type: ignore[no-redef]
        NetnsCluster,
        netns_unsupported,
        our_namespaces,
        remove_stale_namespaces,
        tc_tbf_unsupported,
    )

NODES = [1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def _netns_available() -> None:
    reason = netns_unsupported()
    if reason is not None:
        pytest.skip(reason)
    remove_stale_namespaces()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., NetnsCluster]]:
    made: list[NetnsCluster] = []

    def make(extra_args: list[str] | None = None) -> NetnsCluster:
        cluster = NetnsCluster(tmp_path, NODES, ["--write-timeout", "5", *(extra_args or [])])
        made.append(cluster)
        cluster.build()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
            print(cluster.logs())  # shown by pytest when the test failed
        left = [ns for c in made for ns in c.leftovers()]
        assert not left, f"namespaces left behind: {left}"


def _figure(name: str, seconds: float) -> None:
    print(f"FIGURE {name}: {seconds:.2f} s")


def _started(cluster: NetnsCluster) -> int:
    cluster.start_all()
    cluster.call(1, "/init", [[n, cluster.addr(n)] for n in NODES], timeout=30)
    leader: int = cluster.wait_leader(timeout=30)
    return leader


def _read_back_everywhere(cluster: NetnsCluster, acknowledged: dict[str, str]) -> None:
    for n in NODES:
        for key, value in acknowledged.items():
            answer = cluster.call(n, "/consistent_read", key)
            assert answer == {"value": value}, (n, key, answer)


def _state(cluster: NetnsCluster, n: int) -> dict[str, Any]:
    m = cluster.metrics(n)
    assert m is not None, f"node {n} does not answer /metrics"
    state: dict[str, Any] = m
    return state


def test_leader_partitioned_from_both_peers(make_cluster: Callable[..., NetnsCluster]) -> None:
    cluster = make_cluster()
    old = _started(cluster)
    peers = [n for n in NODES if n != old]
    acknowledged: dict[str, str] = {}
    for i in range(5):
        cluster.write(peers[i % 2], f"before{i}", str(i))  # through the 307 to the leader
        acknowledged[f"before{i}"] = str(i)
    old_term = _state(cluster, old)["current_term"]

    # Both directions: the leader's host drops what it sends to the peers, and theirs to it.
    for p in peers:
        cluster.blackhole(old, p)
        cluster.blackhole(p, old)
    cut = time.monotonic()

    new = cluster.wait_leader(peers, timeout=20)
    _figure("partitioned leader: a new leader on the majority side", time.monotonic() - cut)
    assert new != old
    new_term = _state(cluster, new)["current_term"]
    assert new_term > old_term

    down = wait_for(
        "the old leader to step down by itself (check-quorum)",
        lambda: (m := cluster.metrics(old)) and m["state"] != "Leader" and m,
        timeout=20,
    )
    _figure("partitioned leader: the old leader steps down", time.monotonic() - cut)
    assert down["state"] in ("Follower", "Candidate"), down["state"]

    # The minority side cannot accept a write: no leader is known there any more.
    status, _, answer = cluster.http(
        "POST", cluster.url(old, "/write"), {"Set": {"key": "minority", "value": "x"}}
    )
    assert status == 503, (status, answer)

    for i in range(10):
        cluster.write(new, f"during{i}", str(i), timeout=15)
        acknowledged[f"during{i}"] = str(i)
    # The old leader's term did not run away: pre-vote keeps an isolated node's term still.
    assert _state(cluster, old)["current_term"] <= new_term

    cluster.heal()
    healed = time.monotonic()
    target = cluster.applied(new)
    wait_for(
        "the old leader to catch up and follow the new leader",
        lambda: (
            (m := cluster.metrics(old))
            and m["current_leader"] == new
            and m["last_applied"] is not None
            and m["last_applied"]["index"] >= target
        ),
        timeout=30,
    )
    _figure("partitioned leader: old leader caught up after healing", time.monotonic() - healed)
    # Healing disturbed nobody: the same leader, in the same term.
    assert cluster.wait_leader(timeout=20) == new
    assert _state(cluster, new)["current_term"] == new_term

    for i in range(5):
        cluster.write(old, f"after{i}", str(i))  # old leader now redirects to the new one
        acknowledged[f"after{i}"] = str(i)
    _read_back_everywhere(cluster, acknowledged)
    assert cluster.call(new, "/consistent_read", "minority") == {"value": None}


def test_one_way_partition_keeps_committing(make_cluster: Callable[..., NetnsCluster]) -> None:
    cluster = make_cluster()
    leader = _started(cluster)
    cut_off, other = (n for n in NODES if n != leader)
    term = _state(cluster, leader)["current_term"]
    acknowledged: dict[str, str] = {}
    cluster.write(leader, "before", "0")
    acknowledged["before"] = "0"

    # Only leader -> cut_off is dropped; cut_off -> leader still gets there (unanswered).
    cluster.blackhole(leader, cut_off)
    cut = time.monotonic()
    frozen = cluster.applied(cut_off)
    # Long enough for the cut-off follower to time out several times (election timeout
    # 0.15-0.3 s) and for check-quorum (0.6 s) to have had its say.
    writes = 0
    for i in range(500):
        cluster.write(other, f"oneway{i}", str(i), timeout=15)
        acknowledged[f"oneway{i}"] = str(i)
        writes = i + 1
        if writes >= 30 and time.monotonic() - cut > 2.5:
            break
        time.sleep(0.05)
    _figure(f"one-way partition: {writes} writes acknowledged", time.monotonic() - cut)
    lonely = _state(cluster, cut_off)
    print("cut-off follower during the partition:", lonely["state"], lonely["current_leader"])
    assert cluster.leader([leader, other]) == leader
    assert _state(cluster, leader)["current_term"] == term
    assert cluster.applied(cut_off) == frozen  # it really was cut off
    wait_for(
        "the other follower to apply", lambda: cluster.applied(other) >= cluster.applied(leader)
    )

    cluster.heal()
    healed = time.monotonic()
    target = cluster.applied(leader)
    wait_for(
        "the cut-off follower to catch up",
        lambda: cluster.applied(cut_off) >= target,
        timeout=30,
    )
    _figure("one-way partition: cut-off follower caught up", time.monotonic() - healed)
    assert cluster.wait_leader(timeout=20) == leader
    # Pre-vote: the cut-off follower's failed elections raised no term anywhere.
    for n in NODES:
        assert _state(cluster, n)["current_term"] == term, n
    _read_back_everywhere(cluster, acknowledged)


def test_snapshot_to_follower_under_rate_limit(make_cluster: Callable[..., NetnsCluster]) -> None:
    reason = tc_tbf_unsupported()
    if reason is not None:
        pytest.skip(reason)
    cluster = make_cluster(["--snapshot-logs", "50", "--keep-logs", "5"])
    leader = _started(cluster)
    lagging, other = (n for n in NODES if n != leader)
    term = _state(cluster, leader)["current_term"]

    for n in (leader, other):
        cluster.blackhole(lagging, n)
        cluster.blackhole(n, lagging)
    stale = _state(cluster, lagging)["last_log_index"] or 0
    filler = "x" * 1000  # ~200 kB of state: a snapshot that takes a while at 1 Mbit/s
    acknowledged: dict[str, str] = {}
    for i in range(200):
        cluster.write(leader, f"bulk{i}", f"{i}-{filler}")
        acknowledged[f"bulk{i}"] = f"{i}-{filler}"
    wait_for(
        "the leader to purge what the lagging follower lacks",
        lambda: (m := cluster.metrics(leader)) and m["purged"] and m["purged"]["index"] > stale,
        timeout=30,
    )

    # Everything sent to the lagging follower now goes through a 1 Mbit/s token bucket
    # (the bridge-side end of its veth), heartbeats and the snapshot alike.
    cluster.tc(
        "qdisc", "add", "dev", f"v{lagging}", "root", "tbf",
        "rate", "1mbit", "burst", "16kb", "latency", "200ms",
    )  # fmt: skip
    cluster.heal()
    healed = time.monotonic()
    target = cluster.applied(leader)
    m = wait_for(
        "the lagging follower to catch up by snapshot",
        lambda: (
            (m := cluster.metrics(lagging))
            and m["last_applied"]
            and m["last_applied"]["index"] >= target
            and m
        ),
        timeout=40,
    )
    _figure("rate-limited snapshot: lagging follower caught up", time.monotonic() - healed)
    assert m["snapshot"] is not None, "caught up without a snapshot: the test proves nothing"
    assert m["current_leader"] == leader
    # Heartbeats kept flowing: the leader never lost its place, nobody bumped the term.
    assert cluster.wait_leader(timeout=20) == leader
    assert _state(cluster, leader)["current_term"] == term
    stats = cluster.tc("-s", "qdisc", "show", "dev", f"v{lagging}").stdout
    print(stats)
    for key in ("bulk0", "bulk199"):
        assert cluster.call(lagging, "/read", key) == {"value": acknowledged[key]}
    cluster.write(lagging, "last", "1")
    _read_back_everywhere(cluster, {"bulk7": acknowledged["bulk7"], "last": "1"})


def test_no_namespace_of_this_run_is_left() -> None:
    """Runs last in this module: the earlier tests' finalizers removed everything."""
    mine = [ns for ns in our_namespaces() if ns.split("-")[1] == str(os.getpid())]
    assert mine == []
