"""Failover: from ``kill -9`` of the leader to the first acknowledged write through a survivor.

    python bench/bench_failover.py [--quick | --smoke] [--trials N]

raft-http: three ``raft-http node`` processes in the default configuration (election
timeout 150-300 ms, heartbeat 50 ms, fsync on). Each trial: the leader is killed with
SIGKILL; at once, this process (the client) POSTs ``/write`` to a surviving node,
following 307s and retrying refused or failed requests every 5 ms (each request
times out after 1 s), until one is acknowledged. Then the killed node is restarted
and the cluster settles before the next trial. PySyncObj 0.3.17 (3 processes, its
defaults: election timeout 0.4-1.4 s, batching on, journal in memory), trials
interleaved with raft-http's: its leader is killed and a surviving node's process
writes (``sync=True``, 0.5 s timeout, retried every 5 ms) until one succeeds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clusters import IDS, PsoCluster, RaftCluster
from _harness import Children, Report, fmt, parse_args

REQUEST_TIMEOUT = 1.0
GIVE_UP = 30.0


def first_write(cluster: RaftCluster, survivor: int, since: float) -> tuple[float, int]:
    """Seconds from ``since`` (monotonic) to the first acknowledged write, and the attempts."""
    url = cluster.url(survivor, "/write")
    attempts = 0
    while time.monotonic() - since < GIVE_UP:
        attempts += 1
        body = json.dumps({"Set": {"key": f"f{time.time_ns()}", "value": "v"}}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
                if resp.status == 200:
                    return time.monotonic() - since, attempts
        except urllib.error.HTTPError as e:
            if e.code == 307:  # urllib does not follow a 307 for a POST
                url = e.headers["Location"]
                continue
        except OSError:
            pass
        url = cluster.url(survivor, "/write")
        time.sleep(0.005)
    raise RuntimeError(f"no write acknowledged within {GIVE_UP:g}s of the kill")


def raft_trial(cluster: RaftCluster) -> dict[str, Any]:
    leader = cluster.wait_leader(timeout=30)
    survivor = next(n for n in IDS if n != leader)
    t0 = time.monotonic()
    cluster.kill(leader)
    seconds, attempts = first_write(cluster, survivor, t0)
    new_leader = cluster.wait_leader([n for n in IDS if n != leader], timeout=30)
    cluster.start(leader)  # rejoins as a follower, catches up
    cluster.wait_applied([leader], cluster.applied(new_leader), timeout=60)
    return {"seconds": seconds, "attempts": attempts, "killed": leader, "new_leader": new_leader}


def pso_trial(pso: PsoCluster) -> dict[str, Any]:
    leader = pso.leader()
    survivor = next(n for n in IDS if n != leader)
    since = time.time()
    pso.kill(leader)
    answer = pso.ask(survivor, {"cmd": "first_write", "since": since}, timeout=GIVE_UP + 10)
    if answer["seconds"] is None:
        raise RuntimeError(f"PySyncObj acknowledged no write within {GIVE_UP:g}s of the kill")
    pso.start(leader)
    pso.leader()
    return {"seconds": answer["seconds"], "attempts": answer["attempts"], "killed": leader}


def summary(times: list[float]) -> list[Any]:
    s = sorted(times)
    if not s:
        return ["-"] * 5
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return [len(s), med * 1e3, p90 * 1e3, s[0] * 1e3, s[-1] * 1e3]


def main() -> None:
    args, size = parse_args(
        __doc__, extra=lambda p: p.add_argument("--trials", type=int, help="default 10")
    )
    trials = args.trials or {"full": 12, "quick": 10, "smoke": 1}[size.name]
    report = Report("bench_failover", size, "Failover: kill -9 of the leader to the next write")
    raft_runs: list[dict[str, Any]] = []
    pso_runs: list[dict[str, Any]] = []
    with Children(args.out / "logs") as kids, tempfile.TemporaryDirectory() as tmp:
        raft = RaftCluster(Path(tmp) / "raft")
        pso = PsoCluster(kids, Path(tmp), batching=True, journal=False)
        try:
            raft.bootstrap()
            pso.bootstrap()
            for _ in range(trials):
                raft_runs.append(raft_trial(raft))
                pso_runs.append(pso_trial(pso))
        finally:
            raft.close()
            pso.close()
    rt = [r["seconds"] for r in raft_runs]
    pt = [r["seconds"] for r in pso_runs]
    ratio = (summary(rt)[1] / summary(pt)[1]) if rt and pt else float("nan")
    report.table(
        "Time from kill -9 of the leader to the first acknowledged write via a survivor",
        ["system", "trials", "median ms", "p90 ms", "min ms", "max ms", "median x PySyncObj"],
        [
            ["raft-http (3 node processes)", *summary(rt), fmt(ratio)],
            ["PySyncObj 0.3.17 (3 processes)", *summary(pt), "1.00"],
        ],
        f"{trials} trials each, interleaved (one raft-http trial, then one PySyncObj trial). "
        "Election timeouts are each system's defaults: raft-http 150-300 ms, PySyncObj "
        "0.4-1.4 s.",
    )
    report.data["raft-http"] = rt
    report.data["pysyncobj"] = pt
    report.data["raft_trials"] = raft_runs
    report.data["pso_trials"] = pso_runs
    report.save(args.out)


if __name__ == "__main__":
    main()
