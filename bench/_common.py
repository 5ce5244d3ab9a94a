"""Shared pieces of the benchmarks: servers on free ports, timing helpers, tables, memory probes.

Benchmarks report ratios against a baseline measured in the same run, so the
figures travel between machines better than absolute numbers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

HOST = "127.0.0.1"


def machine() -> str:
    """One line naming what the numbers were measured on."""
    return (
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"msgspec {msgspec.__version__}, {os.cpu_count()} cpus, {platform.platform()}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free 127.0.0.1 port; yields ``host:port``; always cleans up."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for _ in range(20):
            port = free_port()
            site = web.TCPSite(runner, HOST, port)
            try:
                await site.start()
            except OSError:
                continue
            break
        else:
            raise RuntimeError("no free port")
        yield f"{HOST}:{port}"
    finally:
        await runner.cleanup()


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable on a terminal too)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines) + "\n"


def emit(text: str) -> None:
    print(text, flush=True)


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples RSS in a thread every few ms; ``growth`` is the peak above the start."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssPeak:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


class Deadline:
    """A wall-clock budget for a whole benchmark: loops stop early once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self.end


def header(name: str, quick: bool, argv: Sequence[str] | None = None) -> None:
    cmd = " ".join(["python", *(argv if argv is not None else sys.argv)])
    emit(f"# {name}{' (quick)' if quick else ''}\n\n`{cmd}`\n\nmachine: {machine()}\n")


async def sleep0() -> None:
    await asyncio.sleep(0)
