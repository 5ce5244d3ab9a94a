"""A Raft core behind the transport: it speaks to peers only through ``raft_http.network``."""

from .config import Config
from .errors import (
    ForwardToLeader,
    LearnerNotCaughtUp,
    NodeRemoved,
    NotAllowed,
    Overloaded,
    QuorumNotEnough,
    TransferFailed,
    WriteAborted,
    WriteOutcomeUnknown,
)
from .memory_store import MemoryLogStore
from .metrics import RaftMetrics, ServerState
from .node import Raft
from .responders import ClientWriteResponse
from .snapshot_store import SnapshotStore
from .sqlite_store import SqliteLogStore
from .storage import LogState, LogStore, StateMachine, StorageError

__all__ = [
    "ClientWriteResponse",
    "Config",
    "ForwardToLeader",
    "LearnerNotCaughtUp",
    "LogState",
    "LogStore",
    "MemoryLogStore",
    "NodeRemoved",
    "NotAllowed",
    "Overloaded",
    "QuorumNotEnough",
    "Raft",
    "RaftMetrics",
    "ServerState",
    "SnapshotStore",
    "SqliteLogStore",
    "StateMachine",
    "StorageError",
    "TransferFailed",
    "WriteAborted",
    "WriteOutcomeUnknown",
]
