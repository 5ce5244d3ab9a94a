"""KVStateMachine: commands, responses, snapshots, and what a malformed committed command does."""

from __future__ import annotations

import io

import msgspec
import pytest

from raft_http.kv.state_machine import (
    Delete,
    InvalidCommand,
    KVResponse,
    KVStateMachine,
    Set,
    decode_command,
    encode_command,
)
from raft_http.types import Blank, Entry, LeaderId, LogId, Membership, MembershipChange, Normal


def _entry(index: int, payload: Blank | Normal | MembershipChange) -> Entry:
    return Entry(LogId(LeaderId(1, 1), index), payload)


def _normal(index: int, data: bytes) -> Entry:
    return _entry(index, Normal(msgspec.Raw(data)))


def test_decode_set_and_delete() -> None:
    assert decode_command(b'{"Set":{"key":"foo","value":"bar"}}') == Set("foo", "bar")
    assert decode_command('{"Delete":{"key":"foo"}}') == Delete("foo")


def test_encode_round_trips() -> None:
    for command in (Set("k", "v\u00e9"), Delete("k")):
        assert decode_command(encode_command(command)) == command
    assert encode_command(Set("foo", "bar")) == b'{"Set":{"key":"foo","value":"bar"}}'


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{}", "exactly one key"),
        (b'{"Set":{"key":"a","value":"b"},"Delete":{"key":"a"}}', "exactly one key"),
        (b'{"Set":{"key":1,"value":"b"}}', "$.Set.key"),
        (b'{"Set":{"key":"a"}}', "value"),
        (b'{"Delete":{"key":"a","extra":1}}', "extra"),
        (b'{"Put":{"key":"a"}}', "Put"),
        (b"[1, 2]", "object"),
        (b'"foo"', "object"),
        (b"not json", "malformed"),
        (b"", "truncated"),
    ],
)
def test_decode_rejects_malformed_commands(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidCommand, match=fragment.replace("$", r"\$").replace(".", r"\.")):
        decode_command(data)


async def test_apply_answers_per_entry() -> None:
    sm = KVStateMachine()
    entries = [
        _entry(1, Blank()),
        _normal(2, b'{"Set":{"key":"foo","value":"bar"}}'),
        _normal(3, b'{"Set":{"key":"foo","value":"baz"}}'),
        _entry(4, MembershipChange(Membership(configs=[[1]], nodes={}))),
        _normal(5, b'{"Delete":{"key":"foo"}}'),
        _normal(6, b'{"Delete":{"key":"foo"}}'),
        _normal(7, b'{"Set":{"key":"x","value":"1"}}'),
    ]
    responses = await sm.apply(entries)
    assert responses == [
        None,
        KVResponse("bar"),
        KVResponse("baz"),
        None,
        KVResponse("baz"),
        KVResponse(None),
        KVResponse("1"),
    ]
    assert sm.get("foo") is None
    assert sm.get("x") == "1"
    assert len(sm) == 1


async def test_malformed_committed_command_does_not_stop_apply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sm = KVStateMachine()
    responses = await sm.apply(
        [
            _normal(1, b'{"Set":{"key":"a","value":"1"}}'),
            _normal(2, b'{"Bogus":{}}'),
            _normal(3, b'{"Set":{"key":"b","value":"2"}}'),
        ]
    )
    assert responses[0] == KVResponse("1")
    assert responses[1].value is None
    assert "Bogus" in responses[1].error
    assert responses[2] == KVResponse("2")
    assert (sm.get("a"), sm.get("b")) == ("1", "2")
    assert "log index 2" in caplog.text
    # The response encodes with its error; a good one carries no error field.
    assert msgspec.json.encode(responses[2]) == b'{"value":"2"}'


async def test_snapshot_is_a_copy_taken_at_begin() -> None:
    sm = KVStateMachine()
    await sm.apply([_normal(1, b'{"Set":{"key":"a","value":"1"}}')])
    writer = sm.begin_snapshot()
    await sm.apply([_normal(2, b'{"Set":{"key":"a","value":"2"}}')])
    buf = io.BytesIO()
    writer(buf)
    assert msgspec.json.decode(buf.getvalue()) == {"a": "1"}

    other = KVStateMachine()
    await other.apply([_normal(1, b'{"Set":{"key":"stale","value":"x"}}')])
    buf.seek(5)  # install must not depend on the caller's file position
    await other.install_snapshot(buf)
    assert other.get("a") == "1"
    assert other.get("stale") is None


async def test_install_rejects_a_corrupt_snapshot_and_keeps_state() -> None:
    sm = KVStateMachine()
    await sm.apply([_normal(1, b'{"Set":{"key":"a","value":"1"}}')])
    with pytest.raises(msgspec.DecodeError):
        await sm.install_snapshot(io.BytesIO(b'{"a": 1}'))
    assert sm.get("a") == "1"
