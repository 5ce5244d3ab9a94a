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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

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

from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    AppendEntriesRequest,
    Blank,
    LogId,
    MembershipChange,
    Normal,
    Vote,
)

PY = sys.executable
CONCURRENCY = (1, 64)


class _BinNormal(msgspec.Struct, frozen=True, tag="normal"):
    data: bytes


class _BinEntry(msgspec.Struct, frozen=True):
    log_id: LogId
    payload: Blank | _BinNormal | MembershipChange


class _BinAppend(msgspec.Struct, frozen=True):
    """The same request in msgpack, each command as ``bin``: what a binary wire would decode."""

    vote: Vote
    prev_log_id: LogId | None
    entries: list[_BinEntry]
    leader_commit: LogId | None


_BIN_DECODER = msgspec.msgpack.Decoder(_BinAppend)
_BIN_ENCODER = msgspec.msgpack.Encoder()


def _as_bin(rpc: AppendEntriesRequest) -> _BinAppend:
    entries = [
        _BinEntry(e.log_id, _BinNormal(bytes(e.payload.data)))
        for e in rpc.entries
        if isinstance(e.payload, Normal)
    ]
    return _BinAppend(rpc.vote, rpc.prev_log_id, entries, rpc.leader_commit)


def _per_entry(fn: Callable[[], object], reps: int, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps / n * 1e6


def codec_costs(report: Report, size: Size) -> None:
    """Microseconds per entry to encode (sender) and decode (receiver) one request.

    Beside the JSON codec the transport uses, the same request as msgpack (commands as
    ``bin``), to show what a binary encoding would save; it is not a wire format here.
    """
    rows = []
    for payload, (n, _) in PAYLOADS.items():
        if n == 0:
            continue
        rpc = append_request(payload)
        binary = _as_bin(rpc)
        codecs: dict[str, tuple[Callable[[], object], Callable[[], object], int]] = {}
        body = APPEND_ENTRIES_REQUEST.encode(rpc)
        packed = _BIN_ENCODER.encode(binary)
        codecs["json (the wire)"] = (
            lambda rpc=rpc: APPEND_ENTRIES_REQUEST.encode(rpc),
            lambda body=body: APPEND_ENTRIES_REQUEST.decode(body),
            len(body),
        )
        codecs["msgpack (for comparison)"] = (
            lambda binary=binary: _BIN_ENCODER.encode(binary),
            lambda packed=packed: _BIN_DECODER.decode(packed),
            len(packed),
        )
        reps = max(20, int(300 * size.scale))
        results: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in codecs}
        for _ in range(max(3, size.runs)):
            for name, (enc, dec, _) in codecs.items():  # interleaved
                results[name][0].append(_per_entry(enc, reps, n))
                results[name][1].append(_per_entry(dec, reps, n))
        for name, (enc_us, dec_us) in results.items():
            nbytes = codecs[name][2]
            json_dec = results["json (the wire)"][1]
            rows.append(
                [
                    payload,
                    name,
                    nbytes,
                    fmt_spread(enc_us),
                    fmt_spread(dec_us),
                    fmt_spread([j / d for j, d in zip(json_dec, dec_us, strict=True)]),
                    nbytes / 1e6 / (spread(dec_us)[0] * n / 1e6),
                ]
            )
            report.data.setdefault("codec", []).append(
                {
                    "payload": payload,
                    "encoding": name,
                    "bytes": nbytes,
                    "enc_us": enc_us,
                    "dec_us": dec_us,
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
            "decode speed-up vs json",
            "decode MB/s",
        ],
        rows,
        "`APPEND_ENTRIES_REQUEST.encode(rpc)` on the sender, `.decode(body)` (typed, with range "
        "checks) on the receiver; msgpack: the same Structs with each command as `bin`, typed "
        "decode. Median (min-max) of runs, codecs interleaved.",
    )


def main() -> None:
    args, size = parse_args(
        __doc__,
        extra=lambda p: p.add_argument(
            "--uvloop",
            action="store_true",
            help="also run every cell with uvloop in servers and load generators (interleaved)",
        ),
    )
    report = Report("bench_append", size, "AppendEntries: HttpNetwork + raft_app vs bare aiohttp")
    loops = ["asyncio", "uvloop"] if args.uvloop else ["asyncio"]
    with Children(args.out / "logs") as kids:
        targets: dict[str, tuple[str, str, int]] = {}
        gens: dict[str, LoadGen] = {}
        for loop in loops:
            flag = ["--uvloop"] if loop == "uvloop" else []
            suffix = "" if loop == "asyncio" else f" {loop}"
            raft_port, bare_port = free_ports(2)
            raft = kids.spawn(
                f"raft-null{suffix}",
                [PY, str(BENCH / "_servers.py"), "raft-null", "--port", str(raft_port), *flag],
            )
            bare = kids.spawn(
                f"bare{suffix}",
                [PY, str(BENCH / "_servers.py"), "bare", "--port", str(bare_port), *flag],
            )
            wait_port(raft_port, raft)
            wait_port(bare_port, bare)
            targets[f"raft-http{suffix}"] = (
                "append-http",
                f"http://127.0.0.1:{raft_port}",
                raft.pid,
            )
            targets[f"bare{suffix}"] = (
                "append-bare",
                f"http://127.0.0.1:{bare_port}/append",
                bare.pid,
            )
        for path in targets:
            gens[path] = LoadGen(kids, f"loadgen-{path.replace(' ', '-')}", "uvloop" in path)
        cells: list[dict[str, Any]] = []
        for payload in PAYLOADS:
            for conc in CONCURRENCY:
                runs: dict[str, list[dict[str, Any]]] = {path: [] for path in targets}
                for r in range(size.runs):
                    order = list(targets)
                    if r % 2:
                        order.reverse()
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
    if args.uvloop:
        uv_rows = []
        for cell in cells:
            runs = cell["runs"]

            def x(a: str, b: str, runs: dict[str, list[dict[str, Any]]] = runs) -> str:
                pairs = zip(runs[a], runs[b], strict=True)
                return fmt_spread([p["rate"] / q["rate"] for p, q in pairs])

            uv_rows.append(
                [
                    cell["payload"],
                    cell["concurrency"],
                    fmt_spread([r["rate"] for r in runs["raft-http uvloop"]]),
                    x("raft-http uvloop", "raft-http"),
                    fmt_spread([r["rate"] for r in runs["bare uvloop"]]),
                    x("bare uvloop", "bare"),
                    x("raft-http uvloop", "bare uvloop"),
                ]
            )
        report.table(
            "The same cells with uvloop (servers and load generators), interleaved with asyncio",
            [
                "payload",
                "in flight",
                "raft-http uvloop calls/s",
                "x raft-http asyncio",
                "bare uvloop calls/s",
                "x bare asyncio",
                "raft-http uvloop x bare uvloop",
            ],
            uv_rows,
        )
    codec_costs(report, size)
    report.save(args.out)


if __name__ == "__main__":
    main()
