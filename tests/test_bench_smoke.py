"""The benchmarks still run: each one with ``--quick`` exits 0 and prints its tables.

No timing assertions: benchmark figures live in bench/RESULTS.md, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_quick(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize(
    ("script", "titles"),
    [
        (
            "bench_transport.py",
            [
                "### Heartbeats (empty AppendEntries)",
                "### AppendEntries throughput",
                "### full_snapshot upload",
                "### Heartbeat latency to the node receiving a snapshot",
            ],
        ),
        (
            "bench_cluster.py",
            ["### Client writes, 3 nodes in one process", "### Time to a new confirmed leader"],
        ),
    ],
)
def test_quick_run_prints_its_tables(script: str, titles: list[str]) -> None:
    out = run_quick(script)
    for title in titles:
        assert title in out, f"{script} did not print {title!r}:\n{out}"
        # the table under the title has a header separator and at least one data row
        after = out.split(title, 1)[1].splitlines()
        rows = [line for line in after[:20] if line.startswith("|")]
        assert len(rows) >= 3, f"{script}: table {title!r} is empty:\n{out}"
    assert "machine: python" in out
