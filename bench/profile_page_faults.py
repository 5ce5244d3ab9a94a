"""Page faults per AppendEntries on the receiver, with glibc's default heap trimming and without.

    python bench/profile_page_faults.py [--payload 300x1k] [--clients 1] [--rounds 2]

Runs ``_servers.py raft-null`` and ``bare`` (as ``bench_append.py`` does), each twice per
round: with the environment as it is, and with ``GLIBC_TUNABLES`` raising glibc's mmap and
trim thresholds (so freed heap memory is kept for the next request instead of being
returned to the kernel and faulted in again). Prints, per server, the calls/s, p50, CPU
microseconds and minor page faults per request (``/proc/PID/stat``). Linux and glibc only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import BENCH, Children, LoadGen, cpu_seconds, free_ports, wait_port
from _loadgen import PAYLOADS

SIDES = {"raft-null": ("append-http", ""), "bare": ("append-bare", "/append")}
TUNED = "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=33554432"


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--payload", choices=list(PAYLOADS), default="300x1k")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    print(f"payload {args.payload}, {args.clients} in flight, {args.seconds:g} s per run")
    print("server     heap      calls/s  p50 ms  server us/req  minor faults/req")
    with Children(Path("/tmp/profile_page_faults")) as kids:
        gen = LoadGen(kids, "loadgen-faults")
        for _ in range(args.rounds):
            for kind in ("raft-null", "bare"):
                for heap in ("default", "tuned"):
                    env = dict(os.environ)
                    if heap == "tuned":
                        env["GLIBC_TUNABLES"] = TUNED
                    (port,) = free_ports(1)
                    argv = [sys.executable, str(BENCH / "_servers.py"), kind, "--port", str(port)]
                    server = kids.spawn(f"{kind}-{heap}", argv, env=env)
                    wait_port(port, server)
                    mode, path = SIDES[kind]
                    cpu0, faults0 = cpu_seconds(server.pid), minor_faults(server.pid)
                    result = gen.run(
                        [
                            mode,
                            "--url",
                            f"http://127.0.0.1:{port}{path}",
                            "--payload",
                            args.payload,
                            "-c",
                            str(args.clients),
                            "--seconds",
                            str(args.seconds),
                        ],
                        timeout=60 + args.seconds,
                    )
                    calls = result["calls"] + 50  # and the warm-up
                    cpu = (cpu_seconds(server.pid) - cpu0) / calls * 1e6
                    faults = (minor_faults(server.pid) - faults0) / calls
                    p50 = result["q_ms"][49]
                    print(
                        f"{kind:<10} {heap:<8} {result['rate']:>8,.0f} {p50:>7.2f}"
                        f" {cpu:>14,.0f} {faults:>17.1f}",
                        flush=True,
                    )
                    server.kill()
                    server.wait()


if __name__ == "__main__":
    main()
