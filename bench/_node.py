"""``raft-http node`` plus a control port, so a load can run INSIDE the node's process.

    python bench/_node.py --control-port C node --id 1 --listen 127.0.0.1:P --data-dir D

Everything after ``--control-port C`` is the ``raft-http node`` command line, run by
the CLI's own code. The control port answers ``POST /load {"writers": N, "seconds":
S}``: N tasks in this process call ``client_write`` back to back (the way an embedding
application would), and the answer is what they measured. ``POST /memory`` answers the
RSS and what the in-memory log holds. ``POST /snapshot`` builds a
snapshot of what this node applied and waits until the log is purged behind it;
``POST /malloc-trim`` asks glibc to hand freed memory back (``malloc_trim(0)``). Both
answer the RSS before and after, so a soak can tell what each gives back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import quantiles
from _kvload import rss_mb

from raft_http.kv import cli
from raft_http.types import log_index

WRITE_TIMEOUT = 10.0
"""As the KV API's default --write-timeout: a write not done this long after the run's
end counts as refused, and its writer stops."""


class BenchNode(cli.KVNode):
    """The CLI's node, with a control server next to it on the same event loop."""

    control_port = 0

    async def start(self) -> None:
        await super().start()
        app = web.Application()
        app.router.add_post("/load", self._load)
        app.router.add_post("/snapshot", self._snapshot)
        app.router.add_post("/memory", self._memory)
        app.router.add_post("/malloc-trim", self._malloc_trim)
        self._control = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._control.setup()
        await web.TCPSite(self._control, "127.0.0.1", self.control_port).start()

    async def stop(self) -> None:
        control = getattr(self, "_control", None)
        if control is not None:
            await control.cleanup()
        await super().stop()

    async def _load(self, request: web.Request) -> web.Response:
        spec: dict[str, Any] = await request.json()
        return web.json_response(await self.load(int(spec["writers"]), float(spec["seconds"])))

    async def _snapshot(self, request: web.Request) -> web.Response:
        raft = self.raft
        rss_before = rss_mb(os.getpid())
        started = time.perf_counter()
        target = log_index(raft.metrics().last_applied)
        keep = raft.config.max_in_snapshot_log_to_keep

        def purged_behind(m: Any) -> bool:
            built = log_index(m.snapshot)
            return built >= target and log_index(m.purged) >= built - keep

        for _ in range(30):  # a snapshot being built when asked may end before ``target``
            await raft.trigger_snapshot()
            try:
                metrics = await raft.wait_for(purged_behind, 2.0, "snapshot and purge")
                break
            except TimeoutError:
                continue
        else:
            raise web.HTTPServiceUnavailable(text="no snapshot and purge in 60 s")
        await asyncio.sleep(0.2)  # the snapshot's background task lets go of its buffers
        return web.json_response(
            {
                "snapshot": log_index(metrics.snapshot),
                "purged": log_index(metrics.purged),
                "seconds": time.perf_counter() - started,
                "rss_before": rss_before,
                "rss_after": rss_mb(os.getpid()),
            }
        )

    async def _memory(self, request: web.Request) -> web.Response:
        log = self.raft.log
        return web.json_response(
            {
                "rss": rss_mb(os.getpid()),
                "log_entries": len(log),
                "log_held": log.last_index + 1 - log.first_held,
                "log_held_bytes": log.held_bytes,
            }
        )

    async def _malloc_trim(self, request: web.Request) -> web.Response:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "malloc_trim"):
            raise web.HTTPNotImplemented(text="no glibc malloc_trim here")
        rss_before = rss_mb(os.getpid())
        started = time.perf_counter()
        released = libc.malloc_trim(0)
        return web.json_response(
            {
                "released": bool(released),
                "seconds": time.perf_counter() - started,
                "rss_before": rss_before,
                "rss_after": rss_mb(os.getpid()),
            }
        )

    async def load(self, writers: int, seconds: float) -> dict[str, Any]:
        raft = getattr(self, "raft", None) or self._raft  # _raft: before 2026-12 (a baseline)
        tag = time.time_ns() % 10**9
        latencies: list[float] = []
        errors: dict[str, int] = {}
        next_i = 0
        stop_at = time.perf_counter() + seconds

        async def writer() -> None:
            # One deadline per writer, not a timer per write: PySyncObj's harness
            # (_pso_node.py) sets none per write either, and at 1,024 writers a timer per
            # write was 8 % of the leader's Python time (py-spy --gil), which is the
            # harness's cost, not the library's.
            try:
                async with asyncio.timeout(seconds + WRITE_TIMEOUT):
                    await writes()
            except TimeoutError:  # a write still undone WRITE_TIMEOUT after the run ended
                errors["TimeoutError"] = errors.get("TimeoutError", 0) + 1

        async def writes() -> None:
            nonlocal next_i
            while time.perf_counter() < stop_at:
                i = next_i
                next_i += 1
                data = b'{"Set":{"key":"w%d-%d","value":"v"}}' % (tag, i)
                t0 = time.perf_counter()
                try:
                    await raft.client_write(data)
                except Exception as e:  # counted, not timed: not leader, aborted ...
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - start
        return {
            "calls": len(latencies),
            "seconds": elapsed,
            "rate": len(latencies) / elapsed,
            "cpu": (time.process_time() - cpu0) / elapsed,
            "q_ms": [q * 1e3 for q in quantiles(latencies)],
            "errors": errors,
        }


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--uvloop"]:
        import uvloop

        argv = argv[1:]
        uvloop.install()
    if argv[:1] != ["--control-port"]:
        sys.exit("usage: _node.py [--uvloop] --control-port C node ...")
    BenchNode.control_port = int(argv[1])
    cli.KVNode = BenchNode  # type: ignore[misc]
    return cli.main(argv[2:])


if __name__ == "__main__":
    sys.exit(main())
