"""``--baseline-ref REV``: run the same cluster from an earlier commit, in the same run.

A temporary ``git worktree`` of REV is made beside the repository; its node processes
run with the same interpreter and venv as ours, with ``PYTHONPATH`` set to that tree's
``src`` so that ``raft_http`` is imported from it (checked before any figure is taken).
The worktree is removed at the end. Only the node processes come from REV: the load
generator, the harness and the bare server are the current ones, so both sides get the
same clients.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _harness import ProcessCluster

REPO = Path(__file__).resolve().parent.parent


def describe(ref: str) -> str:
    """``<short hash> <subject>`` of ``ref`` (for the report)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h %s", ref],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@contextlib.contextmanager
def baseline_src(ref: str) -> Iterator[Path]:
    """A detached worktree of ``ref`` for as long as the block runs; yields its ``src``."""
    with tempfile.TemporaryDirectory(prefix="raft-http-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), ref],
            check=True,
        )
        try:
            src = tree / "src"
            found = subprocess.run(
                [sys.executable, "-c", "import raft_http; print(raft_http.__file__)"],
                env={**os.environ, "PYTHONPATH": str(src)},
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            if not Path(found).resolve().is_relative_to(src.resolve()):
                raise RuntimeError(f"PYTHONPATH={src} still imports raft_http from {found}")
            yield src
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )


class BaselineCluster(ProcessCluster):
    """A ``ProcessCluster`` whose node processes import ``raft_http`` from ``src``."""

    def __init__(self, root: Path, node_ids: list[int], extra_args: list[str], src: Path) -> None:
        super().__init__(root, node_ids, extra_args)
        self.src = src

    def command(self, node_id: int) -> list[str]:
        return ["env", f"PYTHONPATH={self.src}", *super().command(node_id)]
