"""Three-process clusters for the benchmarks: raft-http nodes (with a control port) and PySyncObj.

``RaftCluster`` is the tests' ``ProcessCluster`` (same start, kill and call logic)
running ``bench/_node.py``, i.e. the ``raft-http node`` CLI plus a control port for
loads run inside the node's process. ``PsoCluster`` runs three ``_pso_node.py``
processes. Both are killed by ``close()`` (and die with the benchmark).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _harness import BENCH, Children, ProcessCluster, free_ports

IDS = (1, 2, 3)


class RaftCluster(ProcessCluster):
    """Three ``raft-http node`` processes (fsync on), each with a control port."""

    def __init__(self, root: Path, extra_args: list[str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, IDS, extra_args or [])
        self.extra_args[self.extra_args.index("info")] = "warning"
        self.control = dict(zip(IDS, free_ports(len(IDS)), strict=True))

    def command(self, node_id: int) -> list[str]:
        cli = super().command(node_id)  # [python, -m, raft_http.kv.cli, node, ...]
        return [
            sys.executable,
            str(BENCH / "_node.py"),
            "--control-port",
            str(self.control[node_id]),
            *cli[3:],
        ]

    def bootstrap(self) -> int:
        self.start_all()
        self.call(1, "/init", [[n, self.addr(n)] for n in IDS], timeout=30)
        return self.wait_leader(timeout=30)

    def load(self, node_id: int, writers: int, seconds: float) -> dict[str, Any]:
        """``writers`` tasks calling ``client_write`` inside node ``node_id``'s process."""
        spec = {"writers": writers, "seconds": seconds}
        return self.control_call(node_id, "/load", spec, timeout=seconds + 120)

    def control_call(
        self, node_id: int, route: str, body: Any = None, timeout: float = 120
    ) -> dict[str, Any]:
        """POST ``body`` (JSON) to a route of node ``node_id``'s control port (``_node.py``)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.control[node_id]}{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result


class PsoCluster:
    """Three PySyncObj processes on 127.0.0.1; ``journal`` None keeps the journal in memory."""

    def __init__(self, kids: Children, root: Path, *, batching: bool, journal: bool) -> None:
        self.kids = kids
        self.root = root
        self.batching = batching
        self.journal = journal
        self.ports = dict(zip(IDS, free_ports(len(IDS)), strict=True))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def addr(self, n: int) -> str:
        return f"127.0.0.1:{self.ports[n]}"

    def start(self, n: int) -> None:
        argv = [
            sys.executable,
            str(BENCH / "_pso_node.py"),
            "--self",
            self.addr(n),
            "--partners",
            ",".join(self.addr(m) for m in IDS if m != n),
        ]
        if self.journal:
            argv += ["--journal", str(self.root / f"pso{n}.journal")]
        if not self.batching:
            argv.append("--no-batching")
        self.procs[n] = self.kids.spawn(f"pso{n}", argv, stdin=subprocess.PIPE)

    def ask(self, n: int, cmd: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        proc = self.procs[n]
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"PySyncObj node {n} did not answer {cmd} (see logs/pso{n}.log)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def running(self) -> list[int]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def leader(self, timeout: float = 30) -> int:
        """The node that says it leads, once every running node is ready and agrees."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answers = {n: self.ask(n, {"cmd": "status"}) for n in self.running()}
            leaders = [n for n, a in answers.items() if a["leader"]]
            addrs = {a["leader_addr"] for a in answers.values()}
            ready = all(a["ready"] for a in answers.values())
            if len(leaders) == 1 and ready and addrs == {self.addr(leaders[0])}:
                return leaders[0]
            time.sleep(0.05)
        raise RuntimeError(f"PySyncObj elected no leader within {timeout:g}s")

    def bootstrap(self) -> int:
        for n in IDS:
            self.start(n)
        return self.leader()

    def kill(self, n: int) -> None:
        self.procs[n].kill()
        self.procs[n].wait(timeout=10)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            p.wait(timeout=10)
