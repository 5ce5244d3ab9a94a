"""Run every benchmark, draw the plots and write bench/RESULTS.md.

    python bench/run_all.py            # full size (several minutes)
    python bench/run_all.py --quick    # every cell, short runs
    python bench/run_all.py --smoke --out /tmp/b --results /tmp/b/RESULTS.md   # what CI runs

Each benchmark is a script of its own (``bench/bench_*.py``) that writes NAME.md and
NAME.json under ``--out``; scripts that only print their tables (the one-process
``bench_transport.py``) are captured from stdout. RESULTS.md is those sections, the
plots (PNG, matplotlib from the ``bench`` extra) and the hand-written reading in
bench/READING.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BENCH, RESULTS_DIR, machine_info

# In the order RESULTS.md shows them; a script that is not there (yet) is skipped.
BENCHMARKS = [
    "bench_append.py",
    "bench_snapshot.py",
    "bench_http_write.py",
    "bench_client_write.py",
    "bench_failover.py",
    "bench_catchup.py",
    "bench_rolling_restart.py",
    "bench_overload.py",
    "bench_soak.py",
    "bench_transport.py",
]
TIMEOUT = {"smoke": 240, "quick": 300, "full": 1800}


def run_one(script: Path, size: str, out: Path) -> tuple[str, float, bool]:
    """Run one benchmark; its Markdown section, the wall time and whether it succeeded."""
    name = script.stem
    own = "_harness" in script.read_text()  # writes NAME.md itself
    argv = [sys.executable, str(script)]
    if size != "full":
        argv.append(f"--{size}" if own else "--quick")
    if own:
        argv += ["--out", str(out)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT[size], check=False
        )
        ok = proc.returncode == 0
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, stdout, stderr = False, str(e.stdout or ""), f"timed out after {TIMEOUT[size]} s"
    wall = time.monotonic() - t0
    if not ok:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        return f"## {name}\n\nFAILED (`{' '.join(argv)}`):\n\n```\n{tail}\n```\n", wall, False
    if own:
        return _relative((out / f"{name}.md").read_text()), wall, True
    # A one-process script: its printed tables, with the command and its own machine line.
    text = stdout.replace("\n# ", "\n### ")
    if text.startswith("# "):
        text = "#" + text
    cmd = " ".join(["python", *argv[1:]]).replace(str(BENCH.parent) + "/", "")
    section = f"## {name} (one process)\n\nCommand: `{cmd}`\n\n{text}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(section)
    return section, wall, True


def _relative(text: str) -> str:
    """Commands as a reader would type them: paths inside the repository made relative."""
    return text.replace(str(BENCH.parent) + "/", "")


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc["data"]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def plots(out: Path, png_dir: Path) -> list[tuple[str, str]]:
    """Draw what the results hold; returns (title, file name) of each PNG written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[tuple[str, str]] = []
    png_dir.mkdir(parents=True, exist_ok=True)

    # 1. Throughput against concurrency.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    http = load(out, "bench_http_write")
    if http:
        for path, label in (("raft-http", "raft-http POST /write"), ("bare", "bare aiohttp")):
            xs = [c["clients"] for c in http["cells"]]
            ys = [median([r["rate"] for r in c["runs"][path]]) for c in http["cells"]]
            ax.plot(xs, ys, marker="o", label=label)
            drawn = True
    inproc = load(out, "bench_client_write")
    if inproc:
        cells = inproc.get("raft", [])
        if cells:
            xs = [c["writers"] for c in cells]
            ys = [median([r["rate"] for r in c["runs"]]) for c in cells]
            ax.plot(xs, ys, marker="s", label="raft-http client_write (in the leader)")
            drawn = True
        for series in inproc.get("pysyncobj_series", []):
            xs = [p["in_flight"] for p in series["points"]]
            ys = [median([r["rate"] for r in p["runs"]]) for p in series["points"]]
            ax.plot(xs, ys, marker="^", linestyle="--", label=f"PySyncObj {series['label']}")
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_xlabel("concurrent clients / writers / commands in flight")
        ax.set_ylabel("writes/s (median of runs)")
        ax.set_title("Throughput against concurrency (3 processes, loopback)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png_dir / "throughput.png", dpi=100)
        made.append(("Throughput against concurrency", "throughput.png"))
    plt.close(fig)

    # 2. Latency CDF of the HTTP writes (first run of each cell).
    if http:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for cell in http["cells"]:
            for path, style in (("raft-http", "-"), ("bare", ":")):
                q = cell["runs"][path][0]["q_ms"][:101]
                if q:
                    ax.plot(
                        q, [i / 100 for i in range(101)], style, label=f"{path}, {cell['clients']}"
                    )
        ax.set_xscale("log")
        ax.set_xlabel("latency ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title("POST /write latency CDF (raft-http solid, bare aiohttp dotted; clients)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(png_dir / "latency_cdf.png", dpi=100)
        plt.close(fig)
        made.append(("POST /write latency CDF", "latency_cdf.png"))

    # 3. Failover times.
    fail = load(out, "bench_failover")
    if fail:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [n for n in ("raft-http", "pysyncobj") if fail.get(n)]
        for i, name in enumerate(names):
            ys = [t * 1e3 for t in fail[name]]
            ax.scatter([i + 1] * len(ys), ys, alpha=0.6)
        if names:
            ax.boxplot([[t * 1e3 for t in fail[n]] for n in names])
            ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_ylabel("ms from kill -9 of the leader to the next acknowledged write")
        ax.set_title("Failover")
        ax.grid(True, alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(png_dir / "failover.png", dpi=100)
        plt.close(fig)
        made.append(("Failover times", "failover.png"))

    # 4. RSS of each node over the soak.
    soak = load(out, "bench_soak")
    if soak:
        from bench_soak import plot_rss

        plot_rss(soak["run"], png_dir / "soak_rss.png", f"RSS of 3 nodes: {soak['what']}")
        made.append(("RSS of each node over the soak", "soak_rss.png"))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument(
        "--only",
        nargs="*",
        help="script names to run (default: all); the others keep their section from --out",
    )
    args = parser.parse_args()
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    before = machine_info()
    sections: list[str] = []
    walls: list[str] = []
    failed = []
    for name in BENCHMARKS:
        script = BENCH / name
        if not script.exists():
            continue
        if args.only and name not in args.only:
            # Not re-run: keep the section of an earlier run, if there is one.
            earlier = args.out / f"{script.stem}.md"
            if earlier.exists():
                sections.append(_relative(earlier.read_text()))
            continue
        print(f"== {name} ({size})", flush=True)
        text, wall, ok = run_one(script, size, args.out)
        sections.append(text)
        walls.append(f"{name} {wall:.0f} s")
        if not ok:
            failed.append(name)
            print(text, file=sys.stderr)
    after = machine_info()
    png_dir = args.results.parent
    made = plots(args.out, png_dir)
    m = before
    busy = max(before["loadavg"][0], after["loadavg"][0]) > 0.5 * (os.cpu_count() or 1)
    cmd = " ".join(["python", *sys.argv]).replace(str(BENCH.parent) + "/", "")
    head = [
        "# Benchmark results",
        "",
        "Generated by `bench/run_all.py`; the hand-written reading is in "
        "[READING.md](READING.md) and at the end. Every node, server and load generator is "
        "a process of its own on 127.0.0.1. Each cell is the median (min-max) of its runs; "
        "each ratio is taken between a run and its baseline's run next to it (runs "
        "interleaved), so ratios are what to compare between machines.",
        "",
        f"Command: `{cmd}` ({'; '.join([f'{size} size', *walls])}).",
        "",
        f"Machine: `nproc` = {m['nproc']}, Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"msgspec {m['msgspec']}, PySyncObj {m['pysyncobj']}, uvloop {m['uvloop']}; "
        f"{m['platform']}; {m['date']}.",
        "",
    ]
    if not walls:
        head += [
            "This command ran no benchmark: every section below is kept from its own run,"
            " and gives that run's command, time and load average.",
            "",
        ]
    else:
        head += [
            f"Load average (1 min) before: {before['loadavg'][0]}, after: "
            f"{after['loadavg'][0]}."
            + (
                " **The machine was shared with other work while measuring**: absolute "
                "figures are low and noisy; the interleaved ratios are the figures to read."
                if busy
                else ""
            ),
            "",
        ]
    if made:
        head += ["## Plots", ""] + [f"- [{t}]({f})" for t, f in made] + [""]
        head += [f"![{t}]({f})" for t, f in made] + [""]
    reading = BENCH / "READING.md"
    tail = ["", reading.read_text()] if reading.exists() else []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(head) + "\n" + "\n".join(sections) + "\n".join(tail))
    print(f"wrote {args.results} ({len(sections)} sections, {len(made)} plots)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
