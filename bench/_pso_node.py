"""One PySyncObj node (the peer raft-http is compared with), driven by JSON lines on stdin.

    python bench/_pso_node.py --self 127.0.0.1:P --partners 127.0.0.1:Q,127.0.0.1:R \\
        [--journal FILE] [--no-batching]

A replicated dict with one ``set`` command, the same work as raft-http's KV ``Set``.
Commands (one JSON object per line, one JSON answer per line):
``{"cmd": "status"}``; ``{"cmd": "load", "in_flight": K, "seconds": S}`` (K = 1 is
sequential: ``sync=True`` calls back to back; otherwise K commands in flight with
callbacks); ``{"cmd": "first_write", "since": T}``: write until one succeeds, and
answer the seconds from wall-clock time T (a kill -9 of the leader) to that success.
Without ``--journal`` the journal is in memory; with it, PySyncObj keeps its journal
in a memory-mapped file, which 0.3.17 never fsyncs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import quantiles
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjException, replicated


class KV(SyncObj):  # type: ignore[misc]
    def __init__(self, self_addr: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(self_addr, partners, conf)
        self._data: dict[str, str] = {}

    @replicated  # type: ignore[misc]
    def set(self, key: str, value: str) -> str:
        self._data[key] = value
        return value


def load(obj: KV, in_flight: int, seconds: float) -> dict[str, Any]:
    tag = time.time_ns() % 10**9
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    cpu0 = time.process_time()
    stop_at = start + seconds
    i = 0
    if in_flight == 1:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                obj.set(f"p{tag}-{i}", "v", sync=True, timeout=5)
                latencies.append(time.perf_counter() - t0)
            except SyncObjException as e:
                errors[str(e.errorCode)] = errors.get(str(e.errorCode), 0) + 1
                time.sleep(0.01)
            i += 1
    else:
        slots = threading.Semaphore(in_flight)

        def done(t0: float) -> Any:
            def callback(result: object, error: int) -> None:
                with lock:
                    if error == FAIL_REASON.SUCCESS:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[str(error)] = errors.get(str(error), 0) + 1
                slots.release()

            return callback

        while time.perf_counter() < stop_at:
            if not slots.acquire(timeout=0.5):
                continue
            obj.set(f"p{tag}-{i}", "v", callback=done(time.perf_counter()))
            i += 1
        # Count only what completed within the run; wait (bounded) for the rest to drain.
        with lock:
            elapsed = time.perf_counter() - start
            in_time = list(latencies)
        for _ in range(in_flight):
            if not slots.acquire(timeout=5):
                break
        return _result(in_time, errors, elapsed, cpu0)
    return _result(latencies, errors, time.perf_counter() - start, cpu0)


def _result(
    latencies: list[float], errors: dict[str, int], elapsed: float, cpu0: float
) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed,
        "cpu": (time.process_time() - cpu0) / elapsed,
        "q_ms": [q * 1e3 for q in quantiles(latencies)],
        "errors": errors,
    }


def first_write(obj: KV, since: float, timeout: float = 30.0) -> dict[str, Any]:
    """Write through this (surviving) node until one write succeeds."""
    attempts = 0
    while time.time() - since < timeout:
        attempts += 1
        try:
            obj.set(f"f{time.time_ns()}", "v", sync=True, timeout=0.5)
            return {"seconds": time.time() - since, "attempts": attempts}
        except SyncObjException:
            time.sleep(0.005)
    return {"seconds": None, "attempts": attempts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--self", required=True)
    parser.add_argument("--partners", required=True)
    parser.add_argument("--journal")
    parser.add_argument("--no-batching", action="store_true")
    args = parser.parse_args()
    conf = SyncObjConf(
        appendEntriesUseBatch=not args.no_batching,
        journalFile=args.journal,
        dynamicMembershipChange=False,
    )
    obj = KV(args.self, args.partners.split(","), conf)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "status":
            leader = obj._getLeader()
            answer: dict[str, Any] = {
                "ready": obj.isReady(),
                "leader": obj._isLeader(),
                "leader_addr": None if leader is None else str(leader),
            }
        elif cmd["cmd"] == "load":
            answer = load(obj, int(cmd["in_flight"]), float(cmd["seconds"]))
        else:
            answer = first_write(obj, float(cmd["since"]))
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
