"""The key-value state machine of the example application, after Openraft's raft-kv example.

Commands are Openraft's example bodies, externally tagged by their single outer key:
``{"Set": {"key": "foo", "value": "bar"}}`` and ``{"Delete": {"key": "foo"}}``.
The HTTP API validates a command (``decode_command``) before proposing it, so a
malformed command never reaches the log in practice; if one does, ``apply``
answers an error value for that entry instead of stopping the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Final

import msgspec
from msgspec import Struct

from ..types import Entry, Normal

logger = logging.getLogger(__name__)


class Set(Struct, frozen=True, forbid_unknown_fields=True):
    """Set ``key`` to ``value``; answers the value set."""

    key: str
    value: str


class Delete(Struct, frozen=True, forbid_unknown_fields=True):
    """Remove ``key``; answers the value removed (or null)."""

    key: str


Command = Set | Delete


class _Envelope(Struct, frozen=True, forbid_unknown_fields=True):
    """The outer object of a command: exactly one of its fields is present.

    msgspec has no externally tagged unions, so the tag is a field name here.
    """

    set: Set | None = msgspec.field(default=None, name="Set")
    delete: Delete | None = msgspec.field(default=None, name="Delete")


class KVResponse(Struct, frozen=True, omit_defaults=True):
    """What ``apply`` answers per command: the value set or removed; ``error`` if undecodable."""

    value: str | None
    error: str | None = None


class InvalidCommand(ValueError):
    """The bytes are not one well-formed command; the message names the JSON path."""


_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
_SNAPSHOT_DECODER: Final = msgspec.json.Decoder(dict[str, str])
_ENCODER: Final = msgspec.json.Encoder()


def decode_command(data: bytes | bytearray | memoryview | str) -> Command:
    """Decode and validate one command (raises ``InvalidCommand``)."""
    try:
        envelope = _ENVELOPE_DECODER.decode(data)
    except msgspec.DecodeError as e:
        raise InvalidCommand(str(e)) from None
    present = [c for c in (envelope.set, envelope.delete) if c is not None]
    if len(present) != 1:
        raise InvalidCommand(
            'a command is an object with exactly one key, "Set" or "Delete" - at `$`'
        )
    return present[0]


def encode_command(command: Command) -> bytes:
    """The JSON of a command, as it goes into the log."""
    if isinstance(command, Set):
        return _ENCODER.encode({"Set": command})
    return _ENCODER.encode({"Delete": command})


class KVStateMachine:
    """A ``dict[str, str]`` fed by committed ``Set``/``Delete`` commands.

    Implements ``raft_http.raft.storage.StateMachine``. The state lives in memory
    only: the core rebuilds it from the latest snapshot and the log at start.
    """

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        """A local read: what this node has applied so far (may be stale on a follower)."""
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)

    async def apply(self, entries: Sequence[Entry]) -> list[Any]:
        responses: list[Any] = []
        for entry in entries:
            payload = entry.payload
            if isinstance(payload, Normal):
                responses.append(self._apply_command(entry, bytes(payload.data)))
            else:
                responses.append(None)
        return responses

    def _apply_command(self, entry: Entry, data: bytes) -> KVResponse:
        try:
            command = decode_command(data)
        except InvalidCommand as e:
            # Committed already: every node skips it the same way, so the replicas agree.
            logger.error("skipping malformed command at log index %d: %s", entry.log_id.index, e)
            return KVResponse(value=None, error=str(e))
        if isinstance(command, Set):
            self._data[command.key] = command.value
            return KVResponse(value=command.value)
        return KVResponse(value=self._data.pop(command.key, None))

    def begin_snapshot(self) -> Callable[[BinaryIO], None]:
        frozen = dict(self._data)

        def write(out: BinaryIO) -> None:
            out.write(_ENCODER.encode(frozen))

        return write

    async def install_snapshot(self, data: BinaryIO) -> None:
        def load() -> dict[str, str]:
            data.seek(0)
            return _SNAPSHOT_DECODER.decode(data.read())

        self._data = await asyncio.to_thread(load)
