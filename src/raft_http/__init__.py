"""raft_http: a Raft network over HTTP/JSON, after Openraft's ``RaftNetwork``.

The HTTP pieces (``raft_app``, ``HttpNetworkFactory``, ``HttpNetwork``) are
re-exported lazily, so ``import raft_http`` (and the Raft core, which imports the
contract from here) never pulls in aiohttp.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    APIError,
    Closed,
    Fatal,
    InstallSnapshotError,
    InvalidRequest,
    NetworkError,
    PayloadTooLarge,
    RaftError,
    RaftHttpError,
    RemoteError,
    ReplicationClosed,
    RPCError,
    SnapshotMismatch,
    SnapshotRejected,
    SnapshotTransferError,
    StreamingError,
    Timeout,
    Unreachable,
)
from .network import (
    AppendStream,
    Backoff,
    RaftHandler,
    RaftNetwork,
    RaftNetworkFactory,
    RPCOption,
    SerialAppendStream,
)
from .spool import SpoolLimits
from .types import (
    MAX_INDEX,
    MAX_NODE_ID,
    MAX_TERM,
    AppendEntriesRequest,
    AppendEntriesResponse,
    Blank,
    Conflict,
    Entry,
    EntryPayload,
    HigherVote,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    NodeId,
    Normal,
    PartialSuccess,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    TransferLeaderRequest,
    Vote,
    VoteRequest,
    VoteResponse,
)

if TYPE_CHECKING:
    from .client import HttpNetwork, HttpNetworkFactory
    from .server import raft_app

__version__ = "0.1.0"

_LAZY = {
    "HttpNetwork": "client",
    "HttpNetworkFactory": "client",
    "raft_app": "server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "APIError",
    "AppendEntriesRequest",
    "AppendEntriesResponse",
    "AppendStream",
    "Backoff",
    "Blank",
    "Closed",
    "Conflict",
    "Entry",
    "EntryPayload",
    "Fatal",
    "HigherVote",
    "HttpNetwork",
    "HttpNetworkFactory",
    "InstallSnapshotError",
    "InvalidRequest",
    "InstallSnapshotRequest",
    "InstallSnapshotResponse",
    "LeaderId",
    "LogId",
    "MAX_INDEX",
    "MAX_NODE_ID",
    "MAX_TERM",
    "Membership",
    "MembershipChange",
    "NetworkError",
    "Node",
    "NodeId",
    "Normal",
    "PartialSuccess",
    "PayloadTooLarge",
    "RPCError",
    "RPCOption",
    "RaftError",
    "RaftHandler",
    "RaftHttpError",
    "RaftNetwork",
    "RaftNetworkFactory",
    "RemoteError",
    "ReplicationClosed",
    "SerialAppendStream",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotMismatch",
    "SnapshotRejected",
    "SnapshotResponse",
    "SnapshotTransferError",
    "SpoolLimits",
    "StoredMembership",
    "StreamingError",
    "Success",
    "Timeout",
    "TransferLeaderRequest",
    "Unreachable",
    "Vote",
    "VoteRequest",
    "VoteResponse",
    "__version__",
    "raft_app",
]
