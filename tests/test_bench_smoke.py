"""The benchmarks still run: ``bench/run_all.py --smoke`` runs every one and writes its tables.

No timing assertions: benchmark figures live in bench/RESULTS.md, not in tests. The
smoke size runs each cell once and briefly, with every process a benchmark needs
(nodes, servers, load generators, PySyncObj) started and killed for real.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# Each benchmark script and tables its section must hold.
EXPECTED = {
    "bench_append.py": [
        "### AppendEntries calls/s, separate processes",
        "### Encode and decode cost per entry",
    ],
    "bench_http_write.py": [
        "### POST /write, 3 node processes (fsync on) vs bare aiohttp",
        "### Where a write's CPU goes",
    ],
    "bench_client_write.py": ["### Writes inside the leader's process"],
    "bench_failover.py": ["### Time from kill -9 of the leader"],
    "bench_catchup.py": ["### Follower restarted behind a purged log"],
    "bench_transport.py": ["### full_snapshot upload"],
    "bench_soak.py": ["### RSS MB per node", "### Writes and elections"],
}
PLOTS = ("throughput.png", "latency_cdf.png", "failover.png", "soak_rss.png")


def tables_under(text: str, title: str) -> list[str]:
    after = text.split(title, 1)[1].splitlines()
    return [line for line in after[:30] if line.startswith("|")]


@pytest.mark.timeout(600)
def test_run_all_smoke_writes_every_table(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, f"run_all failed:\n{proc.stdout}\n{proc.stderr}"
    text = results.read_text()
    assert "FAILED" not in text, text
    assert "Machine: `nproc` =" in text
    for script, titles in EXPECTED.items():
        if not (BENCH / script).exists():
            continue
        for title in titles:
            assert title in text, f"{script}: no {title!r} in RESULTS.md:\n{text}"
            rows = tables_under(text, title)
            # a header, its separator and at least one data row
            assert len(rows) >= 3, f"{script}: table {title!r} is empty:\n{text}"
    if importlib.util.find_spec("matplotlib") is not None:
        for png in PLOTS:
            assert f"({png})" in text, f"RESULTS.md links no {png}"
            assert (tmp_path / png).stat().st_size > 0


@pytest.mark.timeout(300)
def test_http_write_runs_a_baseline_ref_beside_the_current_tree(tmp_path: Path) -> None:
    """``--baseline-ref``: a second cluster from a worktree of the ref, and its ratio table."""
    repo = BENCH.parent
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_http_write.py"),
            "--smoke",
            "--clients",
            "1",
            "--baseline-ref",
            "HEAD",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"bench_http_write failed:\n{proc.stdout}\n{proc.stderr}"
    text = (tmp_path / "bench_http_write.md").read_text()
    rows = tables_under(text, "### POST /write, raft-http vs the baseline")
    assert len(rows) == 3, text  # header, separator, the one cell
    assert rows[2].split("|")[1].strip() == "1"
    worktrees = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "raft-http-baseline-" not in worktrees  # removed again
