"""Run an in-process cluster test on virtual time, so its outcome does not depend on load.

``@on_virtual_time`` turns ``async def test_x(cluster, ...)`` into a plain test that
builds the ``Cluster`` (or takes ``tmp_path``) and runs the body on a fresh
``VirtualTimeLoop``: sleeps, timeouts and election timers take no wall time and
cannot be stretched by a busy machine, and a wait that nothing can ever end fails
at once with ``Deadlock`` instead of hanging.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from raft_cluster import Cluster

from .loop import run_virtual


def on_virtual_time(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    signature = inspect.signature(test)
    wants_cluster = "cluster" in signature.parameters
    params = [p for name, p in signature.parameters.items() if name not in ("cluster", "tmp_path")]
    tmp_path = inspect.Parameter("tmp_path", inspect.Parameter.KEYWORD_ONLY, annotation=Path)

    @functools.wraps(test)
    def run(*args: Any, tmp_path: Path, **kwargs: Any) -> None:
        async def main() -> None:
            if not wants_cluster:
                if "tmp_path" in signature.parameters:
                    kwargs["tmp_path"] = tmp_path
                await test(*args, **kwargs)
                return
            cluster = Cluster(tmp_path)
            try:
                await test(*args, cluster=cluster, **kwargs)
            finally:
                await cluster.close()

        run_virtual(main())

    del run.__wrapped__  # pytest reads the signature below, not the coroutine's
    run.__signature__ = signature.replace(parameters=[*params, tmp_path])  # type: ignore[attr-defined]
    return run
