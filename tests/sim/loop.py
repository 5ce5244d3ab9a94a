"""An asyncio event loop on virtual time, in one thread, with a deterministic schedule.

After the ``looptime`` library's idea, in a few lines: ``time()`` is a virtual clock,
and when the loop would block in ``select(timeout)`` (nothing ready, a timer due
later) the clock jumps to that timer instead of sleeping. Nothing real runs
alongside: ``run_in_executor`` (hence ``asyncio.to_thread``) runs the function at
once, in the loop's thread.

What else it takes for a seed to replay a run event for event:
- tasks and futures hash by creation order, not by address, so a set of them
  (``asyncio.wait``'s ``done``, a node's task set it cancels on a crash) iterates
  in the same order every run;
- ``after_step`` runs after every loop iteration, for invariant checks.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is pending: every task waits forever."""


class _VirtualSelector(selectors.SelectSelector):
    """Never polls a file descriptor: a wait with a timeout advances the clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._virtual_loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Deadlock(f"at virtual time {self._virtual_loop.time():.6f}")
        if timeout > 0:
            self._virtual_loop.advance(timeout)
        return []


class _SeqTask(asyncio.Task[T]):
    """A task whose hash is its creation number (see the module docstring)."""

    _seq = 0

    def __hash__(self) -> int:
        return self._seq


class _SeqFuture(asyncio.Future[T]):
    _seq = 0

    def __hash__(self) -> int:
        return self._seq


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when every task is waiting for a timer."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._counter = itertools.count(1)
        self.after_step: Callable[[], None] | None = None
        self.steps = 0
        self._parked: set[asyncio.Future[None]] = set()
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def _run_once(self) -> None:
        super()._run_once()  # type: ignore[misc]
        self.steps += 1
        if self.after_step is not None:
            self.after_step()

    def create_task(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        self._check_closed()  # type: ignore[attr-defined]
        task = _SeqTask(coro, loop=self, name=name, context=context)
        task._seq = next(self._counter)
        return task

    def create_future(self) -> asyncio.Future[Any]:
        future: _SeqFuture[Any] = _SeqFuture(loop=self)
        future._seq = next(self._counter)
        return future

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # handed to the awaiting task
            future.set_exception(exc)
        return future


async def park_forever() -> None:
    """Wait until cancelled. The loop holds the future, so the waiting task is never
    garbage-collected while pending ("Task was destroyed but it is pending")."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    parked: set[asyncio.Future[None]] | None = getattr(loop, "_parked", None)
    if parked is not None:
        parked.add(future)
        future.add_done_callback(parked.discard)
    await future


def run_virtual(main: Coroutine[Any, Any, T], loop: VirtualTimeLoop | None = None) -> T:
    """Run ``main`` to completion on a (new) virtual-time loop; cancel what it left running."""
    loop = loop or VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.after_step = None
        try:
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            leftover.sort(key=hash)
            for task in leftover:
                task.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
