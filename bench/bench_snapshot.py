"""A full snapshot over HTTP against a raw streamed aiohttp upload, every side in its own process.

    python bench/bench_snapshot.py [--quick | --smoke] [--runs N] [--mib N]

``raft-http``: ``HttpNetwork.full_snapshot`` (a sender process) of a file to
``raft_app`` (a receiver process) whose handler installs at once: the server spools
the body to a file as it arrives, checks its sha256 and hands the file over.
``raw``: an aiohttp POST of the same file, read in the same chunks (3 MiB, the
client's default) and sent with a ``Content-Length`` as the client does, to a bare
aiohttp handler that writes each chunk (``iter_chunked(256 KiB)``, the server's read
unit) to a file as it arrives, from the loop. Runs alternate between the two, each
pair with fresh processes; the ratio is taken within a pair. Peak RSS growth is each
process's ``ru_maxrss`` at the end minus its RSS just before the transfer; a second
table gives it at other send chunk sizes (one interleaved pair each).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 1024 * 1024
SEND_CHUNK = 3 * MiB
MEMORY_CHUNKS = (1 * MiB, 8 * MiB)  # besides SEND_CHUNK: peak RSS growth at each
READ_CHUNK = 256 * 1024
SIZES_MIB = {"full": 1024, "quick": 256, "smoke": 8}


# --- the child processes ---------------------------------------------------------------


def _rss() -> int:
    """Resident bytes now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(kind: str, port: int, spool: Path) -> None:
    """A receiver: ``raft`` (raft_app) or ``raw`` (write each chunk as it arrives)."""
    from aiohttp import web

    from raft_http.server import raft_app
    from raft_http.types import LeaderId, Snapshot, SnapshotResponse, Vote

    vote = Vote(LeaderId(1, 1), True)

    class InstallAtOnce:
        """A handler whose install costs nothing: what is measured is the transfer."""

        def current_vote(self) -> Vote:
            return vote

        async def append_entries(self, rpc: Any) -> Any:
            raise NotImplementedError

        async def vote(self, rpc: Any) -> Any:
            raise NotImplementedError

        async def install_full_snapshot(self, v: Vote, snapshot: Snapshot) -> SnapshotResponse:
            assert snapshot.sha256 is not None  # the server checked it
            return SnapshotResponse(v)

    async def raw_upload(request: web.Request) -> web.Response:
        path = spool / "raw-upload"
        received = 0
        with open(path, "wb") as f:
            async for piece in request.content.iter_chunked(READ_CHUNK):
                f.write(piece)
                received += len(piece)
        path.unlink()
        return web.json_response({"received": received})

    before = _rss()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"rss_before": before, "peak_rss": _peak_rss()})

    if kind == "raft":
        app = raft_app(InstallAtOnce(), spool_dir=spool)  # type: ignore[arg-type]
    else:
        app = web.Application()
        app.router.add_post("/snapshot", raw_upload)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def _send(kind: str, url: str, path: Path, sha256: str, chunk: int) -> dict[str, Any]:
    import aiohttp

    from raft_http.client import HttpNetworkFactory
    from raft_http.network import RPCOption
    from raft_http.types import (
        LeaderId,
        LogId,
        Membership,
        Node,
        Snapshot,
        SnapshotMeta,
        StoredMembership,
        Vote,
    )

    size = path.stat().st_size
    before = _rss()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if kind == "raft":
        vote = Vote(LeaderId(1, 1), True)
        membership = StoredMembership(None, Membership([[1]], {1: Node(url)}))
        meta = SnapshotMeta(LogId(LeaderId(1, 1), 10), membership, f"bench-{time.time_ns()}")
        async with HttpNetworkFactory() as factory:
            client = factory.new_client(1, Node(url))
            with open(path, "rb") as data:
                never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                answer = await client.full_snapshot(
                    vote,
                    Snapshot(meta, data, sha256=sha256),
                    never,
                    RPCOption(hard_ttl=60.0, snapshot_chunk_size=chunk),
                )
        assert answer.vote == vote, answer
    else:

        async def body() -> Any:
            with open(path, "rb") as f:
                while piece := f.read(chunk):
                    yield piece

        timeout = aiohttp.ClientTimeout(total=None)
        length = {"Content-Length": str(size)}  # as HttpNetwork sends: no chunked framing
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{url}/snapshot", data=body(), headers=length) as resp,
        ):
            answer = await resp.json()
            assert answer == {"received": size}, answer
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "bytes": size,
        "sender_cpu": time.process_time() - cpu0,
        "rss_before": before,
        "peak_rss": _peak_rss(),
    }


def send(kind: str, url: str, path: Path, sha256: str, chunk: int) -> None:
    print(json.dumps(asyncio.run(_send(kind, url, path, sha256, chunk))), flush=True)


# --- the benchmark ---------------------------------------------------------------------


def _make_file(path: Path, mib: int) -> str:
    """``mib`` MiB of random bytes (incompressible, nothing cached in the pattern); sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def _get_json(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def one_run(
    kids: Any, kind: str, path: Path, sha256: str, spool: Path, chunk: int = SEND_CHUNK
) -> dict[str, Any]:
    from _harness import cpu_seconds, free_ports, run_json, wait_port

    (port,) = free_ports(1)
    me = str(Path(__file__).resolve())
    receiver = kids.spawn(
        f"receiver-{kind}", [sys.executable, me, "serve", kind, str(port), str(spool)]
    )
    try:
        wait_port(port, receiver)
        url = f"http://127.0.0.1:{port}"
        cpu0 = cpu_seconds(receiver.pid)
        result = run_json(
            [sys.executable, me, "send", kind, url, str(path), sha256, str(chunk)], timeout=600
        )
        result["receiver_cpu"] = cpu_seconds(receiver.pid) - cpu0
        stats = _get_json(f"{url}/stats")
        result["receiver_growth"] = stats["peak_rss"] - stats["rss_before"]
        result["sender_growth"] = result["peak_rss"] - result["rss_before"]
        result["mb_s"] = result["bytes"] / result["seconds"] / 1e6
        result["send_chunk"] = chunk
    finally:
        receiver.kill()
        receiver.wait(timeout=10)
    return result


def main() -> None:
    from _harness import Children, Report, fmt_spread, parse_args

    def extra(parser: Any) -> None:
        parser.add_argument("--mib", type=int, help="file size in MiB (default by size)")
        parser.add_argument(
            "--dir",
            type=Path,
            default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
            help="where the file and both receivers' uploads go (default: /dev/shm, a tmpfs, "
            "so the disk is not what is measured)",
        )

    args, size = parse_args(__doc__, extra=extra)
    mib = args.mib or SIZES_MIB[size.name]
    runs = max(size.runs, 1)
    report = Report(
        "bench_snapshot", size, "full_snapshot: HttpNetwork + raft_app vs a raw aiohttp upload"
    )
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir=args.dir) as tmp:
        work = Path(tmp)
        path = work / "snapshot.bin"
        sha256 = _make_file(path, mib)
        spool = work / "spool"
        spool.mkdir()
        results: dict[str, list[dict[str, Any]]] = {"raft-http": [], "raw": []}
        by_chunk: dict[str, list[dict[str, Any]]] = {"raft-http": [], "raw": []}
        with Children(args.out / "logs") as kids:
            for r in range(runs):
                order = ["raw", "raft-http"] if r % 2 else ["raft-http", "raw"]
                for name in order:
                    kind = "raft" if name == "raft-http" else "raw"
                    results[name].append(one_run(kids, kind, path, sha256, spool))
            for i, chunk in enumerate(MEMORY_CHUNKS):
                order = ["raw", "raft-http"] if i % 2 else ["raft-http", "raw"]
                for name in order:
                    kind = "raft" if name == "raft-http" else "raw"
                    by_chunk[name].append(one_run(kids, kind, path, sha256, spool, chunk))
    report.data = {
        "mib": mib,
        "dir": str(args.dir),
        "send_chunk": SEND_CHUNK,
        "read_chunk": READ_CHUNK,
        **results,
        "by_chunk": by_chunk,
    }
    ours, base = results["raft-http"], results["raw"]
    ratios = [a["mb_s"] / b["mb_s"] for a, b in zip(ours, base, strict=True)]

    def per_gib(x: dict[str, Any], key: str) -> float:
        return float(x[key] / (x["bytes"] / 1024**3))

    def row(name: str, rs: list[dict[str, Any]], ratio: str) -> list[str]:
        return [
            name,
            fmt_spread([x["mb_s"] for x in rs]),
            ratio,
            fmt_spread([per_gib(x, "receiver_cpu") for x in rs]),
            fmt_spread([per_gib(x, "sender_cpu") for x in rs]),
            fmt_spread([x["sender_growth"] / MiB for x in rs]),
            fmt_spread([x["receiver_growth"] / MiB for x in rs]),
        ]

    report.table(
        f"A {mib} MiB snapshot, sender and receiver in separate processes",
        [
            "path",
            "MB/s",
            "x raw",
            "receiver CPU s/GiB",
            "sender CPU s/GiB",
            "sender peak RSS growth MiB",
            "receiver peak RSS growth MiB",
        ],
        [row("raft-http", ours, fmt_spread(ratios)), row("raw", base, "1")],
        f"Median (min-max) of {runs} interleaved runs, fresh processes each; chunks of "
        f"{SEND_CHUNK // MiB} MiB sent (both with a Content-Length), {READ_CHUNK // 1024} KiB "
        "read; files in "
        f"{args.dir or tempfile.gettempdir()}. raft-http verifies the sha256 of the whole file; "
        "raw does not hash. CPU is seconds of CPU (user + system, all threads) per GiB moved: "
        "it varies less with how busy the machine is than MB/s do, but still does (the "
        "neighbours share caches and memory bandwidth).",
    )
    memory_rows = []
    for chunk in (SEND_CHUNK, *MEMORY_CHUNKS):
        for name in ("raft-http", "raw"):
            rs = [x for x in results[name] + by_chunk[name] if x["send_chunk"] == chunk]
            memory_rows.append(
                [
                    f"{chunk // MiB} MiB",
                    name,
                    fmt_spread([x["mb_s"] for x in rs]),
                    fmt_spread([x["sender_growth"] / MiB for x in rs]),
                    fmt_spread([x["receiver_growth"] / MiB for x in rs]),
                    fmt_spread([x["sender_growth"] / chunk for x in rs]),
                    fmt_spread([x["receiver_growth"] / chunk for x in rs]),
                ]
            )
    report.table(
        "Peak RSS growth by send chunk size",
        [
            "send chunk",
            "path",
            "MB/s",
            "sender MiB",
            "receiver MiB",
            "sender in chunks",
            "receiver in chunks",
        ],
        memory_rows,
        f"The {SEND_CHUNK // MiB} MiB rows are the main table's runs; the others one "
        f"interleaved pair each. Growth is peak RSS (ru_maxrss) minus RSS before the "
        f"transfer, in MiB and in send chunks. The receiver reads {READ_CHUNK // 1024} KiB "
        "units whatever the sender's chunk; raft-http's spools them in 2 MiB batches.",
    )
    report.save(args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        main()
