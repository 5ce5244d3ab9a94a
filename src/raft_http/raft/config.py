"""Tuning knobs of the Raft core, after Openraft's ``Config``, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ..network import DEFAULT_SNAPSHOT_CHUNK_SIZE


@dataclass(frozen=True, slots=True)
class Config:
    """Times are in seconds (Openraft uses milliseconds).

    ``append_timeout``: Openraft bounds an AppendEntries by the heartbeat interval;
    a Python follower that fsyncs each batch to SQLite needs longer, so the bound is
    its own knob. A timed-out RPC is simply sent again.

    ``max_uncommitted_entries`` / ``max_uncommitted_bytes`` bound what a leader holds
    proposed but not committed (entries, and bytes of application data); a write past
    either bound fails at once with ``Overloaded``. ``transfer_leader_timeout`` bounds
    ``Raft.transfer_leader`` when the caller gives no timeout.

    ``max_in_memory_log_bytes`` bounds the application bytes of the entries a node
    keeps in memory once they are applied and on disk: past it the oldest are dropped
    from memory (the log ids stay) and a leader reads them back from the ``LogStore``
    for a follower that far behind. Entries not yet applied or not yet durable are
    always kept, so the view may hold more while they are; 0 keeps none of the others.
    """

    cluster_name: str = "raft_http"
    heartbeat_interval: float = 0.05
    election_timeout_min: float = 0.15
    election_timeout_max: float = 0.30
    append_timeout: float = 1.0
    max_payload_entries: int = 300
    max_inflight_appends: int = 8
    max_inflight_bytes: int = 16 * 1024 * 1024
    snapshot_max_chunk_size: int = DEFAULT_SNAPSHOT_CHUNK_SIZE
    snapshot_logs_since_last: int = 5000
    max_in_snapshot_log_to_keep: int = 1000
    install_snapshot_timeout: float = 10.0
    replication_lag_threshold: int = 5000
    enable_heartbeat: bool = True
    enable_elect: bool = True
    max_uncommitted_entries: int = 10_000
    max_uncommitted_bytes: int = 64 * 1024 * 1024
    transfer_leader_timeout: float = 2.0
    max_in_memory_log_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        problems = []
        if self.heartbeat_interval <= 0:
            problems.append("heartbeat_interval must be > 0")
        if not 0 < self.election_timeout_min < self.election_timeout_max:
            problems.append("need 0 < election_timeout_min < election_timeout_max")
        if self.heartbeat_interval >= self.election_timeout_min:
            problems.append("heartbeat_interval must be < election_timeout_min")
        if self.append_timeout <= 0 or self.install_snapshot_timeout <= 0:
            problems.append("timeouts must be > 0")
        if self.max_uncommitted_entries < 1 or self.max_uncommitted_bytes < 1:
            problems.append("max_uncommitted_entries and max_uncommitted_bytes must be >= 1")
        if not self.transfer_leader_timeout > 0:
            problems.append("transfer_leader_timeout must be > 0")
        if self.max_payload_entries < 1:
            problems.append("max_payload_entries must be >= 1")
        if self.max_inflight_appends < 1 or self.max_inflight_bytes < 1:
            problems.append("max_inflight_appends and max_inflight_bytes must be >= 1")
        if self.snapshot_max_chunk_size < 1:
            problems.append("snapshot_max_chunk_size must be >= 1")
        if self.snapshot_logs_since_last < 1:
            problems.append("snapshot_logs_since_last must be >= 1")
        if self.max_in_snapshot_log_to_keep < 0 or self.replication_lag_threshold < 0:
            problems.append(
                "max_in_snapshot_log_to_keep and replication_lag_threshold must be >= 0"
            )
        if self.max_in_memory_log_bytes < 0:
            problems.append("max_in_memory_log_bytes must be >= 0")
        if problems:
            raise ValueError("invalid raft Config: " + "; ".join(problems))
