"""Property tests of the wire types: every type survives JSON, bad input is refused by path.

The codecs in ``raft_http.types`` are the only way a value crosses the wire (HTTP
and the in-memory test network alike), so a type that does not round-trip here
would corrupt state between nodes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from raft_http import types as t
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Blank,
    Conflict,
    Entry,
    ErrorBody,
    ErrorDetail,
    HigherVote,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    JsonCodec,
    LeaderId,
    LogId,
    Membership,
    MembershipChange,
    Node,
    Normal,
    PartialSuccess,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
    log_id_key,
    log_index,
)

FAST = settings(max_examples=100, deadline=None)
LIGHT = settings(max_examples=40, deadline=None)  # for the tests run once per codec

# --- Strategies ---------------------------------------------------------------------

U63 = st.integers(min_value=0, max_value=t.MAX_NODE_ID)
SMALL = st.integers(min_value=0, max_value=5)  # collisions make the order properties bite
terms = st.one_of(SMALL, st.integers(min_value=0, max_value=t.MAX_TERM))
node_ids = st.one_of(SMALL, U63)
indexes = st.one_of(SMALL, st.integers(min_value=0, max_value=t.MAX_INDEX))

leader_ids = st.builds(LeaderId, term=terms, node_id=node_ids)
votes = st.builds(Vote, leader_id=leader_ids, committed=st.booleans())
small_votes = st.builds(
    Vote, leader_id=st.builds(LeaderId, term=SMALL, node_id=SMALL), committed=st.booleans()
)
log_ids = st.builds(LogId, leader_id=leader_ids, index=indexes)
opt_log_ids = st.none() | log_ids
nodes = st.builds(Node, addr=st.text(max_size=30))
memberships = st.builds(
    Membership,
    configs=st.lists(st.lists(node_ids, max_size=5), max_size=2),
    nodes=st.dictionaries(node_ids, nodes, max_size=6),
)
stored_memberships = st.builds(StoredMembership, log_id=opt_log_ids, membership=memberships)

# JSON values msgspec encodes and decodes exactly: int64 ints, finite floats, any text.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
raws = json_values.map(lambda v: msgspec.Raw(msgspec.json.encode(v)))
payloads = st.one_of(
    st.just(Blank()),
    st.builds(Normal, data=raws),
    st.builds(MembershipChange, membership=memberships),
)
entries = st.builds(Entry, log_id=log_ids, payload=payloads)
append_requests = st.builds(
    AppendEntriesRequest,
    vote=votes,
    prev_log_id=opt_log_ids,
    entries=st.lists(entries, max_size=4),
    leader_commit=opt_log_ids,
)
append_responses: st.SearchStrategy[AppendEntriesResponse] = st.one_of(
    st.just(Success()),
    st.builds(PartialSuccess, matching=opt_log_ids),
    st.just(Conflict()),
    st.builds(HigherVote, vote=votes),
)
vote_requests = st.builds(VoteRequest, vote=votes, last_log_id=opt_log_ids, pre_vote=st.booleans())
vote_responses = st.builds(
    VoteResponse, vote=votes, vote_granted=st.booleans(), last_log_id=opt_log_ids
)
snapshot_metas = st.builds(
    SnapshotMeta,
    last_log_id=opt_log_ids,
    last_membership=stored_memberships,
    snapshot_id=st.text(max_size=20),
)
install_requests = st.builds(
    InstallSnapshotRequest,
    vote=votes,
    meta=snapshot_metas,
    offset=U63,
    data=st.binary(max_size=200),
    done=st.booleans(),
)
error_bodies = st.builds(
    ErrorBody,
    error=st.builds(
        ErrorDetail,
        kind=st.text(max_size=20),
        message=st.text(max_size=40),
        expected_offset=st.none() | U63,
        limit=st.none() | U63,
        vote=st.none() | votes,
        expect=json_values,
        got=json_values,
    ),
)

# (codec, strategy) for every module-level codec, plus the types that have none of their own.
CASES: list[tuple[str, JsonCodec[Any], st.SearchStrategy[Any]]] = [
    ("append_entries_request", t.APPEND_ENTRIES_REQUEST, append_requests),
    ("append_entries_response", t.APPEND_ENTRIES_RESPONSE, append_responses),
    ("vote_request", t.VOTE_REQUEST, vote_requests),
    ("vote_response", t.VOTE_RESPONSE, vote_responses),
    ("vote", t.VOTE, votes),
    ("snapshot_meta", t.SNAPSHOT_META, snapshot_metas),
    ("snapshot_response", t.SNAPSHOT_RESPONSE, st.builds(SnapshotResponse, vote=votes)),
    ("install_snapshot_request", t.INSTALL_SNAPSHOT_REQUEST, install_requests),
    (
        "install_snapshot_response",
        t.INSTALL_SNAPSHOT_RESPONSE,
        st.builds(InstallSnapshotResponse, vote=votes),
    ),
    ("entry", t.ENTRY, entries),
    ("membership", t.MEMBERSHIP, memberships),
    ("error_body", t.ERROR_BODY, error_bodies),
    ("leader_id", JsonCodec[LeaderId](LeaderId), leader_ids),
    ("log_id", JsonCodec[LogId](LogId), log_ids),
    ("node", JsonCodec[Node](Node), nodes),
    ("stored_membership", JsonCodec[StoredMembership](StoredMembership), stored_memberships),
]
IDS = [c[0] for c in CASES]


def _raws_as_bytes(value: Any, *, raw_as_json: bool = False) -> Any:
    """A comparable view of a wire value: ``Raw`` becomes its bytes, Structs become tuples.

    With ``raw_as_json`` a ``Raw`` becomes the JSON value it holds (for JSON that went
    through another encoder, which may spell a number differently).
    """
    if isinstance(value, msgspec.Raw):
        return ("raw", msgspec.json.decode(value) if raw_as_json else bytes(value))
    if isinstance(value, msgspec.Struct):
        return (
            type(value).__name__,
            tuple(
                _raws_as_bytes(getattr(value, f), raw_as_json=raw_as_json)
                for f in value.__struct_fields__
            ),
        )
    if isinstance(value, list | tuple):
        return [_raws_as_bytes(v, raw_as_json=raw_as_json) for v in value]
    if isinstance(value, dict):
        return {k: _raws_as_bytes(v, raw_as_json=raw_as_json) for k, v in value.items()}
    return value


# --- Round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "codec", "strategy"), CASES, ids=IDS)
def test_round_trip(name: str, codec: JsonCodec[Any], strategy: st.SearchStrategy[Any]) -> None:
    @FAST
    @given(strategy)
    def check(value: Any) -> None:
        data = codec.encode(value)
        back = codec.decode(data)
        assert _raws_as_bytes(back) == _raws_as_bytes(value)
        assert type(back) is type(value)
        # Encoding is deterministic: what came back encodes to the same bytes.
        assert codec.encode(back) == data
        # Valid UTF-8 JSON that any other JSON parser reads.
        json.loads(data.decode("utf-8"))
        # encode_json is the same encoder.
        assert t.encode_json(value) == data

    check()


@FAST
@given(st.lists(entries, min_size=1, max_size=4))
def test_normal_payload_raw_is_kept_byte_for_byte(items: list[Entry]) -> None:
    req = AppendEntriesRequest(Vote(LeaderId(1, 1), True), None, items, None)
    back = t.APPEND_ENTRIES_REQUEST.decode(t.APPEND_ENTRIES_REQUEST.encode(req))
    for sent, got in zip(items, back.entries, strict=True):
        if isinstance(sent.payload, Normal):
            assert isinstance(got.payload, Normal)
            assert isinstance(got.payload.data, msgspec.Raw)
            assert bytes(got.payload.data) == bytes(sent.payload.data)
            assert msgspec.json.decode(got.payload.data) == msgspec.json.decode(sent.payload.data)


@FAST
@given(install_requests)
def test_snapshot_bytes_travel_as_base64_text(req: InstallSnapshotRequest) -> None:
    data = t.INSTALL_SNAPSHOT_REQUEST.encode(req)
    obj = json.loads(data)
    assert isinstance(obj["data"], str)
    assert t.INSTALL_SNAPSHOT_REQUEST.decode(data).data == req.data


def test_non_ascii_text_is_utf8() -> None:
    meta = SnapshotMeta(None, StoredMembership(None, Membership([[1]], {1: Node("ü")})), "é☃")
    data = t.SNAPSHOT_META.encode(meta)
    assert "é☃".encode() in data
    assert t.SNAPSHOT_META.decode(data) == meta


@FAST
@given(memberships)
def test_membership_node_keys_come_back_as_ints(m: Membership) -> None:
    data = t.MEMBERSHIP.encode(m)
    assert all(isinstance(k, str) for k in json.loads(data)["nodes"])  # JSON keys are strings
    back = t.MEMBERSHIP.decode(data)
    assert all(type(k) is int for k in back.nodes)
    assert back == m


# --- Unknown fields, bad values, bad tags ---------------------------------------------


def _add_unknown_fields(obj: Any, counter: itertools.count[int]) -> Any:
    """Add an unknown field to every JSON object, recursively (except ``Raw`` data)."""
    if isinstance(obj, list):
        return [_add_unknown_fields(v, counter) for v in obj]
    if isinstance(obj, dict):
        out = {
            k: (v if k in ("data", "expect", "got") else _add_unknown_fields(v, counter))
            for k, v in obj.items()
        }
        out[f"zz_future_{next(counter)}"] = {"nested": [1, "x", None]}
        return out
    return obj


@pytest.mark.parametrize(("name", "codec", "strategy"), CASES, ids=IDS)
def test_unknown_fields_are_ignored(
    name: str, codec: JsonCodec[Any], strategy: st.SearchStrategy[Any]
) -> None:
    @LIGHT
    @given(strategy)
    def check(value: Any) -> None:
        obj = json.loads(codec.encode(value))
        extended = _strip_from_maps(_add_unknown_fields(obj, itertools.count()))
        back = codec.decode(json.dumps(extended).encode())
        assert _raws_as_bytes(back, raw_as_json=True) == _raws_as_bytes(value, raw_as_json=True)

    check()


def _strip_from_maps(obj: Any) -> Any:
    """Undo the extra field in ``nodes`` maps: there every key is a node id, not a field."""
    if isinstance(obj, list):
        return [_strip_from_maps(v) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "nodes" and isinstance(v, dict):
                out[k] = {
                    nk: _strip_from_maps(nv) for nk, nv in v.items() if not nk.startswith("zz_")
                }
            else:
                out[k] = _strip_from_maps(v)
        return out
    return obj


def _paths_of_ints(obj: Any, path: str = "$") -> list[tuple[str, list[Any]]]:
    """Every (JSON path, location) of a non-negative int field that is a term, index or id."""
    found: list[tuple[str, list[Any]]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("term", "node_id", "index", "offset") and isinstance(v, int):
                found.append((f"{path}.{k}", [obj, k]))
            elif k not in ("nodes", "data", "expect", "got"):  # maps and free JSON
                found.extend(_paths_of_ints(v, f"{path}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found.extend(_paths_of_ints(v, f"{path}[{i}]"))
    return found


INT_CASES = [c for c in CASES if c[0] not in ("membership", "node")]  # no term/index field


@pytest.mark.parametrize(("name", "codec", "strategy"), INT_CASES, ids=[c[0] for c in INT_CASES])
def test_negative_term_or_index_is_rejected_naming_the_path(
    name: str, codec: JsonCodec[Any], strategy: st.SearchStrategy[Any]
) -> None:
    @LIGHT
    @given(strategy, st.data(), st.integers(min_value=-(2**63), max_value=-1))
    def check(value: Any, data: st.DataObject, negative: int) -> None:
        obj = json.loads(codec.encode(value))
        spots = _paths_of_ints(obj)
        assume(spots)
        path, (container, key) = data.draw(st.sampled_from(spots))
        container[key] = negative
        with pytest.raises(msgspec.ValidationError, match=r">= 0") as info:
            codec.decode(json.dumps(obj).encode())
        assert f"`{path}`" in str(info.value)

    check()


@pytest.mark.parametrize(
    ("codec", "body", "path"),
    [
        (
            t.VOTE_REQUEST,
            b'{"vote":{"leader_id":{"term":9223372036854775807,"node_id":2}},"last_log_id":null}',
            "$.vote.leader_id.term",
        ),
        (
            t.VOTE_REQUEST,
            b'{"vote":{"leader_id":{"term":1,"node_id":9223372036854775808}},"last_log_id":null}',
            "$.vote.leader_id.node_id",
        ),
        (
            t.ENTRY,
            b'{"log_id":{"leader_id":{"term":1,"node_id":1},"index":9223372036854775807},'
            b'"payload":{"type":"blank"}}',
            "$.log_id.index",
        ),
        (
            t.MEMBERSHIP,
            b'{"configs":[[1]],"nodes":{"9223372036854775808":{"addr":"a:1"}}}',
            "key` in `$.nodes",
        ),
        (
            t.MEMBERSHIP,
            b'{"configs":[[18446744073709551615]],"nodes":{}}',
            "$.configs[0][0]",
        ),
    ],
)
def test_values_the_store_cannot_hold_are_rejected_naming_the_field(
    codec: JsonCodec[Any], body: bytes, path: str
) -> None:
    """SQLite holds signed 64-bit integers; a term must leave room for a candidate's +1."""
    with pytest.raises(msgspec.ValidationError, match=r"<= ") as info:
        codec.decode(body)
    assert f"`{path}`" in str(info.value)


def test_the_greatest_values_the_store_can_hold_are_accepted() -> None:
    body = (
        b'{"vote":{"leader_id":{"term":%d,"node_id":%d}},"last_log_id":'
        b'{"leader_id":{"term":%d,"node_id":0},"index":%d}}'
        % (t.MAX_TERM, t.MAX_NODE_ID, t.MAX_TERM, t.MAX_INDEX)
    )
    rpc = t.VOTE_REQUEST.decode(body)
    assert rpc.vote.leader_id == LeaderId(2**63 - 2, 2**63 - 1)
    assert rpc.last_log_id is not None
    assert rpc.last_log_id.index == 2**63 - 2


def test_negative_term_error_message_names_the_field() -> None:
    bad = b'{"vote":{"leader_id":{"term":-1,"node_id":2}},"last_log_id":null}'
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.vote\.leader_id\.term`"):
        t.VOTE_REQUEST.decode(bad)


def test_negative_node_id_in_membership_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.configs\[0\]\[1\]"):
        t.MEMBERSHIP.decode(b'{"configs":[[1,-2]],"nodes":{}}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.nodes"):
        t.MEMBERSHIP.decode(b'{"configs":[],"nodes":{"-1":{"addr":"x"}}}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.nodes"):
        t.MEMBERSHIP.decode(b'{"configs":[],"nodes":{"one":{"addr":"x"}}}')


def test_non_integer_term_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.leader_id\.term"):
        t.VOTE.decode(b'{"leader_id":{"term":1.5,"node_id":1}}')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.leader_id\.term"):
        t.VOTE.decode(b'{"leader_id":{"term":"1","node_id":1}}')


@pytest.mark.parametrize(
    ("codec", "body", "where"),
    [
        (
            t.APPEND_ENTRIES_RESPONSE,
            b'{"type":"succes"}',
            r"Invalid value 'succes' - at `\$\.type`",
        ),
        (
            t.APPEND_ENTRIES_RESPONSE,
            b'{"type":"normal"}',
            r"Invalid value 'normal' - at `\$\.type`",
        ),
        (t.APPEND_ENTRIES_RESPONSE, b'{"matching":null}', r"missing required field `type`"),
        (
            t.ENTRY,
            b'{"log_id":{"leader_id":{"term":1,"node_id":1},"index":1},'
            b'"payload":{"type":"success"}}',
            r"Invalid value 'success' - at `\$\.payload\.type`",
        ),
        (
            t.ENTRY,
            b'{"log_id":{"leader_id":{"term":1,"node_id":1},"index":1},"payload":{"type":7}}',
            r"Expected `str` - at `\$\.payload\.type`",
        ),
    ],
)
def test_wrong_tag_is_rejected(codec: JsonCodec[Any], body: bytes, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=where):
        codec.decode(body)


@FAST
@given(append_responses)
def test_every_response_variant_is_tagged(resp: AppendEntriesResponse) -> None:
    tag = json.loads(t.APPEND_ENTRIES_RESPONSE.encode(resp))["type"]
    assert (
        tag
        == {
            Success: "success",
            PartialSuccess: "partial_success",
            Conflict: "conflict",
            HigherVote: "higher_vote",
        }[type(resp)]
    )


def test_missing_required_field_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"missing required field `vote_granted`"):
        t.VOTE_RESPONSE.decode(b'{"vote":{"leader_id":{"term":1,"node_id":1}},"last_log_id":null}')


def test_pre_vote_defaults_to_false() -> None:
    req = t.VOTE_REQUEST.decode(b'{"vote":{"leader_id":{"term":3,"node_id":1}},"last_log_id":null}')
    assert req.pre_vote is False
    assert req.vote == Vote(LeaderId(3, 1), committed=False)


def test_error_body_omits_defaults() -> None:
    data = t.ERROR_BODY.encode(ErrorBody(ErrorDetail("conflict", "x")))
    assert json.loads(data) == {"error": {"kind": "conflict", "message": "x"}}


# --- Ordering -------------------------------------------------------------------------


@FAST
@given(log_ids, log_ids)
def test_log_id_orders_by_term_then_index(a: LogId, b: LogId) -> None:
    if a.term != b.term:
        assert (a < b) == (a.term < b.term)
        assert (a < b) == (log_id_key(a) < log_id_key(b))
    elif a.leader_id == b.leader_id:
        assert (a < b) == (a.index < b.index)
        assert (a == b) == (a.index == b.index)
    assert log_id_key(a) == (a.term, a.index)


@FAST
@given(opt_log_ids)
def test_log_index_and_key_of_none(log_id: LogId | None) -> None:
    if log_id is None:
        assert log_index(None) == -1
        assert log_id_key(None) == (-1, -1)
    else:
        assert log_index(log_id) == log_id.index
        assert log_id_key(None) < log_id_key(log_id)


def test_log_id_term_property() -> None:
    assert LogId(LeaderId(7, 2), 9).term == 7
    assert Vote(LeaderId(4, 1)).term == 4


RELATIONS: list[Callable[[Vote, Vote], bool]] = [
    lambda a, b: a >= b,
    lambda a, b: a > b,
    lambda a, b: a <= b,
    lambda a, b: a < b,
]


@settings(max_examples=200, deadline=None)
@given(small_votes, small_votes)
def test_vote_order_is_antisymmetric_and_consistent(a: Vote, b: Vote) -> None:
    if a >= b and b >= a:
        assert a == b
    assert (a >= b) == (b <= a)
    assert (a > b) == (b < a)
    assert (a > b) == (a >= b and a != b)
    assert not (a > b and b > a)
    assert a >= a
    assert a <= a
    assert not a > a


@settings(max_examples=200, deadline=None)
@given(small_votes, small_votes, small_votes)
def test_vote_order_is_transitive(a: Vote, b: Vote, c: Vote) -> None:
    if a >= b and b >= c:
        assert a >= c
    if a > b and b >= c:
        assert a > c
    if a >= b and b > c:
        assert a > c


@FAST
@given(terms, node_ids, node_ids)
def test_committed_vote_beats_uncommitted_of_same_term(term: int, x: int, y: int) -> None:
    committed = Vote(LeaderId(term, x), committed=True)
    uncommitted = Vote(LeaderId(term, y), committed=False)
    assert committed > uncommitted
    assert committed >= uncommitted
    assert not uncommitted >= committed
    assert uncommitted.committed_vote() == Vote(LeaderId(term, y), True)


@FAST
@given(terms, node_ids, node_ids, st.booleans())
def test_two_votes_for_different_nodes_in_one_term_are_incomparable(
    term: int, x: int, y: int, committed: bool
) -> None:
    assume(x != y)
    a = Vote(LeaderId(term, x), committed)
    b = Vote(LeaderId(term, y), committed)
    for rel in RELATIONS:
        assert not rel(a, b)
        assert not rel(b, a)


@FAST
@given(votes, votes)
def test_higher_term_always_wins(a: Vote, b: Vote) -> None:
    assume(a.term != b.term)
    hi, lo = (a, b) if a.term > b.term else (b, a)
    assert hi > lo
    assert hi >= lo
    assert lo < hi
    assert lo <= hi
    assert not lo >= hi


def test_vote_against_other_type_is_not_implemented() -> None:
    v = Vote(LeaderId(1, 1))
    with pytest.raises(TypeError):
        _ = v >= 1


# --- Membership helpers ---------------------------------------------------------------


@FAST
@given(memberships)
def test_membership_helpers(m: Membership) -> None:
    voters = {n for c in m.configs for n in c}
    assert m.voter_ids() == voters
    assert m.learner_ids() == set(m.nodes) - voters
    assert m.voter_ids().isdisjoint(m.learner_ids())
    assert m.is_joint() == (len(m.configs) > 1)
    for n in voters | set(m.nodes) | {2**63 - 1}:
        assert m.is_voter(n) == (n in voters)


def test_membership_joint_example() -> None:
    m = Membership([[1, 2, 3], [3, 4]], {i: Node(f"127.0.0.1:{9000 + i}") for i in range(1, 7)})
    assert m.is_joint()
    assert m.voter_ids() == {1, 2, 3, 4}
    assert m.learner_ids() == {5, 6}
    assert m.is_voter(4)
    assert not m.is_voter(5)
    single = Membership([[1]], {1: Node("a"), 2: Node("b")})
    assert not single.is_joint()
    assert single.learner_ids() == {2}
