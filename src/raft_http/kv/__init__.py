"""The key-value example application: what a user copies to build their own on raft_http.

After Openraft's ``examples/raft-kv-memstore``: a state machine (``KVStateMachine``),
an HTTP API (``kv_api``), a node assembling it with the Raft core and the HTTP
transport (``KVNode``), and a CLI (``raft-http node``).
"""

from .api import kv_api
from .node import KVNode
from .state_machine import Delete, InvalidCommand, KVResponse, KVStateMachine, Set, decode_command

__all__ = [
    "Delete",
    "InvalidCommand",
    "KVNode",
    "KVResponse",
    "KVStateMachine",
    "Set",
    "decode_command",
    "kv_api",
]
