"""The errors of the network contract, after Openraft's ``RPCError`` and ``StreamingError``.

Each class tells the caller what to do next:

- ``Unreachable``: the node is down or cannot be connected to; sleep on
  ``RaftNetwork.backoff()`` before trying again.
- ``Timeout`` / ``NetworkError``: this attempt failed; retry (the next heartbeat will).
- ``PayloadTooLarge``: send fewer entries (``entries_hint``) or fewer bytes.
- ``RemoteError``: the remote Raft answered with an error of its own (``source``);
  a ``Fatal`` one means that node has stopped.
- ``Closed``: the caller cancelled a snapshot stream; stop.

``RPCError`` is what ``append_entries``/``vote``/``install_snapshot`` raise;
``StreamingError`` is what ``full_snapshot`` raises. The kinds both can raise
(timeout, unreachable, network, remote) inherit from both, so ``except Unreachable``
works everywhere.
"""

from __future__ import annotations

from typing import Any

from .types import Node, SnapshotMeta


class RaftHttpError(Exception):
    """Base of every error this package raises on purpose."""


# --- Errors raised by a Raft node (carried to the caller in RemoteError) -------------


class RaftError(RaftHttpError):
    """An error of the Raft node itself, as opposed to the network."""


class Fatal(RaftError):
    """The node has stopped (storage failure, panic, shutdown): do not retry it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class APIError(RaftError):
    """A Raft API refused the request (not leader, not initialized, bad membership ...)."""

    def __init__(self, kind: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.data = data


class InvalidRequest(RaftError):
    """The request is malformed, or contradicts what the node has committed (a 400).

    No honest leader sends it: retrying it as it stands is pointless, and the node that
    refused it keeps running with its state unchanged.
    """


class SnapshotRejected(RaftError):
    """The state machine could not install the snapshot's data (a 422).

    Nothing changed on the receiver: its state machine, log and snapshot files are as
    they were. The sender may retry later, or rebuild the snapshot.
    """


class InstallSnapshotError(RaftError):
    """The deprecated per-chunk snapshot protocol was misused."""


class SnapshotMismatch(InstallSnapshotError):
    """A chunk does not continue what the receiver holds (Openraft's ``SnapshotMismatch``).

    ``expect`` and ``got`` are ``(snapshot_id, offset)`` segment ids: resend from ``expect``.
    """

    def __init__(self, expect: tuple[str, int], got: tuple[str, int]) -> None:
        super().__init__(f"snapshot segment mismatch: expect {expect}, got {got}")
        self.expect = expect
        self.got = got


# --- Errors of the network contract -------------------------------------------------


class RPCError(RaftHttpError):
    """An RPC to one target failed; see the subclasses for what to do."""

    def __init__(self, message: str, *, target: int | None = None) -> None:
        super().__init__(message)
        self.target = target


class StreamingError(RaftHttpError):
    """``full_snapshot`` failed; see the subclasses for what to do."""


class Timeout(RPCError, StreamingError):
    """No answer within the RPC's deadline (``RPCOption.hard_ttl``): retry."""

    def __init__(self, action: str, target: int | None, timeout: float) -> None:
        super().__init__(f"{action} to node {target} timed out after {timeout:g}s", target=target)
        self.action = action
        self.timeout = timeout


class Unreachable(RPCError, StreamingError):
    """The target could not be reached at all: back off before the next try."""


class NetworkError(RPCError, StreamingError):
    """The request may or may not have arrived (reset mid-way, garbled answer): retry."""


class PayloadTooLarge(RPCError):
    """The target refused the request's size: send less.

    ``entries_hint`` is how many entries to send next time (at least 1);
    ``bytes_hint`` is the target's byte limit, when it said so.
    """

    def __init__(
        self,
        action: str,
        *,
        entries_hint: int,
        bytes_hint: int | None = None,
        target: int | None = None,
    ) -> None:
        hint = f"; limit {bytes_hint} bytes" if bytes_hint is not None else ""
        super().__init__(
            f"{action} to node {target} too large: retry with at most {entries_hint} entries{hint}",
            target=target,
        )
        self.action = action
        self.entries_hint = max(1, entries_hint)
        self.bytes_hint = bytes_hint


class RemoteError(RPCError, StreamingError):
    """The target's Raft answered with an error of its own, in ``source``."""

    def __init__(self, target: int | None, node: Node | None, source: RaftError) -> None:
        super().__init__(f"node {target} answered: {source}", target=target)
        self.node = node
        self.source = source


class ReplicationClosed(RaftHttpError):
    """Why a snapshot stream was cancelled; the value a ``cancel`` awaitable resolves to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Closed(StreamingError):
    """The caller cancelled the snapshot stream (its ``cancel`` completed)."""

    def __init__(self, closed: ReplicationClosed) -> None:
        super().__init__(f"snapshot replication closed: {closed.reason}")
        self.closed = closed


class SnapshotTransferError(StreamingError):
    """The snapshot could not be sent as it stands (e.g. its file is shorter than announced)."""

    def __init__(self, meta: SnapshotMeta, message: str) -> None:
        super().__init__(message)
        self.meta = meta
