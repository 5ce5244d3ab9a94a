"""POST /write to a 3-node cluster of ``raft-http node`` processes, beside bare aiohttp.

    python bench/bench_http_write.py [--quick | --smoke] [--runs N]

Three ``raft-http node`` processes (SQLite log, fsync on every append batch) and one
load generator process with 1, 16, 64 and 256 clients over one keep-alive pool,
sending ``{"Set": ...}`` commands to the leader and following 307s. Beside it, in
the same run and interleaved, the same load generator and clients against a bare
aiohttp server process that reads each body and answers a fixed JSON document.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    BENCH,
    Children,
    LoadGen,
    ProcessCluster,
    Report,
    cpu_seconds,
    fmt_spread,
    free_ports,
    parse_args,
    pq,
    spread,
    wait_port,
)

CLIENTS = (1, 16, 64, 256)


def start_cluster(root: Path, extra: list[str] | None = None) -> tuple[ProcessCluster, int]:
    """Three node processes, initialized; returns the cluster and its leader's id."""
    cluster = ProcessCluster(root, [1, 2, 3], extra or [])
    cluster.extra_args[cluster.extra_args.index("info")] = "warning"
    cluster.start_all()
    cluster.call(1, "/init", [[n, cluster.addr(n)] for n in (1, 2, 3)], timeout=30)
    return cluster, cluster.wait_leader(timeout=30)


def refused(runs: list[dict[str, Any]]) -> str:
    """Answers that were not a success, summed over the runs (``-`` if none)."""
    total: dict[str, int] = {}
    for r in runs:
        for kind, n in r.get("errors", {}).items():
            total[kind] = total.get(kind, 0) + n
    return ", ".join(f"{n} {kind}" for kind, n in sorted(total.items())) or "-"


def main() -> None:
    args, size = parse_args(__doc__)
    report = Report("bench_http_write", size, "POST /write: 3 raft-http node processes vs bare")
    (bare_port,) = free_ports(1)
    with Children(args.out / "logs") as kids, tempfile.TemporaryDirectory() as tmp:
        bare = kids.spawn(
            "bare-write",
            [
                sys.executable,
                str(BENCH / "_servers.py"),
                "bare",
                "--port",
                str(bare_port),
            ],
        )
        wait_port(bare_port, bare)
        cluster, leader = start_cluster(Path(tmp))
        try:
            node_pids = {n: cluster.procs[n].pid for n in (1, 2, 3)}
            targets = {
                "raft-http": (cluster.url(leader, "/write"), [node_pids[leader]]),
                "bare": (f"http://127.0.0.1:{bare_port}/write", [bare.pid]),
            }
            gens = {path: LoadGen(kids, f"loadgen-write-{path}") for path in targets}
            cells: list[dict[str, Any]] = []
            for clients in CLIENTS:
                runs: dict[str, list[dict[str, Any]]] = {"raft-http": [], "bare": []}
                for r in range(size.runs):
                    for path in ["bare", "raft-http"] if r % 2 else ["raft-http", "bare"]:
                        url, pids = targets[path]
                        all_pids = list(node_pids.values()) if path == "raft-http" else pids
                        cpu0 = {p: cpu_seconds(p) for p in all_pids}
                        result = gens[path].run(
                            [
                                "write",
                                "--url",
                                url,
                                "-c",
                                str(clients),
                                "--seconds",
                                str(size.seconds),
                            ],
                            timeout=120 + size.seconds,
                        )
                        used = {p: (cpu_seconds(p) - cpu0[p]) / result["seconds"] for p in all_pids}
                        result["server_cpu"] = used[pids[0]]
                        result["all_cpu"] = sum(used.values())
                        runs[path].append(result)
                cells.append({"clients": clients, "runs": runs})
            leader_after = cluster.leader()
        finally:
            cluster.close()
    report.data["cells"] = cells
    report.data["leader_changed"] = leader_after != leader

    rows = []
    for cell in cells:
        ours, base = cell["runs"]["raft-http"], cell["runs"]["bare"]
        ratios = [a["rate"] / b["rate"] for a, b in zip(ours, base, strict=True)]
        p50_ratio = [pq(a, 50) / pq(b, 50) for a, b in zip(ours, base, strict=True)]
        rows.append(
            [
                cell["clients"],
                fmt_spread([r["rate"] for r in ours]),
                fmt_spread([r["rate"] for r in base]),
                fmt_spread(ratios),
                f"{fmt_spread([pq(r, 50) for r in ours])} / "
                f"{fmt_spread([pq(r, 99) for r in ours])}",
                f"{fmt_spread([pq(r, 50) for r in base])} / "
                f"{fmt_spread([pq(r, 99) for r in base])}",
                fmt_spread(p50_ratio),
                refused(ours),
                f"{spread([r['server_cpu'] for r in ours])[0]:.0%} / "
                f"{spread([r['all_cpu'] for r in ours])[0]:.0%} / "
                f"{spread([r['cpu'] for r in ours])[0]:.0%}",
                f"{spread([r['server_cpu'] for r in base])[0]:.0%} / "
                f"{spread([r['cpu'] for r in base])[0]:.0%}",
            ]
        )
    report.table(
        "POST /write, 3 node processes (fsync on) vs bare aiohttp, same clients",
        [
            "clients",
            "raft-http writes/s",
            "bare req/s",
            "x bare",
            "raft-http p50 / p99 ms",
            "bare p50 / p99 ms",
            "p50 x bare",
            "refused",
            "raft-http CPU leader / 3 nodes / client",
            "bare CPU server / client",
        ],
        rows,
        f"Median (min-max) of {size.runs} interleaved runs of {size.seconds:g} s each; CPU is "
        "the share of one core used during the run. The leader stayed the same throughout: "
        f"{'no' if report.data['leader_changed'] else 'yes'}.",
    )
    report.save(args.out)


if __name__ == "__main__":
    main()
