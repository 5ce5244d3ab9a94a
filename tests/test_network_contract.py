"""The small pieces of the network contract: RPCOption, Backoff, the abstract classes, the errors.

Also the import boundary: the core modules must load without aiohttp.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
import subprocess
import sys
from collections.abc import Awaitable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import raft_http
from raft_http.errors import (
    APIError,
    Closed,
    Fatal,
    InstallSnapshotError,
    NetworkError,
    PayloadTooLarge,
    RaftError,
    RaftHttpError,
    RemoteError,
    ReplicationClosed,
    RPCError,
    SnapshotMismatch,
    SnapshotTransferError,
    StreamingError,
    Timeout,
    Unreachable,
)
from raft_http.network import (
    DEFAULT_SNAPSHOT_CHUNK_SIZE,
    Backoff,
    RaftNetwork,
    RaftNetworkFactory,
    RPCOption,
)
from raft_http.types import (
    AppendEntriesRequest,
    AppendEntriesResponse,
    InstallSnapshotRequest,
    LeaderId,
    Membership,
    Node,
    Snapshot,
    SnapshotMeta,
    SnapshotResponse,
    StoredMembership,
    Success,
    Vote,
    VoteRequest,
    VoteResponse,
)

FAST = settings(max_examples=100, deadline=None)
VOTE = Vote(LeaderId(2, 1), committed=True)
META = SnapshotMeta(None, StoredMembership(None, Membership([[1]], {1: Node("127.0.0.1:1")})), "s1")

# --- RPCOption ------------------------------------------------------------------------


@FAST
@given(st.floats(min_value=1e-6, max_value=1e6))
def test_soft_ttl_is_three_quarters_of_hard_ttl(hard: float) -> None:
    opt = RPCOption(hard)
    assert opt.soft_ttl == pytest.approx(hard * 0.75)
    assert 0 < opt.soft_ttl < opt.hard_ttl


def test_chunk_size_defaults_to_3_mib() -> None:
    assert DEFAULT_SNAPSHOT_CHUNK_SIZE == 3 * 1024 * 1024
    assert RPCOption(1.0).chunk_size == 3 * 1024 * 1024
    assert RPCOption(1.0, snapshot_chunk_size=None).chunk_size == 3 * 1024 * 1024
    assert RPCOption(1.0, snapshot_chunk_size=1).chunk_size == 1
    assert RPCOption(1.0, snapshot_chunk_size=4096).chunk_size == 4096


@pytest.mark.parametrize("hard", [0.0, -1.0, -0.001, math.nan, -math.inf, math.inf])
def test_hard_ttl_must_be_positive(hard: float) -> None:
    with pytest.raises(ValueError, match="hard_ttl"):
        RPCOption(hard)


@pytest.mark.parametrize("size", [0, -1, -(2**40)])
def test_chunk_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="snapshot_chunk_size"):
        RPCOption(1.0, snapshot_chunk_size=size)


def test_rpc_option_is_frozen() -> None:
    opt = RPCOption(1.0)
    with pytest.raises(AttributeError):
        opt.hard_ttl = 2.0  # type: ignore[misc]


# --- Backoff --------------------------------------------------------------------------


def _take(backoff: Backoff, n: int) -> list[float]:
    return list(itertools.islice(backoff, n))


def test_constant_default_is_half_a_second_forever() -> None:
    assert _take(Backoff.constant(), 1000) == [0.5] * 1000


@FAST
@given(st.floats(min_value=0, max_value=1e6))
def test_constant_repeats_its_value(seconds: float) -> None:
    b = Backoff.constant(seconds)
    assert iter(b) is b
    assert _take(b, 50) == [seconds] * 50


def test_constant_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        Backoff.constant(-0.1)


@pytest.mark.parametrize("seconds", [math.nan, math.inf])
def test_constant_rejects_nan_and_inf(seconds: float) -> None:
    # asyncio.sleep(nan) never returns: a NaN backoff would stall replication for good.
    with pytest.raises(ValueError, match="finite"):
        Backoff.constant(seconds)


exp_params = st.tuples(
    st.floats(min_value=1e-4, max_value=10),  # initial
    st.floats(min_value=1, max_value=1000),  # cap / initial
    st.floats(min_value=1, max_value=10),  # multiplier
    st.floats(min_value=0, max_value=1),  # jitter
    st.integers(min_value=0, max_value=2**32),  # seed
)


def _bases(initial: float, cap: float, multiplier: float, n: int) -> list[float]:
    """The delays before jitter, computed the documented way."""
    out, delay = [], initial
    for _ in range(n):
        out.append(delay)
        delay = min(cap, delay * multiplier)
    return out


@FAST
@given(exp_params)
def test_exponential_without_jitter_is_monotone_up_to_cap(p: tuple[float, ...]) -> None:
    initial, ratio, multiplier, _, seed = p
    cap = initial * ratio
    got = _take(
        Backoff.exponential(
            initial, cap, multiplier=multiplier, jitter=0.0, rng=random.Random(seed)
        ),
        60,
    )
    assert got[0] == initial
    assert all(a <= b for a, b in itertools.pairwise(got))
    assert all(d <= cap for d in got)
    assert got == _bases(initial, cap, multiplier, 60)
    if multiplier >= 1.5:  # it gets there in 60 steps (cap/initial <= 1000)
        assert got[-1] == cap


@FAST
@given(exp_params)
def test_exponential_jitter_shortens_by_at_most_jitter(p: tuple[float, ...]) -> None:
    initial, ratio, multiplier, jitter, seed = p
    cap = initial * ratio
    got = _take(
        Backoff.exponential(
            initial, cap, multiplier=multiplier, jitter=jitter, rng=random.Random(seed)
        ),
        40,
    )
    for d, base in zip(got, _bases(initial, cap, multiplier, 40), strict=True):
        assert base * (1 - jitter) - 1e-12 <= d <= base
        assert d >= 0


@FAST
@given(exp_params)
def test_exponential_is_deterministic_with_a_seeded_rng(p: tuple[float, ...]) -> None:
    initial, ratio, multiplier, jitter, seed = p
    cap = initial * ratio

    def make() -> Backoff:
        return Backoff.exponential(
            initial, cap, multiplier=multiplier, jitter=jitter, rng=random.Random(seed)
        )

    assert _take(make(), 30) == _take(make(), 30)


def test_exponential_jitter_actually_varies() -> None:
    got = _take(Backoff.exponential(1.0, 1.0, jitter=0.5, rng=random.Random(7)), 20)
    assert len(set(got)) > 1
    assert all(0.5 <= d <= 1.0 for d in got)


def test_exponential_defaults() -> None:
    got = _take(Backoff.exponential(jitter=0.0), 12)
    assert got[:4] == [0.05, 0.1, 0.2, 0.4]
    assert got[-1] == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.0},
        {"initial": -1.0},
        {"initial": 2.0, "cap": 1.0},
        {"multiplier": 0.5},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"jitter": math.nan},
    ],
)
def test_exponential_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff.exponential(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": math.nan}, {"cap": math.nan}, {"multiplier": math.nan}, {"cap": math.inf}],
)
def test_exponential_rejects_nan(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"(?i)nan|finite|negative|initial"):
        Backoff.exponential(**kwargs)


# --- RaftNetwork / RaftNetworkFactory -------------------------------------------------


class _MinimalNetwork(RaftNetwork):
    """Implements only the abstract methods, to observe the defaults."""

    async def append_entries(
        self, rpc: AppendEntriesRequest, option: RPCOption
    ) -> AppendEntriesResponse:
        return Success()

    async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
        return VoteResponse(rpc.vote, False, None)

    async def full_snapshot(
        self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: Awaitable[ReplicationClosed],
        option: RPCOption,
    ) -> SnapshotResponse:
        return SnapshotResponse(vote)


class _MinimalFactory(RaftNetworkFactory):
    def new_client(self, target: int, node: Node) -> RaftNetwork:
        return _MinimalNetwork()


async def test_default_install_snapshot_is_deprecated_and_not_implemented() -> None:
    net = _MinimalNetwork()
    req = InstallSnapshotRequest(VOTE, META, 0, b"abc", True)
    with (
        pytest.warns(DeprecationWarning, match="full_snapshot"),
        pytest.raises(NotImplementedError, match="_MinimalNetwork"),
    ):
        await net.install_snapshot(req, RPCOption(1.0))


def test_default_backoff_is_constant_half_second() -> None:
    b = _MinimalNetwork().backoff()
    assert isinstance(b, Backoff)
    assert _take(b, 100) == [0.5] * 100


def test_network_and_factory_are_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        RaftNetwork()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="abstract"):
        RaftNetworkFactory()  # type: ignore[abstract]

    class Partial(RaftNetwork):
        async def vote(self, rpc: VoteRequest, option: RPCOption) -> VoteResponse:
            raise NotImplementedError

    with pytest.raises(TypeError, match="append_entries"):
        Partial()  # type: ignore[abstract]


async def test_factory_builds_networks_and_close_is_optional() -> None:
    factory = _MinimalFactory()
    net = factory.new_client(3, Node("127.0.0.1:9"))
    assert isinstance(net, RaftNetwork)
    assert (
        await net.append_entries(AppendEntriesRequest(VOTE, None, [], None), RPCOption(1.0))
        == Success()
    )
    await factory.close()  # the default hook exists and releases nothing


# --- Errors ---------------------------------------------------------------------------


@FAST
@given(
    st.text(min_size=1, max_size=20),
    st.none() | st.integers(min_value=0, max_value=2**63),
    st.floats(min_value=0, max_value=1e6),
)
def test_timeout_carries_its_data(action: str, target: int | None, timeout: float) -> None:
    e = Timeout(action, target, timeout)
    assert (e.action, e.target, e.timeout) == (action, target, timeout)
    assert action in str(e)
    assert str(target) in str(e)


@FAST
@given(
    st.integers(min_value=-(2**31), max_value=2**31),
    st.none() | st.integers(min_value=0, max_value=2**40),
    st.none() | st.integers(min_value=0, max_value=100),
)
def test_payload_too_large_hints(entries: int, limit: int | None, target: int | None) -> None:
    e = PayloadTooLarge("append_entries", entries_hint=entries, bytes_hint=limit, target=target)
    assert e.entries_hint >= 1
    assert e.entries_hint == max(1, entries)
    assert e.bytes_hint == limit
    assert e.target == target
    assert e.action == "append_entries"
    if limit is not None:
        assert str(limit) in str(e)


def test_remote_error_carries_source_and_node() -> None:
    src = Fatal("disk gone")
    node = Node("127.0.0.1:7000")
    e = RemoteError(4, node, src)
    assert e.source is src
    assert e.node == node
    assert e.target == 4
    assert "disk gone" in str(e)
    api = RemoteError(None, None, APIError("not_leader", "ask 2", leader=2))
    assert isinstance(api.source, APIError)
    assert api.source.kind == "not_leader"
    assert api.source.data == {"leader": 2}
    assert api.node is None


def test_unreachable_and_network_error_carry_target() -> None:
    assert Unreachable("refused", target=5).target == 5
    assert NetworkError("reset").target is None
    assert "refused" in str(Unreachable("refused", target=5))


def test_closed_carries_its_reason() -> None:
    why = ReplicationClosed("leader stepped down")
    e = Closed(why)
    assert e.closed is why
    assert "leader stepped down" in str(e)


def test_snapshot_mismatch_carries_expect_and_got() -> None:
    e = SnapshotMismatch(("s1", 4096), ("s1", 0))
    assert e.expect == ("s1", 4096)
    assert e.got == ("s1", 0)
    assert isinstance(e, InstallSnapshotError)
    assert isinstance(e, RaftError)
    assert not isinstance(e, RPCError | StreamingError)


def test_snapshot_transfer_error_carries_meta() -> None:
    e = SnapshotTransferError(META, "file too short")
    assert e.meta is META
    assert isinstance(e, StreamingError)
    assert not isinstance(e, RPCError)


@pytest.mark.parametrize(
    ("cls", "is_rpc", "is_streaming"),
    [
        (Timeout, True, True),
        (Unreachable, True, True),
        (NetworkError, True, True),
        (RemoteError, True, True),
        (PayloadTooLarge, True, False),
        (Closed, False, True),
        (SnapshotTransferError, False, True),
        (Fatal, False, False),
        (APIError, False, False),
    ],
)
def test_error_hierarchy(cls: type[Exception], is_rpc: bool, is_streaming: bool) -> None:
    assert issubclass(cls, RaftHttpError)
    assert issubclass(cls, RPCError) == is_rpc
    assert issubclass(cls, StreamingError) == is_streaming


def test_except_unreachable_catches_from_either_side() -> None:
    for base in (RPCError, StreamingError):
        with pytest.raises(base):
            raise Unreachable("down", target=1)


# --- Package surface and import boundary ----------------------------------------------


def test_all_names_resolve() -> None:
    assert len(raft_http.__all__) == len(set(raft_http.__all__))
    for name in raft_http.__all__:
        assert getattr(raft_http, name) is not None, name
    mod = importlib.import_module("raft_http")
    namespace: dict[str, object] = {}
    exec("from raft_http import *", namespace)  # checks the star-import
    assert set(raft_http.__all__) <= set(namespace)
    assert mod.__version__


def test_core_never_imports_aiohttp() -> None:
    code = (
        "import sys\n"
        "import raft_http, raft_http.types, raft_http.network, raft_http.errors\n"
        "import raft_http.testing, raft_http.raft\n"
        "bad = sorted(m for m in sys.modules if m == 'aiohttp' or m.startswith('aiohttp.'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"aiohttp imported: {proc.stdout} {proc.stderr}"


def test_import_check_can_fail() -> None:
    """The boundary check above would notice aiohttp (the client does import it)."""
    code = "import sys, raft_http.client; sys.exit(0 if 'aiohttp' in sys.modules else 1)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
