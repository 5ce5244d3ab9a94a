"""``client_write`` inside the leader's process, beside PySyncObj 0.3.17, 3 processes each.

    python bench/bench_client_write.py [--quick | --smoke] [--runs N] [--baseline-ref REV]

raft-http: three ``raft-http node`` processes (SQLite log, fsync on); 1, 64, 256 and
1,024 tasks inside the leader's process call ``client_write`` back to back. PySyncObj:
three processes with a replicated dict; inside its leader's process, commands sent
one at a time (``sync=True``) or 1,000 and 3,000 in flight (callbacks); with its
default batching and with batching off; journal in memory and in a memory-mapped
file (which PySyncObj never fsyncs). Each run measures every cell once, clusters
taking turns (interleaved); ratios are to PySyncObj's best pipelined rate with its
journal in memory in the same run. ``--baseline-ref REV`` also runs the raft-http
cluster from a worktree of REV (see ``_baseline.py``), each cell right after ours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baseline import baseline_src, describe
from _clusters import PsoCluster, RaftCluster
from _harness import BENCH, Children, Report, cpu_seconds, fmt_spread, parse_args, pq, spread

WRITERS = (1, 64, 256, 1024)
IN_FLIGHT = (1, 1000, 3000)
PSO_CONFIGS = [  # (batching, journal in a file)
    (True, False),
    (False, False),
    (True, True),
    (False, True),
]


def pso_label(batching: bool, journal: bool) -> str:
    return f"batching {'on' if batching else 'off'}, journal {'file' if journal else 'memory'}"


class BaselineRaftCluster(RaftCluster):
    """A ``RaftCluster`` whose node processes import ``raft_http`` from ``src``."""

    def __init__(self, root: Path, src: Path) -> None:
        super().__init__(root)
        self.src = src

    def command(self, node_id: int) -> list[str]:
        return ["env", f"PYTHONPATH={self.src}{os.pathsep}{BENCH}", *super().command(node_id)]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline-ref",
        metavar="REV",
        help="also run the raft-http cluster from a worktree of REV, interleaved",
    )
    parser.add_argument(
        "--no-pysyncobj", action="store_true", help="leave PySyncObj out (with --baseline-ref)"
    )


def measure(raft: RaftCluster, writers: int, seconds: float) -> dict[str, Any]:
    pids = [raft.procs[n].pid for n in (1, 2, 3)]
    leader = raft.wait_leader(timeout=30)
    cpu0 = {p: cpu_seconds(p) for p in pids}
    result = raft.load(leader, writers, seconds)
    used = [(cpu_seconds(p) - cpu0[p]) / result["seconds"] for p in pids]
    result["all_cpu"] = sum(used)
    return result


def main() -> None:
    args, size = parse_args(__doc__, extra=options)
    report = Report("bench_client_write", size, "client_write in the leader vs PySyncObj")
    raft_runs: dict[int, list[dict[str, Any]]] = {w: [] for w in WRITERS}
    base_runs: dict[int, list[dict[str, Any]]] = {w: [] for w in WRITERS}
    pso_runs: dict[tuple[bool, bool, int], list[dict[str, Any]]] = {
        (b, j, k): [] for b, j in PSO_CONFIGS for k in IN_FLIGHT
    }
    baseline = args.baseline_ref
    pso_configs = [] if args.no_pysyncobj else PSO_CONFIGS
    with (
        Children(args.out / "logs") as kids,
        tempfile.TemporaryDirectory() as tmp,
        baseline_src(baseline) if baseline else contextlib.nullcontext() as base_src,
    ):
        raft = RaftCluster(Path(tmp) / "raft")
        base = None if base_src is None else BaselineRaftCluster(Path(tmp) / "base", base_src)
        try:
            raft.bootstrap()
            if base is not None:
                base.bootstrap()
            for r in range(size.runs):
                for writers in WRITERS:
                    sides = [(raft, raft_runs)] + ([] if base is None else [(base, base_runs)])
                    for cluster, runs_of in sides[r % 2 :] + sides[: r % 2]:
                        runs_of[writers].append(measure(cluster, writers, size.seconds))
                for i, (batching, journal) in enumerate(pso_configs):
                    pso = PsoCluster(
                        kids,
                        Path(tmp) / f"pso-{r}-{i}",
                        batching=batching,
                        journal=journal,
                    )
                    (Path(tmp) / f"pso-{r}-{i}").mkdir(parents=True)
                    try:
                        pso_leader = pso.bootstrap()
                        for k in IN_FLIGHT:
                            answer = pso.ask(
                                pso_leader,
                                {
                                    "cmd": "load",
                                    "in_flight": k,
                                    "seconds": size.seconds,
                                },
                                timeout=size.seconds + 60,
                            )
                            pso_runs[(batching, journal, k)].append(answer)
                    finally:
                        pso.close()
        finally:
            raft.close()
            if base is not None:
                base.close()
    if baseline:
        report.data["baseline_ref"] = describe(baseline)
        report.data["baseline"] = [{"writers": w, "runs": base_runs[w]} for w in WRITERS]
        baseline_table(report, raft_runs, base_runs, size.runs, size.seconds)
    if not pso_configs:
        report.data["raft"] = [{"writers": w, "runs": raft_runs[w]} for w in WRITERS]
        report.save(args.out)
        return
    best = [
        max(pso_runs[(b, False, k)][r]["rate"] for b, _ in PSO_CONFIGS[:2] for k in IN_FLIGHT[1:])
        for r in range(size.runs)
    ]
    rows = []
    for writers in WRITERS:
        runs = raft_runs[writers]
        rows.append(
            [
                f"raft-http, {writers} writers",
                "SQLite, fsync on",
                fmt_spread([x["rate"] for x in runs]),
                f"{fmt_spread([pq(x, 50) for x in runs])} / "
                f"{fmt_spread([pq(x, 99) for x in runs])}",
                fmt_spread([x["rate"] / b for x, b in zip(runs, best, strict=True)]),
                f"{spread([x['cpu'] for x in runs])[0]:.0%} / "
                f"{spread([x['all_cpu'] for x in runs])[0]:.0%}",
                errors(runs),
            ]
        )
    for batching, journal in PSO_CONFIGS:
        for k in IN_FLIGHT:
            runs = pso_runs[(batching, journal, k)]
            rows.append(
                [
                    f"PySyncObj, {'sequential' if k == 1 else f'{k:,} in flight'}",
                    pso_label(batching, journal),
                    fmt_spread([x["rate"] for x in runs]),
                    f"{fmt_spread([pq(x, 50) for x in runs])} / "
                    f"{fmt_spread([pq(x, 99) for x in runs])}",
                    fmt_spread([x["rate"] / b for x, b in zip(runs, best, strict=True)]),
                    f"{spread([x['cpu'] for x in runs])[0]:.0%}",
                    errors(runs),
                ]
            )
    report.table(
        "Writes inside the leader's process: raft-http client_write vs PySyncObj",
        [
            "cell",
            "log",
            "writes/s",
            "p50 / p99 ms",
            "x PySyncObj best",
            "CPU leader / 3 nodes",
            "refused",
        ],
        rows,
        f"Median (min-max) of {size.runs} runs of {size.seconds:g} s per cell, the clusters "
        "taking turns within each run. 'x PySyncObj best' divides by PySyncObj's best "
        "pipelined rate with its journal in memory (either batching) in the same run. "
        "CPU is the share of one core (PySyncObj: its leader process only).",
    )
    report.data["raft"] = [{"writers": w, "runs": raft_runs[w]} for w in WRITERS]
    report.data["pysyncobj"] = [
        {"batching": b, "journal_file": j, "in_flight": k, "runs": pso_runs[(b, j, k)]}
        for b, j in PSO_CONFIGS
        for k in IN_FLIGHT
    ]
    report.data["pysyncobj_series"] = [
        {
            "label": pso_label(b, j),
            "points": [{"in_flight": k, "runs": pso_runs[(b, j, k)]} for k in IN_FLIGHT],
        }
        for b, j in PSO_CONFIGS
        if not j
    ]
    report.save(args.out)


def baseline_table(
    report: Report,
    ours: dict[int, list[dict[str, Any]]],
    base: dict[int, list[dict[str, Any]]],
    runs: int,
    seconds: float,
) -> None:
    rows = []
    for writers in WRITERS:
        pairs = list(zip(ours[writers], base[writers], strict=True))
        rows.append(
            [
                writers,
                fmt_spread([a["rate"] for a, _ in pairs]),
                fmt_spread([b["rate"] for _, b in pairs]),
                fmt_spread([a["rate"] / b["rate"] for a, b in pairs]),
                f"{fmt_spread([pq(a, 50) for a, _ in pairs])} / "
                f"{fmt_spread([pq(b, 50) for _, b in pairs])}",
                fmt_spread([pq(a, 50) / pq(b, 50) for a, b in pairs]),
                errors(base[writers]),
            ]
        )
    ref = report.data["baseline_ref"]
    report.table(
        f"client_write in the leader: raft-http vs the baseline {ref.split()[0]}",
        [
            "writers",
            "raft-http writes/s",
            "baseline writes/s",
            "x baseline",
            "p50 ms raft-http / baseline",
            "p50 x baseline",
            "baseline refused",
        ],
        rows,
        f"Baseline: {ref}, its node processes run from a git worktree of it. Median (min-max)"
        f" of {runs} runs of {seconds:g} s per cell; within each run the two clusters take"
        " turns cell by cell, and a ratio divides the two runs of the same turn.",
    )


def errors(runs: list[dict[str, Any]]) -> str:
    total: dict[str, int] = {}
    for r in runs:
        for kind, n in r.get("errors", {}).items():
            total[kind] = total.get(kind, 0) + n
    return ", ".join(f"{n} {kind}" for kind, n in sorted(total.items())) or "-"


if __name__ == "__main__":
    main()
