"""The hot-path wire Structs are invisible to the cyclic GC (``gc=False``), decoded ones too.

They cannot be part of a cycle (only numbers, strings, Raw and each other), so tracking
them would only make every AppendEntries decode feed the GC (see types.py).
"""

from __future__ import annotations

import gc

import msgspec

from raft_http.types import (
    APPEND_ENTRIES_REQUEST,
    APPEND_ENTRIES_RESPONSE,
    VOTE_RESPONSE,
    AppendEntriesRequest,
    Entry,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    PartialSuccess,
    Vote,
    VoteResponse,
)


def test_decoded_append_entries_leaves_only_the_list_tracked() -> None:
    lid = LeaderId(3, 1)
    rpc = AppendEntriesRequest(
        Vote(lid, True),
        LogId(lid, 9),
        [Entry(LogId(lid, i), Normal(msgspec.Raw(b'{"k": 1}'))) for i in range(10, 13)],
        LogId(lid, 9),
    )
    decoded = APPEND_ENTRIES_REQUEST.decode(APPEND_ENTRIES_REQUEST.encode(rpc))
    assert decoded == rpc
    for entry in decoded.entries:
        assert not gc.is_tracked(entry)
        assert not gc.is_tracked(entry.log_id)
        assert not gc.is_tracked(entry.log_id.leader_id)
        assert not gc.is_tracked(entry.payload)
    assert not gc.is_tracked(decoded.vote)
    assert gc.is_tracked(decoded.entries)  # a list: tracked as any list is


def test_answers_are_untracked() -> None:
    lid = LeaderId(2, 2)
    answer = APPEND_ENTRIES_RESPONSE.decode(
        APPEND_ENTRIES_RESPONSE.encode(PartialSuccess(LogId(lid, 4)))
    )
    vote = VOTE_RESPONSE.decode(VOTE_RESPONSE.encode(VoteResponse(Vote(lid), True, None)))
    assert not gc.is_tracked(answer)
    assert not gc.is_tracked(vote)


def test_membership_keeps_being_tracked() -> None:
    # Its lists and dict are mutable: a cycle through them is possible, so the GC must see it.
    change = MembershipChange(Membership([[1, 2]], {1: Node("a:1"), 2: Node("b:2")}))
    assert gc.is_tracked(change.membership)
