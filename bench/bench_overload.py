"""Overload: many writers with large values against 3 node processes (issue #9, item 8).

The orchestrator runs ``--writers`` clients writing ``--value-size`` byte values over a
key space of ``--keys`` keys (so live data stays bounded) for ``--seconds``; a client
follows 307s and, on a 503, waits ``--backoff`` before trying again. It reports what an
operator would look at: elections that happened during the load (from the nodes' logs;
there should be none), answers by status and kind (503 ``overloaded`` is the leader
shedding load on purpose), acknowledged writes/s, latency percentiles, and each node's
RSS at the start, its peak, and at the end. The baseline is the same cluster with one
writer, measured first in the same run.

    python bench/bench_overload.py [--quick] [--writers 64] [--value-size 4096] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ProcessCluster, Report, fmt, parse_args, quantiles
from _kvload import Load, RssSampler

IDS = (1, 2, 3)
ELECTION = re.compile(r"starts election for term \d+(?! \(leadership transfer\))")


def elections(cluster: ProcessCluster) -> int:
    count = 0
    for node in IDS:
        path = cluster.log_path(node)
        count += len(ELECTION.findall(path.read_text() if path.exists() else ""))
    return count


async def measure(
    cluster: ProcessCluster, args: argparse.Namespace, writers: int, seconds: float
) -> dict[str, Any]:
    before = elections(cluster)
    pids = {n: cluster.procs[n].pid for n in IDS}
    load = Load(
        {n: cluster.addr(n) for n in IDS},
        writers,
        value_size=args.value_size,
        keys=args.keys,
        backoff=args.backoff,
    )
    started = time.monotonic()
    with RssSampler(pids) as rss:
        await load.run(seconds)
    elapsed = time.monotonic() - started
    q = quantiles(load.latencies)
    return {
        "writers": writers,
        "writes_per_s": load.answers["200"] / elapsed,
        "p50_ms": q[50] * 1000 if q else float("nan"),
        "p99_ms": q[99] * 1000 if q else float("nan"),
        "max_ms": q[100] * 1000 if q else float("nan"),
        "answers": dict(load.answers),
        "elections": elections(cluster) - before,
        "rss": {
            n: {"start": s[0], "peak": max(s), "end": s[-1]} for n, s in rss.samples.items() if s
        },
    }


async def run(args: argparse.Namespace, root: Path, seconds: float) -> list[dict[str, Any]]:
    cluster = ProcessCluster(root, IDS, args.node_args)
    try:
        cluster.start_all()
        cluster.call(1, "/init", [[n, cluster.addr(n)] for n in IDS])
        cluster.wait_leader()
        baseline = await measure(cluster, args, 1, min(5.0, seconds))
        loaded = await measure(cluster, args, args.writers, seconds)
        return [baseline, loaded]
    finally:
        await asyncio.to_thread(cluster.close)


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--writers", type=int, default=64)
        parser.add_argument("--value-size", type=int, default=4096)
        parser.add_argument("--keys", type=int, default=10_000, help="key space (live data)")
        parser.add_argument("--seconds", type=float, help="load time (default 60, quick 15)")
        parser.add_argument("--backoff", type=float, default=0.05, help="sleep after a 503")
        parser.add_argument(
            "--node-args", nargs=argparse.REMAINDER, default=[], help="passed to every node"
        )
        parser.add_argument("--keep", type=Path, help="keep the nodes' data and logs here")

    args, size = parse_args(__doc__, extra=extra)
    seconds = args.seconds or (60.0 if size.name == "full" else 15.0 if size.name == "quick" else 3)
    report = Report(
        "bench_overload", size, "Overload: many writers, large values, 3 node processes"
    )
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as scratch:
        results = asyncio.run(run(args, args.keep or Path(scratch), seconds))
    rows = []
    for r in results:
        answers = r["answers"]
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()) if k != "200")
        rows.append(
            [
                r["writers"],
                r["writes_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["elections"],
                refused or "none",
                " / ".join(
                    f"{fmt(v['start'])}-{fmt(v['peak'])}-{fmt(v['end'])}" for v in r["rss"].values()
                ),
            ]
        )
    report.table(
        f"{args.value_size}-byte values over {args.keys} keys, {seconds:g} s"
        + (f", node args {' '.join(args.node_args)}" if args.node_args else ""),
        [
            "writers",
            "writes/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "elections",
            "refused answers",
            "RSS MB start-peak-end (nodes 1/2/3)",
        ],
        rows,
        note="Baseline: one writer, first, on the same cluster. Elections: during the load, "
        "from the nodes' logs.",
    )
    report.data = {"results": results}
    report.save(args.out)


if __name__ == "__main__":
    main()
