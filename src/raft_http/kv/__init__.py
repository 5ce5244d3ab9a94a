"""The key-value example application: what a user copies to build their own on raft_http.

After Openraft's ``examples/raft-kv-memstore``: a state machine (``KVStateMachine``),
an HTTP API (``kv_api``), a node assembling it with the Raft core and the HTTP
transport (``KVNode``), a client for applications (``KVClient``, after Openraft's ExampleClient)
and a CLI (``raft-http node``, ``raft-http status|put|get|...``).
"""

from .api import kv_api
from .client import (
    ClusterStatus,
    KVClient,
    KVError,
    KVOutcomeUnknown,
    KVRefused,
    KVUnavailable,
    KVUnreachable,
    MemberStatus,
    WriteResult,
)
from .node import KVNode
from .state_machine import Delete, InvalidCommand, KVResponse, KVStateMachine, Set, decode_command

__all__ = [
    "ClusterStatus",
    "Delete",
    "InvalidCommand",
    "KVClient",
    "KVError",
    "KVNode",
    "KVOutcomeUnknown",
    "KVRefused",
    "KVResponse",
    "KVStateMachine",
    "KVUnavailable",
    "KVUnreachable",
    "MemberStatus",
    "Set",
    "WriteResult",
    "decode_command",
    "kv_api",
]
