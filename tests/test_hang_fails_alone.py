"""A hanging test must fail on its own and let the rest of the run go on.

pytest-timeout's ``thread`` method ends the whole process at the first hang, so one
stuck test hides every result after it; the ``signal`` method (pyproject.toml) raises in
the stuck test instead. This runs a small suite in a child pytest with this project's
configuration and checks that both kinds of hang (a blocked event loop await and a
blocking call) fail while the tests after them still pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUITE = """
import asyncio
import time


async def test_hangs_in_the_loop():
    await asyncio.Event().wait()


def test_hangs_in_a_blocking_call():
    time.sleep(600)


def test_after_the_hangs_still_runs():
    assert True
"""


def test_a_hanging_test_fails_and_the_run_goes_on(tmp_path: Path) -> None:
    suite = tmp_path / "test_hanging.py"
    suite.write_text(SUITE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-o",
            "timeout=2",
            str(suite),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert re.search(r"\b2 failed, 1 passed\b", out), out
    assert "Timeout" in out, out
