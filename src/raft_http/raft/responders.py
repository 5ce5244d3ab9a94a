"""The fate of every client write, decided in one place.

A write is *queued* until the leader puts it in its log, then *in the log* at a log id
until its index is applied (or the node stops). What the client is told:

========================================  =======================================
what happened                             outcome
========================================  =======================================
its entry is applied at its log id        ``ClientWriteResponse`` (committed)
its index is applied with another entry   ``WriteAborted``: it was not applied
leadership lost while it was queued       ``ForwardToLeader``: it was not proposed
leadership lost once it was in the log    nothing yet: a later leader may commit
                                          it (then applied: success) or not
                                          (another entry applied: ``WriteAborted``)
a snapshot installed over its index       ``WriteOutcomeUnknown``
no index left in the log                  ``NotAllowed``: it was not proposed
the node stops (shutdown, fail)           ``Fatal``: queued ones were not
                                          proposed; the others may still commit
========================================  =======================================

An entry overwritten on the node that proposed it is not decided then: another node
may hold it and commit it as a later leader. Only the entry applied at its index
decides, which every node learns in log order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from msgspec import Struct

from ..errors import Fatal
from ..types import LogId
from .errors import ForwardToLeader, NotAllowed, WriteAborted, WriteOutcomeUnknown


class ClientWriteResponse(Struct, frozen=True):
    """A committed and applied write: where it sits in the log and what the state machine said."""

    log_id: LogId
    data: Any = None


Responder = asyncio.Future[ClientWriteResponse]


class Responders:
    """The client futures of one node: queued ones, and those in the log by index."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queued: dict[Responder, None] = {}  # a set that keeps insertion order
        self._in_log: dict[int, tuple[LogId, Responder]] = {}

    def __len__(self) -> int:
        return len(self._queued) + len(self._in_log)

    def new(self) -> Responder:
        """A future for a write about to be queued for the leader's log."""
        future: Responder = self._loop.create_future()
        self._queued[future] = None
        return future

    def in_log(self, log_id: LogId, future: Responder) -> None:
        """The write's entry is in the log at ``log_id``: its index's apply decides it."""
        self._queued.pop(future, None)
        self._in_log[log_id.index] = (log_id, future)

    def waiting(self) -> list[tuple[LogId, Responder]]:
        """The writes in the log whose outcome is not decided yet."""
        return list(self._in_log.values())

    def applied(self, log_id: LogId, response: Any) -> None:
        """The entry ``log_id`` was applied: its write committed, another at its index did not."""
        waiter = self._in_log.pop(log_id.index, None)
        if waiter is None:
            return
        expected, future = waiter
        if expected == log_id:
            _resolve(future, ClientWriteResponse(log_id, response))
        else:
            overwritten = f"another leader overwrote entry {expected}: {log_id} is committed"
            _refuse(future, WriteAborted(overwritten))

    def leader_lost(self) -> None:
        """This node stopped leading: the queued writes were not proposed; send them on."""
        self._refuse_queued(lambda: ForwardToLeader(None, None))

    def log_full(self, futures: list[Responder], max_index: int) -> None:
        """No index is left for these queued writes: refused, not proposed."""
        for future in futures:
            self._queued.pop(future, None)
            _refuse(future, NotAllowed(f"the log is full: no index past {max_index}"))

    def snapshot_installed(self, last: LogId) -> None:
        """A snapshot up to ``last`` replaced the log: the node no longer knows what was
        applied at those indexes."""
        for index in [i for i in self._in_log if i <= last.index]:
            _, future = self._in_log.pop(index)
            _refuse(future, WriteOutcomeUnknown("a snapshot was installed over the entry"))

    def stop(self, reason: str) -> None:
        """The node stops: every write not yet decided gets ``Fatal(reason)``."""
        self._refuse_queued(lambda: Fatal(reason))
        in_log, self._in_log = self._in_log, {}
        for _, future in in_log.values():
            _refuse(future, Fatal(reason))

    def _refuse_queued(self, error: Callable[[], BaseException]) -> None:
        queued, self._queued = self._queued, {}
        for future in queued:
            _refuse(future, error())


def _resolve(future: Responder, response: ClientWriteResponse) -> None:
    if not future.done():
        future.set_result(response)


def _refuse(future: Responder, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
