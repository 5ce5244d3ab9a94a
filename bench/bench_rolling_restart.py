"""Rolling restart under a steady write load: the longest write gap, with and without transfer.

Three ``raft-http node`` processes on 127.0.0.1; the orchestrator keeps ``--writers``
clients writing (following 307s, retrying refused connections and 503s at once, on
another node). Then it restarts each node in turn with SIGTERM, waits until the node
is back and caught up, and lets the load run a little before the next one. The same
run is made twice, interleaved round by round: with the default SIGTERM behaviour (a
leader hands its leadership over first) and with ``--transfer-timeout 0`` (a leader
just stops, and the others elect a new one after an election timeout).

Reported per mode: the longest gap between two acknowledged writes during the
restarts (the median and range over rounds), how many restarts hit the leader, the
elections that were not transfers, and writes/s. The baseline is the other mode of
the same run.

    python bench/bench_rolling_restart.py [--quick] [--rounds N] [--writers N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ProcessCluster, Report, fmt_spread, parse_args

IDS = (1, 2, 3)
JSON = {"Content-Type": "application/json"}
MODES: dict[str, list[str]] = {
    "transfer on SIGTERM": [],
    "no transfer (--transfer-timeout 0)": ["--transfer-timeout", "0"],
}
ELECTION = re.compile(r"starts election for term (\d+)( \(leadership transfer\))?")


class Load:
    """``writers`` clients writing as fast as the cluster acknowledges; records each ack time."""

    def __init__(self, addrs: dict[int, str], writers: int) -> None:
        self.addrs = addrs
        self.writers = writers
        self.acked: list[float] = []
        self.failed = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._writer(session, w) for w in range(self.writers)))

    async def _writer(self, session: aiohttp.ClientSession, w: int) -> None:
        nodes = list(self.addrs)
        node = nodes[w % len(nodes)]
        url = f"http://{self.addrs[node]}/write"
        i = 0
        while not self.stop.is_set():
            body = b'{"Set":{"key":"w%d-%d","value":"v"}}' % (w, i)
            try:
                async with session.post(
                    url, data=body, headers=JSON, allow_redirects=False
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.acked.append(time.monotonic())
                        i += 1
                        continue
                    if resp.status == 307:
                        url = resp.headers["Location"]
                        continue
            except (aiohttp.ClientError, TimeoutError):
                pass
            # Refused, timed out, 503: try another node at once (a client's ordinary retry).
            self.failed += 1
            node = random.choice([n for n in nodes if n != node])
            url = f"http://{self.addrs[node]}/write"
            await asyncio.sleep(0.002)


def longest_gap(times: list[float], start: float, end: float) -> float:
    inside = sorted(t for t in times if start <= t <= end)
    points = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))


def restart_all(
    cluster: ProcessCluster, settle: float, only_leader: bool
) -> tuple[list[tuple[bool, float, float]], list[str]]:
    """SIGTERM and restart each node (or just the leader) in turn.

    Returns, per restart, (whether it was leading, when SIGTERM was sent, when it was
    back and caught up), and notes.
    """
    windows = []
    notes = []
    for node in IDS:
        leader = cluster.wait_leader(timeout=20)
        if only_leader:
            node = leader
        stopped = time.monotonic()
        code = cluster.terminate(node, timeout=20)
        if code != 0:
            notes.append(f"node {node} exited {code}")
        cluster.start(node)
        cluster.wait_leader(timeout=20)
        target = cluster.applied(cluster.wait_leader(timeout=20))
        cluster.wait_applied([node], target, timeout=30)
        windows.append((node == leader, stopped, time.monotonic()))
        time.sleep(settle)
        if only_leader:
            break
    return windows, notes


def elections(cluster: ProcessCluster) -> tuple[int, int]:
    """(elections by transfer, other elections) started, from the nodes' logs."""
    transfers = others = 0
    for node in IDS:
        path = cluster.log_path(node)
        for m in ELECTION.finditer(path.read_text() if path.exists() else ""):
            if m.group(2):
                transfers += 1
            else:
                others += 1
    return transfers, others


async def one_round(
    root: Path, extra: list[str], writers: int, settle: float, only_leader: bool
) -> dict[str, Any]:
    cluster = ProcessCluster(root, IDS, extra)
    try:
        cluster.start_all()
        cluster.call(1, "/init", [[n, cluster.addr(n)] for n in IDS])
        cluster.wait_leader()
        base_transfers, base_others = elections(cluster)
        load = Load({n: cluster.addr(n) for n in IDS}, writers)
        loading = asyncio.create_task(load.run())
        await asyncio.sleep(settle)
        start = time.monotonic()
        windows, notes = await asyncio.to_thread(restart_all, cluster, settle, only_leader)
        end = time.monotonic()
        load.stop.set()
        await loading
        transfers, others = elections(cluster)
        done = [t for t in load.acked if start <= t <= end]
        gaps = [(lead, longest_gap(load.acked, a, b)) for lead, a, b in windows]
        return {
            "gap": longest_gap(load.acked, start, end),
            "leader_gaps": [g for lead, g in gaps if lead],
            "follower_gaps": [g for lead, g in gaps if not lead],
            "writes_per_s": len(done) / (end - start),
            "hit_leader": len([g for lead, g in gaps if lead]),
            "transfers": transfers - base_transfers,
            "elections": others - base_others,
            "retries": load.failed,
            "notes": notes,
        }
    finally:
        await asyncio.to_thread(cluster.close)


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rounds", type=int, help="rounds per mode (default 3, quick 1)")
        parser.add_argument("--writers", type=int, default=16, help="concurrent writers")
        parser.add_argument("--keep", type=Path, help="keep the nodes' data and logs here")

    args, size = parse_args(__doc__, extra=extra)
    rounds = args.rounds or (1 if size.name != "full" else 3)
    settle = 1.0 if size.name == "full" else 0.3
    report = Report(
        "bench_rolling_restart", size, "Rolling restart of 3 node processes under writes"
    )
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-rolling-") as scratch:
        tmp = args.keep or scratch
        for r in range(rounds):
            for i, (mode, extra_args) in enumerate(MODES.items()):
                root = Path(tmp) / f"r{r}-m{i}"
                root.mkdir()
                smoke = size.name == "smoke"  # CI: only the leader restarts, once per mode
                run = one_round(root, extra_args, args.writers, settle, smoke)
                results[mode].append(asyncio.run(run))
    rows = []
    for mode, runs in results.items():
        rows.append(
            [
                mode,
                fmt_spread([run["gap"] * 1000 for run in runs]),
                fmt_spread([g * 1000 for run in runs for g in run["leader_gaps"]]),
                fmt_spread([g * 1000 for run in runs for g in run["follower_gaps"]]),
                fmt_spread([run["writes_per_s"] for run in runs]),
                sum(run["hit_leader"] for run in runs),
                sum(run["transfers"] for run in runs),
                sum(run["elections"] for run in runs),
                sum(run["retries"] for run in runs),
            ]
        )
    report.table(
        f"{args.writers} writers, "
        + ("the leader restarted once" if size.name == "smoke" else "each node restarted once")
        + f" per round, {rounds} round(s)",
        [
            "SIGTERM behaviour",
            "longest write gap ms",
            "per leader restart ms",
            "per follower restart ms",
            "writes/s",
            "leader restarts",
            "transfers",
            "other elections",
            "client retries",
        ],
        rows,
        note="Gap: the longest time without an acknowledged write while nodes restart "
        "(median and range over rounds), then per restart of a node that was leading or "
        "following (SIGTERM until it is back and caught up; median and range over "
        "restarts). Elections counted from the nodes' logs.",
    )
    gaps = {mode: sorted(run["gap"] for run in runs) for mode, runs in results.items()}
    with_t, without = (gaps[m][len(gaps[m]) // 2] for m in MODES)
    report.text(f"Longest gap with transfer / without: {with_t / without:.2f}")
    notes = [n for runs in results.values() for run in runs for n in run["notes"]]
    if notes:
        report.text("Notes: " + "; ".join(notes))
    report.data = {"results": results}
    report.save(args.out)


if __name__ == "__main__":
    main()
