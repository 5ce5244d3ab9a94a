"""AppendEntries over HTTP against bare aiohttp, every side in its own process.

    python bench/bench_append.py [--quick | --smoke] [--runs N]

Cells: a heartbeat, 100 entries of 100 B and 300 entries of 1 KiB; one call at a
time and 64 in flight. ``raft-http`` is ``HttpNetwork.append_entries`` (a load
generator process) against ``raft_app`` with a handler that answers at once (a
server process); ``bare`` POSTs the same bytes with a bare aiohttp session to a
handler that only reads the body and answers a fixed JSON document. Runs of a
cell and its baseline alternate; each ratio is taken within one pair of runs.
Also reported: the encode and decode cost per entry, in-process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    BENCH,
    Children,
    LoadGen,
    Report,
    Size,
    cpu_seconds,
    fmt_spread,
    free_ports,
    parse_args,
    pq,
    spread,
    wait_port,
)
from _loadgen import PAYLOADS, append_request

from raft_http.types import APPEND_ENTRIES_REQUEST

PY = sys.executable
CONCURRENCY = (1, 64)


def codec_costs(report: Report, size: Size) -> None:
    """Microseconds per entry to encode (sender) and decode (receiver) one request."""
    rows = []
    for payload, (n, _) in PAYLOADS.items():
        if n == 0:
            continue
        rpc = append_request(payload)
        body = APPEND_ENTRIES_REQUEST.encode(rpc)
        reps = max(20, int(2000 * size.scale))
        enc: list[float] = []
        dec: list[float] = []
        for _ in range(max(3, size.runs)):
            t0 = time.perf_counter()
            for _ in range(reps):
                APPEND_ENTRIES_REQUEST.encode(rpc)
            t1 = time.perf_counter()
            for _ in range(reps):
                APPEND_ENTRIES_REQUEST.decode(body)
            t2 = time.perf_counter()
            enc.append((t1 - t0) / reps / n * 1e6)
            dec.append((t2 - t1) / reps / n * 1e6)
        mb = len(body) / 1e6
        rows.append(
            [
                payload,
                "json",
                len(body),
                fmt_spread(enc),
                fmt_spread(dec),
                mb / (spread(enc)[0] * n / 1e6),
                mb / (spread(dec)[0] * n / 1e6),
            ]
        )
        report.data.setdefault("codec", []).append(
            {
                "payload": payload,
                "encoding": "json",
                "bytes": len(body),
                "enc_us": enc,
                "dec_us": dec,
            }
        )
    report.table(
        "Encode and decode cost per entry (one process, no HTTP)",
        [
            "payload",
            "encoding",
            "body bytes",
            "encode us/entry",
            "decode us/entry",
            "encode MB/s",
            "decode MB/s",
        ],
        rows,
        "`APPEND_ENTRIES_REQUEST.encode(rpc)` on the sender, `.decode(body)` (typed, with range "
        "checks) on the receiver; median (min-max) of runs.",
    )


def main() -> None:
    args, size = parse_args(__doc__)
    report = Report("bench_append", size, "AppendEntries: HttpNetwork + raft_app vs bare aiohttp")
    raft_port, bare_port = free_ports(2)
    with Children(args.out / "logs") as kids:
        raft = kids.spawn(
            "raft-null", [PY, str(BENCH / "_servers.py"), "raft-null", "--port", str(raft_port)]
        )
        bare = kids.spawn(
            "bare", [PY, str(BENCH / "_servers.py"), "bare", "--port", str(bare_port)]
        )
        wait_port(raft_port, raft)
        wait_port(bare_port, bare)
        targets = {
            "raft-http": ("append-http", f"http://127.0.0.1:{raft_port}", raft.pid),
            "bare": ("append-bare", f"http://127.0.0.1:{bare_port}/append", bare.pid),
        }
        gens = {path: LoadGen(kids, f"loadgen-{path}") for path in targets}
        cells: list[dict[str, Any]] = []
        for payload in PAYLOADS:
            for conc in CONCURRENCY:
                runs: dict[str, list[dict[str, Any]]] = {"raft-http": [], "bare": []}
                for r in range(size.runs):
                    order = ["bare", "raft-http"] if r % 2 else ["raft-http", "bare"]
                    for path in order:
                        mode, url, pid = targets[path]
                        cpu0 = cpu_seconds(pid)
                        result = gens[path].run(
                            [
                                mode,
                                "--url",
                                url,
                                "--payload",
                                payload,
                                "-c",
                                str(conc),
                                "--seconds",
                                str(size.seconds),
                            ],
                            timeout=60 + size.seconds,
                        )
                        result["server_cpu"] = (cpu_seconds(pid) - cpu0) / result["seconds"]
                        runs[path].append(result)
                cells.append({"payload": payload, "concurrency": conc, "runs": runs})
        report.data["cells"] = cells

    rows = []
    for cell in cells:
        ours, base = cell["runs"]["raft-http"], cell["runs"]["bare"]
        n = PAYLOADS[cell["payload"]][0]
        ratios = [a["rate"] / b["rate"] for a, b in zip(ours, base, strict=True)]
        rows.append(
            [
                cell["payload"],
                cell["concurrency"],
                fmt_spread([r["rate"] for r in ours]),
                fmt_spread([r["rate"] for r in base]),
                fmt_spread(ratios),
                fmt_spread([pq(r, 50) for r in ours])
                + " / "
                + fmt_spread([pq(r, 99) for r in ours]),
                fmt_spread([pq(r, 50) for r in base])
                + " / "
                + fmt_spread([pq(r, 99) for r in base]),
                f"{spread([r['server_cpu'] for r in ours])[0]:.0%} / "
                f"{spread([r['cpu'] for r in ours])[0]:.0%}",
                f"{spread([r['server_cpu'] for r in base])[0]:.0%} / "
                f"{spread([r['cpu'] for r in base])[0]:.0%}",
                fmt_spread([r["rate"] * n for r in ours]) if n else "-",
            ]
        )
    report.table(
        "AppendEntries calls/s, separate processes",
        [
            "payload",
            "in flight",
            "raft-http calls/s",
            "bare calls/s",
            "x bare",
            "raft-http p50 / p99 ms",
            "bare p50 / p99 ms",
            "raft-http CPU server / client",
            "bare CPU server / client",
            "raft-http entries/s",
        ],
        rows,
        f"Median (min-max) of {size.runs} interleaved runs of {size.seconds:g} s each; "
        "CPU is the share of one core each process used during the run.",
    )
    codec_costs(report, size)
    report.save(args.out)


if __name__ == "__main__":
    main()
