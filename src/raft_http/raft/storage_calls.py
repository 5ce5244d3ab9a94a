"""Storage calls are never cut short: a task inside one is cancelled only once it returns.

A store does its work in a worker thread (SQLite, snapshot files, a state machine's
files), and cancelling the task that awaits it does not stop that thread: the task
would end while the write goes on, and ``Raft.shutdown`` would return with files still
being written. So the node cancels its tasks through ``cancel``, which waits for the
end of the storage call the task is in, if any; and ``drain`` waits until no call is
running and refuses new ones.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from ..errors import Fatal

_T = TypeVar("_T")


class StorageCalls:
    """The storage calls of one node that have not returned yet, by the task making them."""

    def __init__(self) -> None:
        self._inside: collections.Counter[asyncio.Task[Any] | None] = collections.Counter()
        self._cancel_after: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._refusal: str | None = None

    @property
    def running(self) -> int:
        """How many calls have started and not yet returned."""
        return self._inside.total()

    def guard(self, target: _T) -> _T:
        """``target`` (a store, a state machine) whose coroutine methods are tracked calls."""
        return cast(_T, _Guarded(target, self))

    def cancel(self, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` now, or as soon as the storage call it is in returns."""
        if self._inside[task]:
            self._cancel_after.add(task)
        else:
            task.cancel()

    async def run(self, call: Coroutine[Any, Any, _T]) -> _T:
        if self._refusal is not None:
            call.close()
            raise Fatal(self._refusal)
        task = asyncio.current_task()
        self._inside[task] += 1
        self._idle.clear()
        try:
            return await call
        finally:
            self._inside[task] -= 1
            if not self._inside[task]:
                del self._inside[task]
                if task in self._cancel_after:
                    self._cancel_after.discard(task)
                    task.cancel()  # raised at the task's next await, the result kept
            if not self._inside:
                self._idle.set()

    async def drain(self, refusal: str) -> None:
        """Refuse new calls (``Fatal(refusal)``) and wait until the running ones return."""
        self._refusal = refusal
        await self._idle.wait()


class _Guarded:
    """A proxy: coroutine methods go through ``StorageCalls.run``, the rest passes through."""

    def __init__(self, target: object, calls: StorageCalls) -> None:
        self._target = target
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        run = self._calls.run
        method = cast(Callable[..., Coroutine[Any, Any, Any]], attr)

        async def tracked(*args: Any, **kwargs: Any) -> Any:
            return await run(method(*args, **kwargs))

        return tracked

    def __repr__(self) -> str:
        return f"<tracked {self._target!r}>"
