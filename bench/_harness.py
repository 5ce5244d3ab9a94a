"""What every separate-process benchmark shares: sizes, child processes, statistics, reports.

Nodes, servers and load generators each run in a process of their own (as users
deploy them); the orchestrating script only starts them, interleaves the runs of
a cell with the runs of its baseline, and writes the tables. Every child dies
with the orchestrator (PR_SET_PDEATHSIG) and is killed on exit; every wait is
bounded in time.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TESTS = ROOT / "tests"
RESULTS_DIR = BENCH / "results"
HOST = "127.0.0.1"

if str(TESTS) not in sys.path:  # reuse the tests' cluster helpers instead of copying them
    sys.path.insert(0, str(TESTS))

from cluster_helpers import ProcessCluster, free_ports  # noqa: E402

__all__ = [
    "BENCH",
    "HOST",
    "ROOT",
    "Children",
    "LoadGen",
    "ProcessCluster",
    "Report",
    "Size",
    "cpu_seconds",
    "free_ports",
    "machine_info",
    "parse_args",
    "pq",
    "run_json",
    "spread",
    "wait_port",
]


# --- sizes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How big a run is: ``full`` for RESULTS.md, ``quick`` under a minute, ``smoke`` for CI."""

    name: str
    runs: int
    seconds: float  # one measured run of one cell
    scale: float  # multiplies counts (trials, writes ...)

    @property
    def label(self) -> str:
        return "" if self.name == "full" else f" ({self.name})"


SIZES = {
    "full": Size("full", runs=3, seconds=3.0, scale=1.0),
    "quick": Size("quick", runs=3, seconds=0.6, scale=0.2),
    "smoke": Size("smoke", runs=1, seconds=0.2, scale=0.02),
}


def parse_args(
    description: str | None, argv: Sequence[str] | None = None, *, extra: Any = None
) -> tuple[argparse.Namespace, Size]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="every cell, short runs: < 1 min")
    parser.add_argument("--smoke", action="store_true", help="the CI size: runs, measures nothing")
    parser.add_argument("--runs", type=int, help="runs per cell (default: 3, smoke: 1)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="where NAME.md and NAME.json go"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.runs:
        size = Size(size.name, args.runs, size.seconds, size.scale)
    return args, size


# --- machine ------------------------------------------------------------------------


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "-"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "msgspec": _version("msgspec"),
        "pysyncobj": _version("pysyncobj"),
        "uvloop": _version("uvloop"),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# --- child processes ----------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Children:
    """The processes one benchmark started; all killed by ``close()``, at exit and on SIGTERM."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.close)
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE if stdin is not None else log,
                stderr=log,
                stdin=stdin,
                env=env,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    """Until something accepts on ``127.0.0.1:port``; fails if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            try:
                s.connect((HOST, port))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class LoadGen:
    """A load generator process kept for many runs: one JSON line of argv in, one result out."""

    def __init__(self, kids: Children, name: str, uvloop: bool = False) -> None:
        argv = [sys.executable, str(BENCH / "_loadgen.py"), "--stdin"]
        if uvloop:
            argv.append("--uvloop")
        self.proc = kids.spawn(name, argv, stdin=subprocess.PIPE)
        self.name = name
        self.log_dir = kids.log_dir

    def run(self, argv: Sequence[str], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(list(argv)) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            log = (self.log_dir / f"{self.name}.log").read_text(errors="replace")
            tail = "\n".join(log.splitlines()[-8:])
            raise RuntimeError(f"load generator {self.name} gave no answer; its log ends:\n{tail}")
        result: dict[str, Any] = json.loads(line)
        return result


def run_json(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a load generator (a process of its own) and return the JSON it prints last."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=_die_with_parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{argv!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- statistics ---------------------------------------------------------------------


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max (NaN when empty)."""
    vals = [v for v in values if v == v]
    if not vals:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(vals), min(vals), max(vals)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def fmt_spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of a cell's runs; just the value for a single run."""
    med, lo, hi = spread(values)
    if len(values) <= 1 or med != med:
        return fmt(med)
    return f"{fmt(med)} ({fmt(lo)}-{fmt(hi)})"


def quantiles(samples: Sequence[float]) -> list[float]:
    """The 0th..100th percentiles (nearest rank) then p99.9: enough for a CDF and a table."""
    if not samples:
        return []
    s = sorted(samples)
    n = len(s) - 1
    return [s[round(q * n / 100)] for q in range(101)] + [s[round(0.999 * n)]]


def command_line() -> str:
    """How this script was run, with paths relative to the repository."""
    argv = [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    return " ".join(["python", *argv])


def pq(run: dict[str, Any], percentile: int) -> float:
    """A run's latency percentile in ms (NaN when nothing completed)."""
    q = run.get("q_ms") or []
    return float(q[percentile]) if len(q) > percentile else float("nan")


# --- reports ------------------------------------------------------------------------


@dataclass
class Report:
    """The tables of one benchmark: printed, and saved as NAME.md and NAME.json."""

    name: str
    size: Size
    title: str
    command: str = field(default_factory=lambda: command_line())
    machine: dict[str, Any] = field(default_factory=machine_info)
    parts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def table(
        self, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = ""
    ) -> None:
        cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
        lines = [f"### {title}", ""]
        if note:
            lines += [note, ""]
        lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines[-1] += " |"
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in cells:
            lines.append(
                "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
            )
        text = "\n".join(lines) + "\n"
        self.parts.append(text)
        print(text, flush=True)

    def text(self, text: str) -> None:
        self.parts.append(text + "\n")
        print(text, flush=True)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        m = self.machine
        head = (
            f"## {self.title}{self.size.label}\n\n"
            f"Command: `{self.command}` ({time.monotonic() - self.started:.0f} s, {m['date']}, "
            f"load average at start {m['loadavg'][0]})\n"
        )
        (out / f"{self.name}.md").write_text(head + "\n" + "\n".join(self.parts))
        doc = {
            "name": self.name,
            "size": self.size.name,
            "command": self.command,
            "machine": m,
            "seconds": time.monotonic() - self.started,
            "data": self.data,
        }
        (out / f"{self.name}.json").write_text(json.dumps(doc, indent=1))
