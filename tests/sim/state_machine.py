"""The key-value state machine of the simulation, which reports every entry it applies."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from raft_http.types import Entry, LogId, Normal


def set_command(key: str, value: str) -> bytes:
    return json.dumps({"op": "set", "key": key, "value": value}).encode()


def delete_command(key: str) -> bytes:
    return json.dumps({"op": "delete", "key": key}).encode()


class SimKV:
    """A dict of str to str; ``on_apply(log_id, data)`` sees each entry applied, in order."""

    def __init__(self, on_apply: Callable[[LogId, bytes | None], None]) -> None:
        self.data: dict[str, str] = {}
        self.on_apply = on_apply

    async def apply(self, entries: Sequence[Entry]) -> list[Any]:
        for entry in entries:
            payload = entry.payload
            data = bytes(payload.data) if isinstance(payload, Normal) else None
            self.on_apply(entry.log_id, data)
            if data is None:
                continue
            command = json.loads(data)
            if command["op"] == "set":
                self.data[command["key"]] = command["value"]
            else:
                self.data.pop(command["key"], None)
        return [None] * len(entries)

    def begin_snapshot(self) -> Callable[[BinaryIO], None]:
        frozen = json.dumps(self.data, sort_keys=True).encode()
        return lambda out: out.write(frozen) and None

    async def install_snapshot(self, data: BinaryIO) -> None:
        self.data = json.loads(data.read())
