"""Memory soak: 3 node processes (fsync on) under 64 writers of 4 KiB values (issue #9, item 8).

Each node's RSS (VmRSS) is sampled every ``--interval`` seconds through five phases:

1. idle: the cluster started and initialized, before any write;
2. load: ``--writers`` clients write ``--value-size`` byte values over ``--keys`` keys
   (so the live data stays bounded) for ``--duration`` seconds (10 minutes by default);
3. delete: every key of the key space is deleted;
4. snapshot + purge: each node builds a snapshot of what it applied and purges its log
   behind it (``POST /snapshot`` on ``bench/_node.py``'s control port), then idles for
   ``--settle`` seconds: the live data is now empty;
5. malloc_trim: each node calls glibc's ``malloc_trim(0)`` once more, then idles again:
   what glibc's arenas still held on to. (A node already calls it after each snapshot
   that let it purge its log, ``raft/heap.py``; run the nodes of a version without that
   to see the whole difference.)

It reports, per node, RSS idle, peak, at the end of the load, after delete + snapshot +
purge and after ``malloc_trim``; and for the run: elections (how much the term grew),
writes/s, refused answers (503), p50/p99; and draws RSS over time (``--png``).

    python bench/bench_soak.py [--quick] [--duration 600] [--writers 64] [--value-size 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _clusters import IDS, RaftCluster
from _harness import Report, parse_args, quantiles
from _kvload import Load, RssSampler

DEFAULTS = {  # duration, interval, settle, writers, keys
    "full": (600.0, 5.0, 10.0, 64, 10_000),
    "quick": (30.0, 1.0, 3.0, 64, 10_000),
    "smoke": (3.0, 0.5, 1.0, 8, 200),
}
PHASES = ("idle", "end of load", "deleted", "snapshot + purge", "malloc_trim")


def term(cluster: RaftCluster) -> int:
    """The greatest term any node is in (each election raises it by one)."""
    terms = [m["current_term"] for n in IDS if (m := cluster.metrics(n)) is not None]
    return max(terms, default=0)


def summary(load: Load, seconds: float) -> dict[str, Any]:
    q = quantiles(load.latencies)
    return {
        "writes_per_s": load.answers["200"] / seconds if seconds else float("nan"),
        "p50_ms": q[50] * 1000 if q else float("nan"),
        "p99_ms": q[99] * 1000 if q else float("nan"),
        "refused_503": sum(v for k, v in load.answers.items() if k.startswith("503")),
        "answers": dict(load.answers),
    }


async def soak(cluster: RaftCluster, args: argparse.Namespace, run: dict[str, Any]) -> None:
    """The five phases, each node's RSS sampled throughout; fills ``run``."""
    addrs = {n: cluster.addr(n) for n in IDS}
    pids = {n: cluster.procs[n].pid for n in IDS}

    def memory() -> dict[int, dict[str, Any]]:
        return {n: cluster.control_call(n, "/memory") for n in IDS}

    def mark(phase: str) -> None:
        run["marks"].append([phase, rss.times[rss.sample()], term(cluster)])
        run["memory"][phase] = memory()

    def load_of() -> Load:
        return Load(
            addrs, args.writers, value_size=args.value_size, keys=args.keys, backoff=args.backoff
        )

    with RssSampler(pids, args.interval) as rss:
        run["rss"] = {"times": rss.times, "samples": rss.samples}
        await asyncio.sleep(args.settle)
        mark("idle")
        writes = load_of()
        started = time.monotonic()
        await writes.run(args.duration)
        run["load"] = summary(writes, time.monotonic() - started)
        mark("end of load")
        deletes = load_of()
        started = time.monotonic()
        await deletes.delete_all(timeout=max(120.0, args.keys / 50))
        run["delete"] = summary(deletes, time.monotonic() - started)
        mark("deleted")
        run["snapshot"] = {
            n: await asyncio.to_thread(cluster.control_call, n, "/snapshot") for n in IDS
        }
        await asyncio.sleep(args.settle)
        mark("snapshot + purge")
        run["trim"] = {
            n: await asyncio.to_thread(cluster.control_call, n, "/malloc-trim") for n in IDS
        }
        await asyncio.sleep(args.settle)
        mark("malloc_trim")


def rss_at(run: dict[str, Any], node: int, phase: str) -> float:
    times = run["rss"]["times"]
    at = next(t for p, t, _ in run["marks"] if p == phase)
    samples: list[float] = run["rss"]["samples"][node]
    return samples[times.index(at)]


def rss_peak(run: dict[str, Any], node: int) -> float:
    """The greatest sample between the idle mark and the end of the load."""
    times = run["rss"]["times"]
    marks = {p: t for p, t, _ in run["marks"]}
    samples: list[float] = run["rss"]["samples"][node]
    return max(
        s for t, s in zip(times, samples, strict=True) if marks["idle"] <= t <= marks["end of load"]
    )


def plot_rss(run: dict[str, Any], path: Path, title: str) -> bool:
    """RSS of each node over time with the phases marked; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    times = run["rss"]["times"]
    for node, samples in run["rss"]["samples"].items():
        ax.plot(times, samples, label=f"node {node}")
    for phase, at, _ in run["marks"]:
        ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            phase,
            (at, 0),
            xytext=(2, 4),
            textcoords="offset points",
            rotation=90,
            fontsize=7,
            color="grey",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MB (VmRSS)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(rep: Report, run: dict[str, Any], args: argparse.Namespace) -> None:
    node_args = f", node args {' '.join(args.node_args)}" if args.node_args else ""
    what = (
        f"{args.writers} writers, {args.value_size}-byte values over {args.keys} keys,"
        f" {args.duration:g} s{node_args}"
    )
    rows = []
    for n in IDS:
        rows.append(
            [
                n,
                rss_at(run, n, "idle"),
                rss_peak(run, n),
                rss_at(run, n, "end of load"),
                rss_at(run, n, "deleted"),
                rss_at(run, n, "snapshot + purge"),
                rss_at(run, n, "malloc_trim"),
                run["memory"]["end of load"][n]["log_held_bytes"] / 2**20,
                run["trim"][n]["seconds"] * 1000,
            ]
        )
    rep.table(
        f"RSS MB per node: {what}",
        [
            "node",
            "idle",
            "peak",
            "end of load",
            "keys deleted",
            "+ snapshot + purge",
            "+ malloc_trim",
            "log held MB at end of load",
            "malloc_trim ms",
        ],
        rows,
        note=f"Sampled every {args.interval:g} s (VmRSS); each phase after the deletes idles"
        f" {args.settle:g} s before its sample. `+ malloc_trim`: one more malloc_trim(0) in"
        " each node (each already calls it after a snapshot lets it purge its log). `log"
        " held`: application bytes the in-memory log held (Config.max_in_memory_log_bytes"
        " bounds its applied part).",
    )
    terms = {p: t for p, _, t in run["marks"]}
    rows = []
    for phase, key, before, after in (
        ("load", "load", "idle", "end of load"),
        ("delete every key", "delete", "end of load", "deleted"),
    ):
        s = run[key]
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(s["answers"].items()) if k != "200")
        rows.append(
            [
                phase,
                s["writes_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["refused_503"],
                refused or "none",
                terms[after] - terms[before],
            ]
        )
    rep.table(
        "Writes and elections",
        ["phase", "writes/s", "p50 ms", "p99 ms", "503s", "refused answers", "elections"],
        rows,
        note="Elections: how much the greatest term of the nodes grew during the phase.",
    )
    rep.data = {"run": run, "what": what}


async def run_soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cluster = RaftCluster(root, args.node_args)
    run: dict[str, Any] = {"marks": [], "memory": {}}
    try:
        await asyncio.to_thread(cluster.bootstrap)
        await soak(cluster, args, run)
        return run
    finally:
        await asyncio.to_thread(cluster.close)


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duration", type=float, help="seconds of load (default 600)")
        parser.add_argument("--writers", type=int, help="concurrent clients (default 64)")
        parser.add_argument("--value-size", type=int, default=4096)
        parser.add_argument("--keys", type=int, help="key space: the live data (default 10000)")
        parser.add_argument("--interval", type=float, help="seconds between RSS samples")
        parser.add_argument("--settle", type=float, help="idle seconds before a phase's sample")
        parser.add_argument("--backoff", type=float, default=0.05, help="sleep after a 503")
        parser.add_argument("--png", type=Path, help="the plot (default: OUT/bench_soak_rss.png)")
        parser.add_argument(
            "--node-args", nargs=argparse.REMAINDER, default=[], help="passed to every node"
        )
        parser.add_argument("--keep", type=Path, help="keep the nodes' data and logs here")

    args, size = parse_args(__doc__, extra=extra)
    duration, interval, settle, writers, keys = DEFAULTS[size.name]
    args.duration = args.duration or duration
    args.interval = args.interval or interval
    args.settle = args.settle if args.settle is not None else settle
    args.writers = args.writers or writers
    args.keys = args.keys or keys
    rep = Report("bench_soak", size, "Memory soak: RSS of 3 node processes under load, then empty")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as scratch:
        run = asyncio.run(run_soak(args, args.keep or Path(scratch)))
    report(rep, run, args)
    png = args.png or args.out / "bench_soak_rss.png"
    if plot_rss(run, png, f"RSS of 3 raft-http nodes: {rep.data['what']}"):
        rep.text(f"RSS over time: `{png.name}`.")
    rep.save(args.out)
    print(f"RSS over time: {png}" if png.exists() else "no plot (matplotlib missing)")


if __name__ == "__main__":
    main()
