"""Why the hot-path wire Structs are ``gc=False``: AppendEntries decode with and without GC.

    python bench/profile_gc_decode.py

Builds the same request types twice (tracked by the cyclic GC, and ``gc=False`` as in
types.py), keeps a 300,000-object heap alive as a node does, and decodes 100 x 100 B and
300 x 1 KiB requests with each, interleaved, in one process. Prints us per entry.
"""

# No "from __future__ import annotations": the Structs are local, their annotations must be real.
import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Raw, Struct

Count = Annotated[int, Meta(ge=0)]


def request_type(tracked: bool) -> Any:
    class LeaderId(Struct, frozen=True, order=True, gc=tracked):
        term: Count
        node_id: Count

    class LogId(Struct, frozen=True, order=True, gc=tracked):
        leader_id: LeaderId
        index: Count

    class Vote(Struct, frozen=True, gc=tracked):
        leader_id: LeaderId
        committed: bool = False

    class Blank(Struct, frozen=True, tag="blank", gc=tracked):
        pass

    class Normal(Struct, frozen=True, tag="normal", gc=tracked):
        data: Raw

    class Entry(Struct, frozen=True, gc=tracked):
        log_id: LogId
        payload: Blank | Normal

    class AppendEntriesRequest(Struct, frozen=True):
        vote: Vote
        prev_log_id: LogId | None
        entries: list[Entry]
        leader_commit: LogId | None

    def build(n: int, size: int) -> bytes:
        lid = LeaderId(1, 1)
        data = Raw(b'"' + b"v" * (size - 2) + b'"')
        entries = [Entry(LogId(lid, i), Normal(data)) for i in range(n)]
        return msgspec.json.encode(AppendEntriesRequest(Vote(lid, True), None, entries, None))

    return msgspec.json.Decoder(AppendEntriesRequest), build


def main() -> None:
    heap = [{"k": i} for i in range(300_000)]  # what a node keeps alive: the GC walks it
    codecs = {tracked: request_type(tracked) for tracked in (True, False)}
    for _ in range(3):
        for n, size in ((100, 100), (300, 1024)):
            cells = []
            for tracked, (decoder, build) in codecs.items():
                body = build(n, size)
                t0 = time.perf_counter()
                for _ in range(300):
                    decoder.decode(body)
                cells.append(
                    f"{'tracked' if tracked else 'gc=False'} "
                    f"{(time.perf_counter() - t0) / 300 / n * 1e6:.2f} us/entry"
                )
            print(f"{n} x {size} B: " + ", ".join(cells))
    assert heap


if __name__ == "__main__":
    main()
