"""The in-memory network: delivery through the JSON codecs, and every fault as a caller sees it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import msgspec
import pytest

from raft_http.errors import (
    APIError,
    Closed,
    Fatal,
    NetworkError,
    PayloadTooLarge,
    RemoteError,
    ReplicationClosed,
    SnapshotTransferError,
    Timeout,
    Unreachable,
)
from raft_http.network import RPCOption
from raft_http.raft.snapshot_store import SnapshotStore
from raft_http.testing import MemoryNetwork, MemoryRouter
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    Entry,
    HigherVote,
    Membership,
    Node,
    Normal,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
)

# tests/ may or may not be a package (tests/__init__.py): import the helpers either way.
try:
    from .wire_helpers import log_id, vote
except ImportError:
    from wire_helpers import log_id, vote  # type: ignore[no-redef]

OPT = RPCOption(hard_ttl=5.0)
SHORT = RPCOption(hard_ttl=0.05)
VOTE = vote(3)


class FakeHandler:
    """Records what arrives; answers Success, a granted vote, and its vote for snapshots."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.appends: list[AppendEntriesRequest] = []
        self.votes: list[VoteRequest] = []
        self.snapshots: list[tuple[Vote, SnapshotMeta, bytes]] = []
        self.raise_fatal = False
        self.install_gate: asyncio.Event | None = None
        self.install_started = asyncio.Event()
        self.install_cancelled = False
        self.answer: AppendEntriesResponse = Success()

    def current_vote(self) -> Vote:
        return VOTE

    async def append_entries(self, rpc: AppendEntriesRequest) -> AppendEntriesResponse:
        if self.raise_fatal:
            raise Fatal("storage failed")
        self.appends.append(rpc)
        return self.answer

    async def vote(self, rpc: VoteRequest) -> VoteResponse:
        if self.raise_fatal:
            raise Fatal("storage failed")
        self.votes.append(rpc)
        return VoteResponse(rpc.vote, True, None)

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        if self.raise_fatal:
            raise Fatal("stopped")
        self.install_started.set()
        if self.install_gate is not None:
            try:
                await self.install_gate.wait()
            except asyncio.CancelledError:
                self.install_cancelled = True
                raise
        self.snapshots.append((vote, snapshot.meta, snapshot.data.read()))
        return SnapshotResponse(VOTE)


def append_request(n: int) -> AppendEntriesRequest:
    entries = [Entry(log_id(3, i), Normal(msgspec.Raw(b'{"k":[%d]}' % i))) for i in range(n)]
    return AppendEntriesRequest(VOTE, None, entries, None)


@pytest.fixture
def router() -> MemoryRouter:
    r = MemoryRouter()
    for node_id in (1, 2, 3):
        r.register(node_id, FakeHandler(node_id))
    return r


def net(router: MemoryRouter, source: int, target: int) -> MemoryNetwork:
    return router.factory(source).new_client(target, Node(f"n{target}:1"))


def handler(router: MemoryRouter, node_id: int) -> FakeHandler:
    h = router._handlers[node_id]
    assert isinstance(h, FakeHandler)
    return h


async def can_append(router: MemoryRouter, source: int, target: int) -> bool:
    try:
        await net(router, source, target).append_entries(append_request(1), SHORT)
    except (Unreachable, Timeout):
        return False
    return True


# --- delivery -----------------------------------------------------------------------


async def test_append_is_delivered_as_a_copy(router: MemoryRouter) -> None:
    rpc = append_request(3)
    handler(router, 2).answer = HigherVote(vote(9, 2, committed=False))
    reply = await net(router, 1, 2).append_entries(rpc, OPT)
    assert reply == HigherVote(vote(9, 2, committed=False))
    (received,) = handler(router, 2).appends
    assert received == rpc
    assert received is not rpc
    assert received.entries is not rpc.entries  # nothing mutable is shared
    assert router.sent[(1, 2, "append")] == 1
    assert router.sent[(2, 1, "append")] == 0


async def test_vote_is_delivered(router: MemoryRouter) -> None:
    rpc = VoteRequest(vote(4, committed=False), log_id(3, 7))
    reply = await net(router, 1, 3).vote(rpc, OPT)
    assert reply == VoteResponse(rpc.vote, True, None)
    assert handler(router, 3).votes == [rpc]
    assert router.sent[(1, 3, "vote")] == 1


async def test_unserializable_message_fails_like_the_wire(router: MemoryRouter) -> None:
    bad = AppendEntriesRequest(VOTE, None, [], log_id(-1, 0))  # negative term
    with pytest.raises(msgspec.ValidationError):
        await net(router, 1, 2).append_entries(bad, OPT)
    assert handler(router, 2).appends == []


# --- faults --------------------------------------------------------------------------


async def test_unregistered_target_is_unreachable(router: MemoryRouter) -> None:
    with pytest.raises(Unreachable):
        await net(router, 1, 7).vote(VoteRequest(VOTE, None), OPT)
    router.unregister(2)
    with pytest.raises(Unreachable) as info:
        await net(router, 1, 2).append_entries(append_request(1), OPT)
    assert info.value.target == 2
    assert router.sent[(1, 2, "append")] == 1  # counted though not delivered


async def test_unreachable_is_one_way(router: MemoryRouter) -> None:
    router.set_unreachable(1, 2)
    with pytest.raises(Unreachable):
        await net(router, 1, 2).vote(VoteRequest(VOTE, None), OPT)
    assert handler(router, 2).votes == []
    assert await can_append(router, 1, 3)
    router.set_unreachable(1, 2, on=False)
    assert await can_append(router, 1, 2)


async def test_lost_reply_times_out_after_the_target_acted(router: MemoryRouter) -> None:
    router.set_unreachable(2, 1)  # replies from 2 to 1 are lost
    with pytest.raises(Timeout):
        await net(router, 1, 2).append_entries(append_request(2), SHORT)
    assert len(handler(router, 2).appends) == 1


async def test_isolate_cuts_both_ways(router: MemoryRouter) -> None:
    router.isolate(3)
    assert not await can_append(router, 1, 3)
    assert not await can_append(router, 3, 2)
    assert await can_append(router, 1, 2)
    router.isolate(3, on=False)
    assert await can_append(router, 3, 2)


async def test_partition_and_heal(router: MemoryRouter) -> None:
    router.partition({1, 2}, {3})
    assert await can_append(router, 1, 2)
    assert await can_append(router, 2, 1)
    assert not await can_append(router, 1, 3)
    assert not await can_append(router, 3, 2)
    router.heal()
    assert await can_append(router, 3, 2)
    assert await can_append(router, 1, 3)
    with pytest.raises(ValueError, match="two partition groups"):
        router.partition({1, 2}, {2, 3})


async def test_delay_beyond_the_deadline_times_out(router: MemoryRouter) -> None:
    router.set_delay(1, 2, 10.0)
    with pytest.raises(Timeout) as info:
        await net(router, 1, 2).vote(VoteRequest(VOTE, None), SHORT)
    assert info.value.timeout == SHORT.hard_ttl
    assert handler(router, 2).votes == []
    router.set_delay(1, 2, 0.01)
    await net(router, 1, 2).vote(VoteRequest(VOTE, None), OPT)
    assert len(handler(router, 2).votes) == 1
    with pytest.raises(ValueError, match="negative"):
        router.set_delay(1, 2, -1)


async def test_partition_while_in_flight(router: MemoryRouter) -> None:
    router.set_delay(1, 2, 0.2)
    call = asyncio.ensure_future(net(router, 1, 2).append_entries(append_request(1), OPT))
    await asyncio.sleep(0.01)
    router.isolate(2)
    with pytest.raises(Unreachable):
        await call
    assert handler(router, 2).appends == []


async def test_fail_next(router: MemoryRouter) -> None:
    router.fail_next(1, 2, lambda: NetworkError("reset", target=2), count=2)
    for _ in range(2):
        with pytest.raises(NetworkError, match="reset"):
            await net(router, 1, 2).append_entries(append_request(1), OPT)
    assert await can_append(router, 2, 1)  # the other direction never failed
    await net(router, 1, 2).append_entries(append_request(1), OPT)
    assert len(handler(router, 2).appends) == 1
    assert router.sent[(1, 2, "append")] == 3


async def test_max_entries(router: MemoryRouter) -> None:
    router.set_max_entries(2, 2)
    with pytest.raises(PayloadTooLarge) as info:
        await net(router, 1, 2).append_entries(append_request(3), OPT)
    assert info.value.entries_hint == 2
    await net(router, 1, 2).append_entries(append_request(2), OPT)
    await net(router, 1, 3).append_entries(append_request(3), OPT)  # another target
    router.set_max_entries(2, None)
    await net(router, 1, 2).append_entries(append_request(3), OPT)
    assert [len(r.entries) for r in handler(router, 2).appends] == [2, 3]


async def test_block_hangs_until_the_deadline(router: MemoryRouter) -> None:
    router.block(1, 2)
    with pytest.raises(Timeout):
        await net(router, 1, 2).vote(VoteRequest(VOTE, None), SHORT)
    assert handler(router, 2).votes == []
    router.heal()
    await net(router, 1, 2).vote(VoteRequest(VOTE, None), SHORT)


async def test_fatal_handler_is_a_remote_error(router: MemoryRouter) -> None:
    handler(router, 2).raise_fatal = True
    with pytest.raises(RemoteError) as info:
        await net(router, 1, 2).append_entries(append_request(1), OPT)
    assert isinstance(info.value.source, Fatal)
    assert info.value.target == 2
    assert info.value.node == Node("n2:1")
    with pytest.raises(RemoteError):
        await net(router, 1, 2).vote(VoteRequest(VOTE, None), OPT)


def test_backoff_is_the_routers() -> None:
    router = MemoryRouter(backoff_seconds=0.01)
    backoff = net(router, 1, 2).backoff()
    assert [next(backoff) for _ in range(3)] == [0.01] * 3


async def test_install_snapshot_is_deprecated(router: MemoryRouter) -> None:
    from raft_http.types import InstallSnapshotRequest

    rpc = InstallSnapshotRequest(VOTE, snapshot_meta(), 0, b"x", True)
    with pytest.warns(DeprecationWarning, match="deprecated"), pytest.raises(NotImplementedError):
        await net(router, 1, 2).install_snapshot(rpc, OPT)


# --- snapshots -----------------------------------------------------------------------


def snapshot_meta() -> SnapshotMeta:
    membership = Membership(configs=[[1, 2, 3]], nodes={n: Node(f"n{n}:1") for n in (1, 2, 3)})
    return SnapshotMeta(log_id(3, 40), StoredMembership(log_id(1, 0), membership), "3-40-1")


def snapshot(data: bytes) -> Snapshot:
    f: BinaryIO = io.BytesIO(data)
    f.seek(len(data) // 2)  # a shared position must not matter
    return Snapshot(snapshot_meta(), f)


def never() -> asyncio.Future[ReplicationClosed]:
    return asyncio.get_running_loop().create_future()


@pytest.mark.parametrize("size", [0, 10_000, 3 * 1024 * 1024 + 5])
async def test_full_snapshot_is_delivered(router: MemoryRouter, size: int) -> None:
    data = bytes(i % 253 for i in range(size))
    option = RPCOption(hard_ttl=30, snapshot_chunk_size=4096 if size < 100_000 else None)
    cancel = never()
    reply = await net(router, 1, 2).full_snapshot(VOTE, snapshot(data), cancel, option)
    assert reply == SnapshotResponse(VOTE)
    ((vote, meta, received),) = handler(router, 2).snapshots
    assert (vote, meta) == (VOTE, snapshot_meta())
    assert received == data
    assert not cancel.cancelled()  # the caller's future is left alone
    assert router.sent[(1, 2, "snapshot")] == 1


async def test_full_snapshot_cancelled_before_start(router: MemoryRouter) -> None:
    cancel = never()
    cancel.set_result(ReplicationClosed("leader stepped down"))
    with pytest.raises(Closed, match="leader stepped down"):
        await net(router, 1, 2).full_snapshot(VOTE, snapshot(b"abc"), cancel, OPT)
    assert handler(router, 2).snapshots == []


async def test_full_snapshot_cancelled_during_transfer(router: MemoryRouter) -> None:
    target = handler(router, 2)
    target.install_gate = asyncio.Event()

    async def cancel_once_started() -> ReplicationClosed:
        await target.install_started.wait()
        return ReplicationClosed("newer snapshot")

    with pytest.raises(Closed, match="newer snapshot") as info:
        await net(router, 1, 2).full_snapshot(
            VOTE, snapshot(b"abc" * 1000), cancel_once_started(), OPT
        )
    assert info.value.closed.reason == "newer snapshot"
    assert target.install_cancelled
    assert target.snapshots == []


async def test_full_snapshot_faults(router: MemoryRouter) -> None:
    router.set_unreachable(1, 2)
    with pytest.raises(Unreachable):
        await net(router, 1, 2).full_snapshot(VOTE, snapshot(b"abc"), never(), OPT)
    router.heal()
    router.block(1, 2)
    with pytest.raises(Timeout):
        await net(router, 1, 2).full_snapshot(VOTE, snapshot(b"abc"), never(), SHORT)
    router.heal()
    handler(router, 2).raise_fatal = True
    with pytest.raises(RemoteError) as info:
        await net(router, 1, 2).full_snapshot(VOTE, snapshot(b"abc"), never(), OPT)
    assert isinstance(info.value.source, Fatal)
    assert handler(router, 2).snapshots == []
    assert router.sent[(1, 2, "snapshot")] == 3


def test_no_aiohttp_import() -> None:
    code = "import sys, raft_http.testing; sys.exit('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --- end-to-end checksum ---------------------------------------------------------------


class ChecksumHandler(FakeHandler):
    """Also records the ``sha256`` each installed Snapshot carried."""

    def __init__(self, node_id: int) -> None:
        super().__init__(node_id)
        self.given_sha256: list[str | None] = []

    async def install_full_snapshot(self, vote: Vote, snapshot: Snapshot) -> SnapshotResponse:
        self.given_sha256.append(snapshot.sha256)
        return await super().install_full_snapshot(vote, snapshot)


def summed(data: bytes, sha256: str | None) -> Snapshot:
    f: BinaryIO = io.BytesIO(data)
    f.seek(len(data) // 3)
    return Snapshot(snapshot_meta(), f, sha256=sha256)


async def test_full_snapshot_checksum_is_verified_and_passed_on(router: MemoryRouter) -> None:
    target = ChecksumHandler(2)
    router.register(2, target)
    data = bytes(i % 251 for i in range(300_000))
    digest = hashlib.sha256(data).hexdigest()
    option = RPCOption(hard_ttl=30, snapshot_chunk_size=16 * 1024)
    await net(router, 1, 2).full_snapshot(VOTE, summed(data, digest), never(), option)
    await net(router, 1, 2).full_snapshot(VOTE, summed(data, None), never(), option)
    assert [received for _, _, received in target.snapshots] == [data, data]
    assert target.given_sha256 == [digest, None]


async def test_full_snapshot_with_a_wrong_checksum_is_refused(router: MemoryRouter) -> None:
    target = ChecksumHandler(2)
    router.register(2, target)
    data = bytes(i % 251 for i in range(100_000))
    wrong = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(RemoteError, match="checksum mismatch") as info:
        await net(router, 1, 2).full_snapshot(VOTE, summed(data, wrong), never(), OPT)
    assert isinstance(info.value.source, APIError)
    assert info.value.source.kind == "checksum_mismatch"  # as the HTTP client reports it
    assert wrong in str(info.value)
    assert hashlib.sha256(data).hexdigest() in str(info.value)
    assert not target.install_started.is_set()
    assert target.snapshots == []


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "z" * 64, "a" * 65])
async def test_full_snapshot_with_a_malformed_checksum_is_a_transfer_error(
    router: MemoryRouter, bad: str
) -> None:
    with pytest.raises(SnapshotTransferError, match="sha256"):
        await net(router, 1, 2).full_snapshot(VOTE, summed(b"abc", bad), never(), OPT)
    assert handler(router, 2).snapshots == []


async def test_corrupted_snapshot_file_is_refused(router: MemoryRouter, tmp_path: Path) -> None:
    """Bit rot after the store verified its snapshot: the sidecar's sha256 catches it on the way."""
    store = SnapshotStore(tmp_path)
    data = bytes(i % 251 for i in range(200_000))

    def write(f: BinaryIO) -> None:
        f.write(data)

    await store.save(snapshot_meta(), write)
    (data_file,) = tmp_path.glob("*.snap")
    good = await store.open_latest()
    assert good is not None
    with good.data:
        assert good.sha256 == hashlib.sha256(data).hexdigest()
        await net(router, 1, 2).full_snapshot(VOTE, good, never(), OPT)
    assert [received for _, _, received in handler(router, 2).snapshots] == [data]

    with open(data_file, "r+b") as f:  # one byte flipped, same size
        f.seek(123_456)
        byte = f.read(1)
        f.seek(123_456)
        f.write(bytes([byte[0] ^ 0x40]))
    rotten = await store.open_latest()
    assert rotten is not None
    with rotten.data, pytest.raises(RemoteError, match="checksum mismatch"):
        await net(router, 1, 2).full_snapshot(VOTE, rotten, never(), OPT)
    assert len(handler(router, 2).snapshots) == 1
