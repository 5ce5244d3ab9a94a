"""Small builders for the engine's rule tests: log ids, votes and logs by term."""

from __future__ import annotations

import msgspec

from raft_http.raft.engine.log import RaftLog
from raft_http.types import Entry, LeaderId, LogId, Normal, Vote


def lid(term: int, index: int, leader: int = 1) -> LogId:
    return LogId(LeaderId(term, leader), index)


def vote(term: int, node: int, committed: bool = False) -> Vote:
    return Vote(LeaderId(term, node), committed)


def entry(term: int, index: int, leader: int = 1) -> Entry:
    return Entry(lid(term, index, leader), Normal(msgspec.Raw(b"null")))


def log_of(terms: list[int], purged: LogId | None = None) -> RaftLog:
    """A log whose entries after ``purged`` have the given terms (each led by node 1)."""
    first = (purged.index + 1) if purged else 0
    return RaftLog(purged, [entry(t, first + i) for i, t in enumerate(terms)])
