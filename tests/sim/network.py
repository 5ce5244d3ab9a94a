"""A simulated network over ``MemoryRouter``: delay, reorder, drop, duplicate, partitions.

Messages still go through the wire codecs (``MemoryNetwork`` encodes and decodes
each one), so nothing is shared between nodes. Each node incarnation sends through
its own factory: once a node crashed, what its old incarnation sends is lost, and
a reply from a node that crashed while handling the request never arrives.

- delay: every request and every reply travels for a random virtual time, mostly
  short, sometimes longer than the sender's deadline;
- reorder: falls out of the delays (a retry overtakes a slow first copy) and of
  duplicates arriving late;
- drop: a lost request or reply leaves the caller waiting until its deadline;
- duplicate: an AppendEntries or vote request is delivered again later, and its
  answer thrown away;
- partitions (both ways or one way) and heal: ``MemoryRouter``'s own faults.
  A message cut off is dropped silently (a real partition times out); one sent
  to a node that is down is refused (``Unreachable``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from raft_http.errors import RaftError, RemoteError, Unreachable
from raft_http.network import RaftHandler
from raft_http.testing import MemoryNetwork, MemoryNetworkFactory, MemoryRouter
from raft_http.types import Node

from .loop import park_forever


@dataclass
class NetworkFaults:
    """The random faults in force; the nemesis changes them during a run."""

    drop: float = 0.0
    duplicate: float = 0.0
    slow: float = 0.0  # share of messages that take 50 ms .. 1.5 s
    min_delay: float = 0.0005
    max_delay: float = 0.005


class SimRouter(MemoryRouter):
    """Delivers each message after a random delay, or loses it; records a trace of deliveries."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(backoff_seconds=0.05)
        self.rng = rng
        self.faults = NetworkFaults()
        self.incarnation: dict[int, int] = {}  # node id -> incarnation up now
        self.trace = hashlib.blake2b(digest_size=16)
        self.counts: collections.Counter[str] = collections.Counter()
        self._background: set[asyncio.Task[None]] = set()

    def factory_for(self, node_id: int, incarnation: int) -> SimNetworkFactory:
        return SimNetworkFactory(self, node_id, incarnation)

    def up(self, node_id: int, incarnation: int, handler: RaftHandler) -> None:
        self.incarnation[node_id] = incarnation
        self.register(node_id, handler)

    def down(self, node_id: int) -> None:
        self.incarnation.pop(node_id, None)
        self.unregister(node_id)

    def _delay(self) -> float:
        f = self.faults
        if self.rng.random() < f.slow:
            return self.rng.uniform(0.05, 1.5)
        return self.rng.uniform(f.min_delay, f.max_delay)

    def _lost(self) -> bool:
        return self.rng.random() < self.faults.drop

    async def deliver_from(
        self,
        incarnation: int,
        source: int,
        target: int,
        action: str,
        call: Callable[[RaftHandler], Awaitable[bytes]],
    ) -> bytes:
        if self.incarnation.get(source) != incarnation:
            await park_forever()  # a crashed node sends nothing
        await asyncio.sleep(self._delay())
        if not self.can_send(source, target) or self._lost():
            self.counts["dropped"] += 1
            await park_forever()
        handler = self._handlers.get(target)
        target_incarnation = self.incarnation.get(target)
        if handler is None:
            self.counts["refused"] += 1
            raise Unreachable(f"{action}: node {target} is down", target=target)
        if action in ("append_entries", "vote") and self.rng.random() < self.faults.duplicate:
            self._duplicate(target, call)
        try:
            reply = await call(handler)
        except RaftError as exc:  # e.g. Fatal: the target has stopped
            raise RemoteError(target, None, exc) from exc
        if self.incarnation.get(target) != target_incarnation:
            await park_forever()  # it crashed before answering
        await asyncio.sleep(self._delay())
        if not self.can_send(target, source) or self._lost():
            self.counts["dropped"] += 1
            await park_forever()
        if self.incarnation.get(source) != incarnation:
            await park_forever()
        self.counts[action] += 1
        now = asyncio.get_running_loop().time()
        self.trace.update(f"{now!r} {source}->{target} {action} ".encode() + reply)
        return reply

    def _duplicate(self, target: int, call: Callable[[RaftHandler], Awaitable[bytes]]) -> None:
        self.counts["duplicated"] += 1

        async def again() -> None:
            await asyncio.sleep(self._delay() + self.rng.uniform(0, 0.3))
            handler = self._handlers.get(target)
            if handler is not None:
                with contextlib.suppress(Exception):
                    await call(handler)

        task = asyncio.get_running_loop().create_task(again())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _IncarnationRouter:
    """What a ``MemoryNetwork`` needs of its router, for one incarnation of one node."""

    def __init__(self, router: SimRouter, incarnation: int) -> None:
        self.router = router
        self.incarnation = incarnation
        self.sent = router.sent
        self.backoff_seconds = router.backoff_seconds

    async def _deliver(
        self,
        source: int,
        target: int,
        action: str,
        entries: int | None,
        call: Callable[[RaftHandler], Awaitable[bytes]],
    ) -> bytes:
        return await self.router.deliver_from(self.incarnation, source, target, action, call)


class SimNetworkFactory(MemoryNetworkFactory):
    def __init__(self, router: SimRouter, source: int, incarnation: int) -> None:
        super().__init__(router, source)
        self._proxy: Any = _IncarnationRouter(router, incarnation)

    def new_client(self, target: int, node: Node) -> MemoryNetwork:
        return MemoryNetwork(self._proxy, self.source, target, node)
