"""Wire-value builders the client and server tests share: one definition, one shape."""

from __future__ import annotations

import json

from raft_http.types import (
    SNAPSHOT_META,
    VOTE,
    LeaderId,
    LogId,
    Membership,
    Node,
    SnapshotMeta,
    StoredMembership,
    Vote,
)


def vote(term: int, node_id: int = 1, committed: bool = True) -> Vote:
    return Vote(LeaderId(term, node_id), committed)


def log_id(term: int, index: int, node_id: int = 1) -> LogId:
    return LogId(LeaderId(term, node_id), index)


def snapshot_meta(snapshot_id: str = "snap-1", index: int = 10) -> SnapshotMeta:
    membership = Membership(
        configs=[[1, 2, 3]], nodes={i: Node(f"127.0.0.1:{9000 + i}") for i in (1, 2, 3)}
    )
    return SnapshotMeta(
        last_log_id=log_id(1, index),
        last_membership=StoredMembership(log_id(1, 1), membership),
        snapshot_id=snapshot_id,
    )


def ascii_json(encoded: bytes) -> str:
    """JSON for a header: non-ASCII escaped as \\uXXXX, as the protocol asks."""
    return json.dumps(json.loads(encoded), separators=(",", ":"))


def snapshot_headers(
    v: Vote, meta: SnapshotMeta, size: int, offset: int = 0, **extra: str
) -> dict[str, str]:
    """The headers of a POST /snapshot (full-snapshot protocol) for bytes from ``offset``."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Raft-Vote": ascii_json(VOTE.encode(v)),
        "Raft-Snapshot-Meta": ascii_json(SNAPSHOT_META.encode(meta)),
        "Raft-Snapshot-Size": str(size),
        "Raft-Snapshot-Offset": str(offset),
    }
    headers.update(extra)
    return headers
