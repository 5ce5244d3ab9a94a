"""Errors of the Raft API (``client_write``, ``ensure_linearizable``, membership changes)."""

from __future__ import annotations

from ..errors import APIError
from ..types import LogId, Node, log_index


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


class NodeRemoved(APIError):
    """This node was removed from the cluster's membership: it serves no reads or writes.

    It keeps its data and still answers the leader's RPCs (it may be added back). To
    rejoin under a new id, wipe its data directory and add it as a learner again.
    """

    def __init__(self, node_id: int) -> None:
        super().__init__(
            "node_removed",
            f"node {node_id} was removed from the cluster's membership; it serves no reads "
            "or writes: send requests to a member",
        )
        self.node_id = node_id


class LearnerNotCaughtUp(APIError):
    """``add_learner`` added the learner (its membership entry is committed), but the
    learner did not catch up within the wait: ``unreachable`` says whether the last
    attempt to reach it failed (``problem``), or it is still catching up (``matched``).

    The learner stays in the membership, and the leader keeps replicating to it;
    ``remove_learner`` takes it out.
    """

    def __init__(
        self,
        node_id: int,
        log_id: LogId,
        matched: LogId | None,
        problem: str | None,
        waited: float,
    ) -> None:
        if problem is not None:
            state = f"it is unreachable ({problem})"
        else:
            state = f"it is still catching up (holds up to index {log_index(matched)})"
        super().__init__(
            "learner_not_caught_up",
            f"node {node_id} was added as a learner at log index {log_id.index}, but did not "
            f"catch up within {waited:g}s: {state}; wait for it, or remove it with "
            f"remove_learner",
        )
        self.node_id = node_id
        self.log_id = log_id
        self.matched = matched
        self.problem = problem
        self.unreachable = problem is not None


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


class Overloaded(APIError):
    """The leader holds as many uncommitted writes as ``Config`` allows: retry shortly.

    Nothing was proposed. Refusing at once, instead of queueing without limit, keeps the
    leader's memory and latency bounded and its heartbeats on time.
    """

    def __init__(self, message: str) -> None:
        super().__init__("overloaded", message)


class TransferFailed(APIError):
    """A leadership transfer did not complete in time (or could not start).

    If this node still leads, it takes writes again; otherwise an election decides.
    """

    def __init__(self, message: str) -> None:
        super().__init__("transfer_failed", message)
