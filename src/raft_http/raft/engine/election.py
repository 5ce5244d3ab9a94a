"""Vote and pre-vote rules, the leader lease, and counting votes (Raft paper, section 5.2, 5.4.1).

A voter grants its vote to at most one candidate per term, and only to a candidate
whose log is at least as up to date as its own (the Election Restriction, which gives
Leader Completeness). A pre-vote (Ongaro's thesis, 9.6) asks the same question without
changing anything, so a node that cannot win does not raise everybody's term. A voter
that heard from a leader within the lease refuses every other candidate, so a node
rejoining from a partition does not depose a healthy leader; only the candidate of a
leadership transfer, which the leader itself asked to campaign, passes the lease.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import Enum

from ...types import LogId, Vote, VoteRequest, log_id_key
from .quorum import is_quorum


class VoteVerdict(Enum):
    REFUSE = "refuse"
    GRANT = "grant"
    """Granted without a change of vote: a pre-vote, or the vote this node already holds."""
    GRANT_AND_SAVE = "grant_and_save"
    """Granted: the voter must make ``request.vote`` its own, durably, before answering."""


def log_is_up_to_date(candidate_last: LogId | None, voter_last: LogId | None) -> bool:
    """The candidate's last log id is at least the voter's: by term first, then by index."""
    return log_id_key(candidate_last) >= log_id_key(voter_last)


def lease_holds(*, leading: bool, vote: Vote, now: float, lease_until: float) -> bool:
    """Whether this node still backs a known leader: it leads, or heard from one lately."""
    return leading or (vote.committed and now < lease_until)


def decide_vote(
    request: VoteRequest, *, mine: Vote, last_log_id: LogId | None, leased: bool
) -> VoteVerdict:
    """How a voter whose vote is ``mine`` and whose log ends at ``last_log_id`` answers."""
    # A transfer's vote was asked for by the leader itself: the lease, which guards the
    # leader against disruptive candidates, does not apply to it (etcd does the same).
    if leased and request.vote.leader_id != mine.leader_id and not request.transfer:
        return VoteVerdict.REFUSE
    if not log_is_up_to_date(request.last_log_id, last_log_id):
        return VoteVerdict.REFUSE
    if request.pre_vote:
        would_grant = request.vote.term > mine.term or request.vote >= mine
        return VoteVerdict.GRANT if would_grant else VoteVerdict.REFUSE
    if not request.vote >= mine:
        return VoteVerdict.REFUSE
    return VoteVerdict.GRANT if request.vote == mine else VoteVerdict.GRANT_AND_SAVE


def campaign_term(vote_term: int, term_hint: int) -> int:
    """The term to campaign in: past our own and past any term a refusal told us of."""
    return max(vote_term, term_hint) + 1


def refusal_effect(
    candidate: Vote, their_vote: Vote, mine: Vote, *, pre_vote: bool
) -> tuple[int | None, bool]:
    """What a refused vote teaches the candidate: ``(term_hint, step_down)``.

    A voter in the candidate's term or later names a term to campaign past next time.
    In a real election, a voter's vote greater than the candidate's own means another
    node is ahead: the candidate adopts that vote and stops campaigning. A pre-vote
    changes nothing, so it never makes the candidate step down.
    """
    if their_vote.term < candidate.term:
        return None, False
    return their_vote.term, (not pre_vote and their_vote > mine)


def lost_quorum(now: float, last_contact: float, election_timeout_max: float) -> bool:
    """Whether a leader has gone ``2 * election_timeout_max`` without a quorum's acknowledgement.

    It then steps down: cut off in a minority it could not commit anything, and while
    it leads it refuses every vote (the lease), delaying the majority's new leader.
    """
    return now - last_contact > 2 * election_timeout_max


class VoteCount:
    """The votes granted to one candidate, and whether they make a quorum of every config."""

    __slots__ = ("configs", "granted")

    def __init__(self, configs: Sequence[Collection[int]], candidate_id: int) -> None:
        self.configs = configs
        self.granted = {candidate_id}

    @property
    def won(self) -> bool:
        return is_quorum(self.configs, self.granted)

    def grant(self, voter: int) -> bool:
        """Count ``voter``'s vote; True once the candidate has won."""
        self.granted.add(voter)
        return self.won
