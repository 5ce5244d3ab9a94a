"""POST /write to a 3-node cluster of ``raft-http node`` processes, beside bare aiohttp.

    python bench/bench_http_write.py [--quick | --smoke] [--runs N] [--clients 1,128]
                                     [--baseline-ref REV] [--uvloop]

Three ``raft-http node`` processes (SQLite log, fsync on every append batch) and one
load generator process with 1, 16, 64 and 256 clients over one keep-alive pool,
sending ``{"Set": ...}`` commands to the leader and following 307s. Beside it, in
the same run and interleaved, the same load generator and clients against a bare
aiohttp server process that reads each body and answers a fixed JSON document, and
the node's own HTTP stack over a Raft stub that answers at once (``_servers.py
kv-stub``): a table splits a write's CPU into bare HTTP, the node's HTTP stack, and
what Raft adds.

``--baseline-ref REV`` adds a third side: the same three-node cluster run from a
temporary worktree of commit REV (see ``_baseline.py``), interleaved with the others,
and a table of ratios against it (the issue-8 baseline is ee6e96d, main before the
core's rework began).

``--uvloop`` adds two more sides, interleaved the same way: the cluster run with
``raft-http node --event-loop uvloop`` and the bare server on uvloop, with a table of
each against its asyncio twin. The load generator stays on asyncio for every side.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baseline import BaselineCluster, baseline_src, describe
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

CLIENTS = (1, 16, 64, 128, 256)


def start_cluster(
    root: Path, extra: list[str] | None = None, src: Path | None = None
) -> tuple[ProcessCluster, int]:
    """Three node processes, initialized; returns the cluster and its leader's id.

    With ``src``, the nodes import ``raft_http`` from there (a baseline's worktree).
    """
    root.mkdir(parents=True, exist_ok=True)
    if src is None:
        cluster = ProcessCluster(root, [1, 2, 3], extra or [])
    else:
        cluster = BaselineCluster(root, [1, 2, 3], extra or [], src)
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


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clients",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        default=CLIENTS,
        help="comma-separated client counts (default: 1,16,64,128,256)",
    )
    parser.add_argument(
        "--baseline-ref",
        metavar="REV",
        help="also run the cluster from a worktree of REV, interleaved, and give ratios",
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="also run the cluster and the bare server on uvloop, interleaved, and give ratios",
    )


def main() -> None:
    args, size = parse_args(__doc__, extra=options)
    report = Report("bench_http_write", size, "POST /write: 3 raft-http node processes vs bare")
    bare_port, bare_uvloop_port, stub_port = free_ports(3)
    baseline = args.baseline_ref
    with (
        Children(args.out / "logs") as kids,
        tempfile.TemporaryDirectory() as tmp,
        baseline_src(baseline) if baseline else contextlib.nullcontext() as base_src,
    ):
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
        stub = kids.spawn(
            "kv-stub-write",
            [sys.executable, str(BENCH / "_servers.py"), "kv-stub", "--port", str(stub_port)],
        )
        wait_port(stub_port, stub)
        clusters: dict[str, tuple[ProcessCluster, int]] = {
            "raft-http": start_cluster(Path(tmp) / "current")
        }
        if base_src is not None:
            clusters["baseline"] = start_cluster(Path(tmp) / "baseline", src=base_src)
        if args.uvloop:
            bare_uvloop = kids.spawn(
                "bare-write-uvloop",
                [
                    sys.executable,
                    str(BENCH / "_servers.py"),
                    "bare",
                    "--port",
                    str(bare_uvloop_port),
                    "--uvloop",
                ],
            )
            wait_port(bare_uvloop_port, bare_uvloop)
            clusters["uvloop"] = start_cluster(
                Path(tmp) / "uvloop", extra=["--event-loop", "uvloop"]
            )
        try:
            node_pids = {
                path: [c.procs[n].pid for n in (1, 2, 3)] for path, (c, _) in clusters.items()
            }
            targets = {
                path: (c.url(leader, "/write"), [c.procs[leader].pid])
                for path, (c, leader) in clusters.items()
            }
            targets["bare"] = (f"http://127.0.0.1:{bare_port}/write", [bare.pid])
            targets["node-http"] = (f"http://127.0.0.1:{stub_port}/write", [stub.pid])
            if args.uvloop:
                url = f"http://127.0.0.1:{bare_uvloop_port}/write"
                targets["bare-uvloop"] = (url, [bare_uvloop.pid])
            gens = {path: LoadGen(kids, f"loadgen-write-{path}") for path in targets}
            cells: list[dict[str, Any]] = []
            for clients in args.clients:
                runs: dict[str, list[dict[str, Any]]] = {path: [] for path in targets}
                for r in range(size.runs):
                    order = list(targets)
                    for path in order[r % len(order) :] + order[: r % len(order)]:
                        url, pids = targets[path]
                        all_pids = node_pids.get(path, pids)
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
            changed = [path for path, (c, leader) in clusters.items() if c.leader() != leader]
        finally:
            for c, _ in clusters.values():
                c.close()
    report.data["cells"] = cells
    report.data["leader_changed"] = "raft-http" in changed
    if baseline:
        report.data["baseline_ref"] = describe(baseline)
        report.data["baseline_leader_changed"] = "baseline" in changed
    if args.uvloop:
        report.data["uvloop_leader_changed"] = "uvloop" in changed

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
    stack_table(report, cells, size.runs, size.seconds)
    if baseline:
        baseline_table(report, cells, size.runs, size.seconds)
    if args.uvloop:
        uvloop_table(report, cells, size.runs, size.seconds)
    report.save(args.out)


def us_per_call(run: dict[str, Any], key: str) -> float:
    """CPU microseconds per answered call: ``key`` is a share of a core over the run."""
    return float(run[key]) / run["rate"] * 1e6 if run["rate"] else float("nan")


def stack_table(report: Report, cells: list[dict[str, Any]], runs: int, seconds: float) -> None:
    """Where a write's CPU goes: bare HTTP, the node's HTTP stack, and Raft on top."""
    rows = []
    for cell in cells:
        sides = cell["runs"]
        stub, bare, ours = sides["node-http"], sides["bare"], sides["raft-http"]
        rows.append(
            [
                cell["clients"],
                fmt_spread([r["rate"] for r in stub]),
                fmt_spread([a["rate"] / b["rate"] for a, b in zip(stub, bare, strict=True)]),
                fmt_spread([us_per_call(r, "server_cpu") for r in bare]),
                fmt_spread([us_per_call(r, "server_cpu") for r in stub]),
                fmt_spread([us_per_call(r, "server_cpu") for r in ours]),
                fmt_spread([us_per_call(r, "all_cpu") for r in ours]),
                fmt_spread([us_per_call(r, "cpu") for r in bare]),
                fmt_spread([us_per_call(r, "cpu") for r in ours]),
            ]
        )
    report.table(
        "Where a write's CPU goes: bare aiohttp, the node's HTTP stack alone, the cluster",
        [
            "clients",
            "node HTTP stack req/s",
            "x bare",
            "bare server us/req",
            "node HTTP stack us/req",
            "cluster leader us/write",
            "cluster 3 nodes us/write",
            "load generator us/req (bare)",
            "load generator us/req (cluster)",
        ],
        rows,
        "The node HTTP stack is `bench/_servers.py kv-stub`: the app `raft-http node` serves"
        " (`KVNode.build_app`: KV API, Raft routes, status page, connection guard) over a"
        " Raft stub whose `client_write` answers at once, taking turns with the others in"
        " each run. CPU microseconds (user + system, all threads) per answered request,"
        f" median (min-max) of {runs} runs of {seconds:g} s each. What the leader spends"
        " beyond the stack's figure is Raft: the proposal, the log, replication, apply.",
    )


def baseline_table(report: Report, cells: list[dict[str, Any]], runs: int, seconds: float) -> None:
    """raft-http against the baseline ref's cluster, run by run (the runs interleave)."""
    rows = []
    for cell in cells:
        ours, base = cell["runs"]["raft-http"], cell["runs"]["baseline"]
        pairs = list(zip(ours, base, strict=True))
        rows.append(
            [
                cell["clients"],
                fmt_spread([r["rate"] for r in ours]),
                fmt_spread([r["rate"] for r in base]),
                fmt_spread([a["rate"] / b["rate"] for a, b in pairs]),
                fmt_spread([pq(r, 50) for r in ours]),
                fmt_spread([pq(r, 50) for r in base]),
                fmt_spread([pq(a, 50) / pq(b, 50) for a, b in pairs]),
                fmt_spread([pq(a, 99) / pq(b, 99) for a, b in pairs]),
                refused(base),
                f"{spread([r['server_cpu'] for r in base])[0]:.0%} / "
                f"{spread([r['all_cpu'] for r in base])[0]:.0%}",
            ]
        )
    ref = report.data["baseline_ref"]
    report.table(
        f"POST /write, raft-http vs the baseline {ref.split()[0]}, same clients",
        [
            "clients",
            "raft-http writes/s",
            "baseline writes/s",
            "x baseline",
            "raft-http p50 ms",
            "baseline p50 ms",
            "p50 x baseline",
            "p99 x baseline",
            "baseline refused",
            "baseline CPU leader / 3 nodes",
        ],
        rows,
        f"Baseline: {ref}, its node processes run from a git worktree of it. Median (min-max)"
        f" of {runs} runs of {seconds:g} s each, raft-http, baseline and bare taking turns"
        " within each run; a ratio divides the two runs of the same turn. The baseline's"
        " leader stayed the same throughout: "
        f"{'no' if report.data['baseline_leader_changed'] else 'yes'}.",
    )


def uvloop_table(report: Report, cells: list[dict[str, Any]], runs: int, seconds: float) -> None:
    """The cluster and the bare server on uvloop, each against its asyncio twin."""
    rows = []
    for cell in cells:
        sides = cell["runs"]
        ours, fast = sides["raft-http"], sides["uvloop"]
        bare, bare_fast = sides["bare"], sides["bare-uvloop"]
        pairs = list(zip(fast, ours, strict=True))
        rows.append(
            [
                cell["clients"],
                fmt_spread([r["rate"] for r in ours]),
                fmt_spread([r["rate"] for r in fast]),
                fmt_spread([a["rate"] / b["rate"] for a, b in pairs]),
                fmt_spread([pq(a, 50) / pq(b, 50) for a, b in pairs]),
                fmt_spread([a["rate"] / b["rate"] for a, b in zip(bare_fast, bare, strict=True)]),
                fmt_spread([a["rate"] / b["rate"] for a, b in zip(fast, bare_fast, strict=True)]),
                refused(fast),
                f"{spread([r['server_cpu'] for r in fast])[0]:.0%} / "
                f"{spread([r['all_cpu'] for r in fast])[0]:.0%}",
            ]
        )
    report.table(
        "POST /write, the nodes on uvloop (raft-http node --event-loop uvloop) vs asyncio",
        [
            "clients",
            "asyncio writes/s",
            "uvloop writes/s",
            "uvloop x asyncio",
            "p50 uvloop x asyncio",
            "bare uvloop x asyncio",
            "uvloop nodes x uvloop bare",
            "uvloop refused",
            "uvloop CPU leader / 3 nodes",
        ],
        rows,
        f"Median (min-max) of {runs} runs of {seconds:g} s each, every side taking turns"
        " within each run; a ratio divides two runs of the same turn. The load generator"
        " runs on asyncio for every side. The uvloop cluster's leader stayed the same"
        f" throughout: {'no' if report.data['uvloop_leader_changed'] else 'yes'}.",
    )


if __name__ == "__main__":
    main()
