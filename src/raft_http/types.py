"""Everything that crosses the wire, as msgspec Structs.

Names and fields follow Openraft (``LeaderId``, ``Vote``, ``LogId``, ``Entry``,
``AppendEntriesRequest`` ...) so its users feel at home. Nothing else in the
package defines a wire shape: the server, the client and the Raft core all speak
these types, and the codecs at the bottom are built once at import time.

The small Structs of the hot path (ids, votes, entries, answers) are declared
``gc=False``: they hold only numbers, strings, ``Raw`` and each other, so they
cannot form reference cycles, and a 300-entry AppendEntries no longer allocates
1,500 objects the cyclic GC must track and traverse (decode 1.5-2x faster in a
process with a large heap; bench/RESULTS.md). At worst an untracked object in a
cycle someone built by hand leaks; it is never freed early.

Unknown JSON fields are ignored (a newer peer may send more during a rolling
upgrade); terms, indexes and node ids are range-checked on decode against what
the log store can hold (``MAX_TERM``, ``MAX_INDEX``, ``MAX_NODE_ID``), so no value
from the wire can overflow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Final, Generic, TypeAlias, TypeVar

import msgspec
from msgspec import Meta, Raw, Struct

MAX_NODE_ID: Final = 2**63 - 1
"""The greatest node id: what a signed 64-bit integer (SQLite's ``INTEGER``) holds."""

MAX_TERM: Final = 2**63 - 2
"""The greatest term on the wire: one below what the store holds, room for a candidate's ``+1``.

A node never campaigns past it (the core checks), so every term a node can send is
one its peers accept, and no value from the wire can overflow the log store.
"""

MAX_INDEX: Final = 2**63 - 2
"""The greatest log index on the wire: one below what the store holds, room for the next index."""

NodeId: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_NODE_ID)]
"""A node's id: ``0 ..= 2**63 - 1``, what the store can hold (Openraft's is a ``u64``)."""

Term: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_TERM)]
Index: TypeAlias = Annotated[int, Meta(ge=0, le=MAX_INDEX)]


class LeaderId(Struct, frozen=True, order=True, gc=False):
    """Who leads (or asks to lead) in a term; ordered by term, then node id."""

    term: Term
    node_id: NodeId


class Vote(Struct, frozen=True, gc=False):
    """A node's vote: the leader it backs, and whether a quorum granted it.

    The order is Openraft's partial order for "one leader per term": votes of
    different terms compare by term; in one term, a vote for another node is
    neither greater nor smaller unless exactly one of the two is committed
    (a committed vote wins). So ``a >= b`` and ``a < b`` may both be false,
    and ``a >= b`` is the vote-granting test.
    """

    leader_id: LeaderId
    committed: bool = False

    def _cmp(self, other: Vote) -> int | None:
        a, b = self.leader_id, other.leader_id
        if a.term != b.term:
            return -1 if a.term < b.term else 1
        if a.node_id == b.node_id:
            return int(self.committed) - int(other.committed)
        if self.committed == other.committed:
            return None  # two candidates of one term: incomparable
        return 1 if self.committed else -1

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Vote):
            return NotImplemented
        c = self._cmp(other)
        return c is not None and c >= 0

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Vote):
            return NotImplemented
        c = self._cmp(other)
        return c is not None and c > 0

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Vote):
            return NotImplemented
        c = self._cmp(other)
        return c is not None and c <= 0

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Vote):
            return NotImplemented
        c = self._cmp(other)
        return c is not None and c < 0

    @property
    def term(self) -> int:
        return self.leader_id.term

    def committed_vote(self) -> Vote:
        """The same vote, granted by a quorum: what a leader sends."""
        return Vote(self.leader_id, True)


class LogId(Struct, frozen=True, order=True, gc=False):
    """The id of a log entry: the leader that proposed it, and its index.

    With one leader per term the order is term, then index. A missing log id
    (an empty log) is ``None`` in Python and ``null`` in JSON.
    """

    leader_id: LeaderId
    index: Index

    @property
    def term(self) -> int:
        return self.leader_id.term


def log_index(log_id: LogId | None) -> int:
    """The index of a log id, or -1 for none: handy for "next index" arithmetic."""
    return -1 if log_id is None else log_id.index


def log_id_key(log_id: LogId | None) -> tuple[int, int]:
    """A total sort key for optional log ids (``None`` sorts first)."""
    if log_id is None:
        return (-1, -1)
    return (log_id.leader_id.term, log_id.index)


class Node(Struct, frozen=True, gc=False):
    """Where a node listens: ``host:port`` for plain HTTP, or a full ``http(s)://`` URL."""

    addr: str


class Membership(Struct, frozen=True):
    """The voters (one config, or two during joint consensus) and every node's address.

    A node in ``nodes`` that is in no config is a learner: it receives the log
    but does not vote.
    """

    configs: list[list[NodeId]]
    nodes: dict[NodeId, Node]

    def voter_ids(self) -> set[int]:
        return {n for config in self.configs for n in config}

    def learner_ids(self) -> set[int]:
        return set(self.nodes) - self.voter_ids()

    def is_joint(self) -> bool:
        return len(self.configs) > 1

    def is_voter(self, node_id: int) -> bool:
        return any(node_id in config for config in self.configs)


class StoredMembership(Struct, frozen=True):
    """A membership and the log id of the entry that carried it (``None``: initial, empty)."""

    log_id: LogId | None
    membership: Membership


class Blank(Struct, frozen=True, tag="blank", gc=False):
    """A no-op entry a new leader appends to commit entries of earlier terms."""


class Normal(Struct, frozen=True, tag="normal", gc=False):
    """Application data, kept as raw JSON: only the state machine decodes it."""

    data: Raw


class MembershipChange(Struct, frozen=True, tag="membership"):
    """A new membership config, effective as soon as it is appended."""

    membership: Membership


EntryPayload: TypeAlias = Blank | Normal | MembershipChange


class Entry(Struct, frozen=True, gc=False):
    log_id: LogId
    payload: EntryPayload


class AppendEntriesRequest(Struct, frozen=True):
    vote: Vote
    prev_log_id: LogId | None
    entries: list[Entry]
    leader_commit: LogId | None

    def shape_error(self) -> str | None:
        """Why no honest leader could have sent this request, whatever our log holds; or None.

        A leader sends entries with indexes contiguous from ``prev_log_id + 1``, terms that
        never decrease, and nothing from a term above its own vote. A request that breaks
        this is malformed (a 400), not a reason to stop the node that received it.
        """
        term = self.vote.leader_id.term
        prev = self.prev_log_id
        if prev is not None and prev.leader_id.term > term:
            return f"prev_log_id is of term {prev.leader_id.term}, above the sender's vote {term}"
        if self.leader_commit is not None and self.leader_commit.leader_id.term > term:
            return (
                f"leader_commit is of term {self.leader_commit.leader_id.term},"
                f" above the sender's vote {term}"
            )
        expected = log_index(prev) + 1
        last_term = 0 if prev is None else prev.leader_id.term
        for i, entry in enumerate(self.entries):
            log_id = entry.log_id
            if log_id.index != expected:
                return (
                    f"entries[{i}].log_id.index is {log_id.index}, expected {expected}:"
                    " indexes must run on from prev_log_id + 1"
                )
            entry_term = log_id.leader_id.term
            if entry_term < last_term:
                return f"entries[{i}] is of term {entry_term}, below {last_term} before it"
            if entry_term > term:
                return f"entries[{i}] is of term {entry_term}, above the sender's vote {term}"
            expected += 1
            last_term = entry_term
        return None


class Success(Struct, frozen=True, tag="success", gc=False):
    """Every entry matched or was appended."""


class PartialSuccess(Struct, frozen=True, tag="partial_success", gc=False):
    """Only a prefix was accepted; ``matching`` is the last entry the follower now holds."""

    matching: LogId | None


class Conflict(Struct, frozen=True, tag="conflict", gc=False):
    """``prev_log_id`` is not in the follower's log: the leader must go back."""


class HigherVote(Struct, frozen=True, tag="higher_vote", gc=False):
    """The follower has seen a greater vote: the sender must step down."""

    vote: Vote


AppendEntriesResponse: TypeAlias = Success | PartialSuccess | Conflict | HigherVote


class VoteRequest(Struct, frozen=True, gc=False):
    """Ask for a vote; ``pre_vote`` asks "would you vote?" without anyone changing state.

    A candidate first runs a pre-vote round and only raises its term if a quorum
    would grant it, so a node cut off by a partition does not come back with a
    higher term and depose a healthy leader (Raft thesis, 9.6).
    """

    vote: Vote
    last_log_id: LogId | None
    pre_vote: bool = False
    transfer: bool = False
    """Sent by the target of a leadership transfer: voters grant it despite the leader lease."""


class VoteResponse(Struct, frozen=True, gc=False):
    vote: Vote
    vote_granted: bool
    last_log_id: LogId | None


class TransferLeaderRequest(Struct, frozen=True):
    """The leader of ``from_leader`` hands leadership to ``to_node_id`` (Openraft's, etcd's
    ``MsgTransferLeader``): once its log holds ``last_log_id``, the target campaigns at once."""

    from_leader: Vote
    to_node_id: NodeId
    last_log_id: LogId | None


class SnapshotMeta(Struct, frozen=True):
    """What a snapshot covers: the last log it includes and the membership at that point."""

    last_log_id: LogId | None
    last_membership: StoredMembership
    snapshot_id: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot's metadata and its data as a seekable binary file.

    Never a whole-snapshot ``bytes``: snapshots may be larger than memory should hold.
    Whoever opened ``data`` closes it.

    ``sha256`` is the lowercase hex sha256 of the whole data, when known (None when
    not). The byte count alone cannot catch a wrong resume stitch or a corrupted
    file of the right size, so transports carry the digest end to end and the
    receiver refuses data that does not match it.
    """

    meta: SnapshotMeta
    data: BinaryIO
    sha256: str | None = None


class SnapshotResponse(Struct, frozen=True):
    vote: Vote


class InstallSnapshotRequest(Struct, frozen=True):
    """One fragment of a snapshot (deprecated per-chunk protocol); ``data`` is base64 in JSON."""

    vote: Vote
    meta: SnapshotMeta
    offset: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    data: bytes
    done: bool


class InstallSnapshotResponse(Struct, frozen=True):
    vote: Vote


class ErrorDetail(Struct, frozen=True, omit_defaults=True):
    """The body of every error answer: ``{"error": {"kind": ..., "message": ...}}``.

    ``kind`` is stable and machine-readable (see docs/protocol.md); the extra
    fields are filled where the kind has data (the expected offset of a 409,
    the greater vote of a rejection, the limit of a 413).
    """

    kind: str
    message: str
    expected_offset: int | None = None
    limit: int | None = None
    vote: Vote | None = None
    expect: Any = None
    got: Any = None


class ErrorBody(Struct, frozen=True):
    error: ErrorDetail


T = TypeVar("T")

_ENCODER: Final = msgspec.json.Encoder()


class JsonCodec(Generic[T]):
    """One type's JSON encoder and decoder, built once.

    ``decode`` raises ``msgspec.ValidationError`` (a ``DecodeError``) whose
    message names the offending field, e.g. ``... - at `$.vote.leader_id.term```.
    """

    __slots__ = ("_decoder", "type")

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)

    def encode(self, value: T) -> bytes:
        return _ENCODER.encode(value)

    def decode(self, data: bytes | bytearray | memoryview | str) -> T:
        return self._decoder.decode(data)


def encode_json(value: Any) -> bytes:
    """Encode any wire value with the shared encoder."""
    return _ENCODER.encode(value)


APPEND_ENTRIES_REQUEST: Final = JsonCodec[AppendEntriesRequest](AppendEntriesRequest)
APPEND_ENTRIES_RESPONSE: Final = JsonCodec[AppendEntriesResponse](AppendEntriesResponse)
VOTE_REQUEST: Final = JsonCodec[VoteRequest](VoteRequest)
VOTE_RESPONSE: Final = JsonCodec[VoteResponse](VoteResponse)
VOTE: Final = JsonCodec[Vote](Vote)
TRANSFER_LEADER_REQUEST: Final = JsonCodec[TransferLeaderRequest](TransferLeaderRequest)
SNAPSHOT_META: Final = JsonCodec[SnapshotMeta](SnapshotMeta)
SNAPSHOT_RESPONSE: Final = JsonCodec[SnapshotResponse](SnapshotResponse)
INSTALL_SNAPSHOT_REQUEST: Final = JsonCodec[InstallSnapshotRequest](InstallSnapshotRequest)
INSTALL_SNAPSHOT_RESPONSE: Final = JsonCodec[InstallSnapshotResponse](InstallSnapshotResponse)
ENTRY: Final = JsonCodec[Entry](Entry)
MEMBERSHIP: Final = JsonCodec[Membership](Membership)
ERROR_BODY: Final = JsonCodec[ErrorBody](ErrorBody)
