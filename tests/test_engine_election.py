"""Vote and pre-vote rules, the lease, and counting votes, from the paper's claims (5.2, 5.4.1)."""

from __future__ import annotations

import pytest

from engine_helpers import lid, vote
from raft_http.raft.engine.election import (
    VoteCount,
    VoteVerdict,
    campaign_term,
    decide_vote,
    lease_holds,
    log_is_up_to_date,
    lost_quorum,
    refusal_effect,
)
from raft_http.types import LogId, Vote, VoteRequest

REFUSE, GRANT, SAVE = VoteVerdict.REFUSE, VoteVerdict.GRANT, VoteVerdict.GRANT_AND_SAVE


@pytest.mark.parametrize(
    ("candidate", "voter", "expected"),
    [
        (None, None, True),
        (lid(1, 0), None, True),
        (None, lid(1, 0), False),
        (lid(2, 5), lid(2, 5), True),  # the same log
        (lid(2, 6), lid(2, 5), True),  # longer in the same last term
        (lid(2, 4), lid(2, 5), False),  # shorter in the same last term
        (lid(3, 1), lid(2, 9), True),  # a later last term wins over length
        (lid(2, 9), lid(3, 1), False),  # an earlier last term loses despite length
    ],
)
def test_log_is_up_to_date_compares_last_term_then_length(
    candidate: LogId | None, voter: LogId | None, expected: bool
) -> None:
    assert log_is_up_to_date(candidate, voter) is expected


def ask(term: int, node: int, last: LogId | None, pre_vote: bool = False) -> VoteRequest:
    return VoteRequest(vote(term, node), last, pre_vote=pre_vote)


def transfer(term: int, node: int, last: LogId | None) -> VoteRequest:
    return VoteRequest(vote(term, node), last, transfer=True)


@pytest.mark.parametrize(
    ("case", "request_", "mine", "last", "leased", "expected"),
    [
        # 5.2: at most one vote per term, first come first served.
        ("first-in-term", ask(2, 2, lid(1, 3)), vote(1, 1, True), lid(1, 3), False, SAVE),
        ("same-candidate-again", ask(2, 2, lid(1, 3)), vote(2, 2), lid(1, 3), False, GRANT),
        ("other-candidate-same-term", ask(2, 3, lid(1, 3)), vote(2, 2), lid(1, 3), False, REFUSE),
        ("stale-term", ask(1, 2, lid(1, 3)), vote(2, 3), lid(1, 3), False, REFUSE),
        (
            "committed-leader-of-term",
            ask(2, 3, lid(1, 3)),
            vote(2, 2, True),
            lid(1, 3),
            False,
            REFUSE,
        ),
        # 5.4.1: the Election Restriction, whatever the terms of the votes.
        ("log-behind-by-index", ask(5, 2, lid(1, 2)), vote(1, 1), lid(1, 3), False, REFUSE),
        ("log-behind-by-term", ask(5, 2, lid(1, 9)), vote(1, 1), lid(2, 3), False, REFUSE),
        ("empty-log-candidate", ask(5, 2, None), vote(1, 1), lid(1, 0), False, REFUSE),
        ("log-ahead", ask(5, 2, lid(2, 1)), vote(1, 1), lid(1, 9), False, SAVE),
        # The lease: while a leader is known, only that leader's own vote request passes.
        ("leased", ask(5, 2, lid(1, 3)), vote(1, 1, True), lid(1, 3), True, REFUSE),
        (
            "leased-own-leader",
            VoteRequest(vote(1, 1, True), lid(1, 3)),
            vote(1, 1, True),
            lid(1, 3),
            True,
            GRANT,
        ),
        # Pre-vote: the same checks, nothing saved; a later term passes even if our vote
        # in an earlier term is for someone else.
        ("pre-later-term", ask(2, 2, lid(1, 3), True), vote(1, 1, True), lid(1, 3), False, GRANT),
        ("pre-same-term-other", ask(2, 3, lid(1, 3), True), vote(2, 2), lid(1, 3), False, REFUSE),
        ("pre-same-vote", ask(2, 2, lid(1, 3), True), vote(2, 2), lid(1, 3), False, GRANT),
        ("pre-stale-term", ask(1, 2, lid(1, 3), True), vote(2, 3), lid(1, 3), False, REFUSE),
        ("pre-log-behind", ask(9, 2, lid(1, 2), True), vote(1, 1), lid(1, 3), False, REFUSE),
        ("pre-leased", ask(9, 2, lid(1, 3), True), vote(1, 1, True), lid(1, 3), True, REFUSE),
        # A leadership transfer's candidate passes the lease, and only the lease.
        ("transfer-leased", transfer(2, 2, lid(1, 3)), vote(1, 1, True), lid(1, 3), True, SAVE),
        ("transfer-behind", transfer(2, 2, lid(1, 2)), vote(1, 1, True), lid(1, 3), True, REFUSE),
        ("transfer-stale", transfer(1, 2, lid(1, 3)), vote(2, 3, True), lid(1, 3), True, REFUSE),
        ("transfer-taken", transfer(2, 2, lid(1, 3)), vote(2, 3), lid(1, 3), True, REFUSE),
    ],
)
def test_decide_vote(
    case: str,
    request_: VoteRequest,
    mine: Vote,
    last: LogId | None,
    leased: bool,
    expected: VoteVerdict,
) -> None:
    assert decide_vote(request_, mine=mine, last_log_id=last, leased=leased) is expected, case


@pytest.mark.parametrize(
    ("leading", "mine", "now", "until", "expected"),
    [
        (True, vote(1, 1), 10.0, 0.0, True),  # a leader backs itself
        (False, vote(1, 2, True), 10.0, 10.5, True),  # heard from the leader lately
        (False, vote(1, 2, True), 10.5, 10.5, False),  # the lease ends at its deadline
        (False, vote(1, 2, True), 11.0, 10.5, False),
        (False, vote(1, 2), 10.0, 10.5, False),  # a mere candidate's vote gives no lease
    ],
)
def test_lease_holds(leading: bool, mine: Vote, now: float, until: float, expected: bool) -> None:
    assert lease_holds(leading=leading, vote=mine, now=now, lease_until=until) is expected


@pytest.mark.parametrize(
    ("vote_term", "hint", "expected"), [(0, 0, 1), (3, 0, 4), (3, 7, 8), (7, 3, 8)]
)
def test_campaign_term_passes_own_term_and_any_term_heard_of(
    vote_term: int, hint: int, expected: int
) -> None:
    assert campaign_term(vote_term, hint) == expected


@pytest.mark.parametrize(
    ("candidate", "theirs", "mine", "pre_vote", "expected"),
    [
        (vote(3, 1), vote(2, 2, True), vote(3, 1), False, (None, False)),  # older: nothing
        (vote(3, 1), vote(3, 2), vote(3, 1), False, (3, False)),  # a rival of the term
        (vote(3, 1), vote(3, 2, True), vote(3, 1), False, (3, True)),  # a leader of the term
        (vote(3, 1), vote(5, 2), vote(3, 1), False, (5, True)),  # ahead: step down
        (vote(3, 1), vote(5, 2), vote(3, 1), True, (5, False)),  # pre-vote: never step down
        (vote(3, 1), vote(3, 2, True), vote(3, 1), True, (3, False)),
        (vote(3, 1), vote(4, 2), vote(4, 2), False, (4, False)),  # already adopted
    ],
)
def test_refusal_effect(
    candidate: Vote, theirs: Vote, mine: Vote, pre_vote: bool, expected: tuple[int | None, bool]
) -> None:
    assert refusal_effect(candidate, theirs, mine, pre_vote=pre_vote) == expected


@pytest.mark.parametrize(
    ("now", "contact", "expected"),
    [(10.0, 9.5, False), (10.0, 9.0, False), (10.0, 8.75, True), (10.0, 10.0, False)],
)
def test_lost_quorum_after_two_election_timeouts(
    now: float, contact: float, expected: bool
) -> None:
    assert lost_quorum(now, contact, 0.5) is expected  # 2 * 0.5: exactly 1.0 s is not yet


def test_vote_count_needs_a_majority_of_every_config() -> None:
    alone = VoteCount([[1]], 1)
    assert alone.won
    count = VoteCount([[1, 2, 3], [3, 4, 5]], 1)
    assert not count.won
    assert not count.grant(2)  # the old config's majority only
    assert not count.grant(2)  # a repeated grant counts once
    assert not count.grant(4)
    assert count.grant(5)
    assert count.granted == {1, 2, 4, 5}
