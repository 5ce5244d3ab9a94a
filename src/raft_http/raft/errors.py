"""Errors of the Raft API (``client_write``, ``ensure_linearizable``, membership changes)."""

from __future__ import annotations

from ..errors import APIError
from ..types import Node


class ForwardToLeader(APIError):
    """This node is not the leader; send the request to ``leader_id`` at ``leader_node``.

    Both are None when no leader is known right now: retry after an election timeout.
    """

    def __init__(self, leader_id: int | None, leader_node: Node | None) -> None:
        where = f"node {leader_id} at {leader_node.addr}" if leader_node else "unknown"
        super().__init__(
            "forward_to_leader",
            f"not the leader; the leader is {where}",
            leader_id=leader_id,
            leader_addr=leader_node.addr if leader_node else None,
        )
        self.leader_id = leader_id
        self.leader_node = leader_node


class NotAllowed(APIError):
    """The request conflicts with the node's state (already initialized, change in progress...)."""

    def __init__(self, message: str) -> None:
        super().__init__("not_allowed", message)


class QuorumNotEnough(APIError):
    """A quorum did not confirm leadership in time; the read or change was not done."""

    def __init__(self, message: str) -> None:
        super().__init__("quorum_not_enough", message)


class WriteAborted(APIError):
    """Another leader's entry was committed at the proposed entry's index: it was NOT applied.

    Raised only once that index is committed: an entry merely overwritten on the node that
    proposed it may still be held, and later committed, by another node.
    """

    def __init__(self, message: str) -> None:
        super().__init__("write_aborted", message)


class WriteOutcomeUnknown(APIError):
    """The node lost track of a proposed entry (snapshot installed over it): it may be applied."""

    def __init__(self, message: str) -> None:
        super().__init__("write_outcome_unknown", message)
