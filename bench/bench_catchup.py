"""Catch-up: a follower restarted far behind (its missing log purged) under a write load.

    python bench/bench_catchup.py [--quick | --smoke] [--behind N]

Three ``raft-http node`` processes (fsync on, the default snapshot policy: a snapshot
every 5,000 applied logs, 1,000 kept behind it). One follower is stopped (SIGTERM);
``--behind`` writes (default 100,000) are made without it, so the leader's log no
longer holds what it lacks and it must be sent a snapshot. Then a load generator
process keeps writing (64 clients, POST /write) while the follower is restarted:
reported are the time from its restart until it has applied everything the leader
had applied when it restarted, how far it was behind, and whether any node's term
changed meanwhile (an election). The full size repeats this on a fresh cluster ``--runs``
times (default 3).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clusters import IDS, RaftCluster
from _harness import BENCH, Children, Report, parse_args

CLIENTS = 64


def writers(cluster: RaftCluster, leader: int, *limit: str) -> list[str]:
    """The load generator's command line: CLIENTS writers to the leader, for at most 600 s."""
    return [
        sys.executable,
        str(BENCH / "_loadgen.py"),
        "write",
        "--url",
        cluster.url(leader, "/write"),
        "-c",
        str(CLIENTS),
        *limit,
        "--seconds",
        "600",
    ]


def fill(cluster: RaftCluster, leader: int, writes: int, kids: Children) -> float:
    """Make ``writes`` acknowledged writes through the leader (a load generator process)."""
    t0 = time.monotonic()
    argv = writers(cluster, leader, "--calls", str(writes))
    proc = kids.spawn("catchup-fill", argv)
    proc.wait(timeout=900)
    return time.monotonic() - t0


def trial(kids: Children, root: Path, size: Any, behind: int) -> dict[str, Any]:
    """One cluster, one follower stopped, ``behind`` writes, then its restart under load."""
    # Small sizes snapshot (and purge) more often, so catch-up is by snapshot there too.
    policy = [] if size.name == "full" else ["--snapshot-logs", "500", "--keep-logs", "100"]
    cluster = RaftCluster(root, policy)
    try:
        leader = cluster.bootstrap()
        follower = next(n for n in IDS if n != leader)
        cluster.write(leader, "before", "stop")
        cluster.wait_applied([follower], cluster.applied(leader), timeout=60)
        held = cluster.applied(follower)
        cluster.terminate(follower)
        fill_seconds = fill(cluster, leader, behind, kids)
        m = cluster.metrics(leader) or {}
        terms_before = {
            n: (cluster.metrics(n) or {}).get("current_term") for n in IDS if cluster.running(n)
        }
        load = kids.spawn("catchup-load", writers(cluster, leader))
        time.sleep(0.5)
        goal = cluster.applied(leader)
        t0 = time.monotonic()
        cluster.start(follower, wait=False)
        caught = None
        deadline = t0 + 300
        while time.monotonic() < deadline:
            if cluster.applied(follower) >= goal:
                caught = time.monotonic() - t0
                break
            time.sleep(0.05)
        load.kill()
        load.wait(timeout=10)
        terms_after = {n: (cluster.metrics(n) or {}).get("current_term") for n in IDS}
        fm = cluster.metrics(follower) or {}
        return {
            "behind": goal - held,
            "goal": goal,
            "fill_seconds": fill_seconds,
            "catch_up_seconds": caught,
            "terms_before": terms_before,
            "terms_after": terms_after,
            "election": len(set(terms_after.values()) | set(terms_before.values())) > 1,
            "follower_snapshot": fm.get("snapshot"),
            "leader_purged": m.get("purged"),
        }
    finally:
        cluster.close()


def main() -> None:
    args, size = parse_args(
        __doc__, extra=lambda p: p.add_argument("--behind", type=int, help="default 100,000")
    )
    behind = args.behind or {"full": 100_000, "quick": 10_000, "smoke": 2_000}[size.name]
    report = Report("bench_catchup", size, "Catch-up of a follower restarted far behind")
    trials: list[dict[str, Any]] = []
    with Children(args.out / "logs") as kids, tempfile.TemporaryDirectory() as tmp:
        # Each trial is a whole cluster and fill: full size takes --runs trials (3), the
        # short sizes one, to stay under a minute.
        for n in range(size.runs if size.name == "full" else 1):
            trials.append(trial(kids, Path(tmp) / f"raft-{n}", size, behind))
    report.table(
        "Follower restarted behind a purged log, under 64 writing clients",
        [
            "trial",
            "entries behind at restart",
            "leader's log purged up to",
            "catch-up s",
            "term before / after",
            "election meanwhile",
        ],
        [
            [
                str(n + 1),
                f"{t['behind']:,}",
                str((t["leader_purged"] or {}).get("index", "-")),
                f"{t['catch_up_seconds']:.2f}"
                if t["catch_up_seconds"] is not None
                else "not in 300 s",
                f"{sorted(set(t['terms_before'].values()))} / "
                f"{sorted(set(t['terms_after'].values()))}",
                "yes" if t["election"] else "no",
            ]
            for n, t in enumerate(trials)
        ],
        "Catch-up: from the restart (process start included) until the follower has applied "
        f"the leader's applied index at the restart, while the load goes on. {len(trials)} "
        "trial(s), each on a fresh cluster.",
    )
    report.data["trials"] = trials
    report.save(args.out)


if __name__ == "__main__":
    main()
