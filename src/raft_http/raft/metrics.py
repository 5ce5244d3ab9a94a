"""What a node reports about itself; JSON-encodable, served by ``GET /metrics``."""

from __future__ import annotations

from enum import StrEnum

from msgspec import Struct

from ..types import LogId, StoredMembership, Vote


class ServerState(StrEnum):
    FOLLOWER = "Follower"
    CANDIDATE = "Candidate"
    LEADER = "Leader"
    LEARNER = "Learner"
    REMOVED = "Removed"
    """Removed from the membership: serves nothing, does not campaign, still takes the log."""
    SHUTDOWN = "Shutdown"
    UNINITIALIZED = "Uninitialized"
    """In no membership and hearing no leader: waiting for ``initialize`` or ``add_learner``."""


class RaftMetrics(Struct, frozen=True):
    """A node's state at one moment (after Openraft's ``RaftMetrics``).

    ``replication`` maps each target to its matched log id, and ``since_quorum_ack``
    is how long ago (seconds) a quorum last acknowledged the leader: both on the
    leader only.
    """

    id: int
    state: ServerState
    current_term: int
    vote: Vote
    last_log_index: int
    last_applied: LogId | None
    committed: LogId | None
    snapshot: LogId | None
    purged: LogId | None
    current_leader: int | None
    membership_config: StoredMembership
    replication: dict[int, LogId | None] | None
    since_quorum_ack: float | None
    running: bool
    fatal: str | None = None
    since_leader_heard: float | None = None
    """Seconds since this follower last heard from ``current_leader`` (None on the leader)."""
    in_memory_log_bytes: int = 0
    """Application bytes of the log entries held in memory (``Config.max_in_memory_log_bytes``
    bounds the applied, durable ones; evicted entries are read back from the ``LogStore``)."""
    in_memory_log_entries: int = 0
    """How many log entries are held in memory (log ids of unpurged ones are kept apart)."""
