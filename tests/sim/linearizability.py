"""A linearizability checker for a key-value register: Wing & Gong's search with Lowe's memo.

A history is a list of ``Op``s: ``set``, ``delete`` and ``read`` of one key each,
with the time the client invoked it and the time it completed. Operation A
precedes B in real time iff ``A.complete < B.invoke``; ops that overlap may take
effect in either order. A write whose outcome is unknown (the client timed out)
completes at ``+inf``: it may take effect at any point after its invoke, or never
(taking effect after everything else is the same as never). Reads that did not
return put no constraint on anything and are left out of the history.

The register model is P-compositional (Herlihy & Wing: linearizability is local),
so each key is checked on its own, which keeps the search small. The search is
the one of Lowe, "Testing for linearizability" (2017), as in Porcupine: walk the
list of call and return events; at a call, try to linearize that op now (if the
model allows it and the pair (set of linearized ops, state) was not seen before);
at a return whose op is not yet linearized, backtrack. Times may be floats or any
numbers that order the events: the simulator uses one counter for every event it
records, so a complete recorded before an invoke is strictly before it.

Writes of unknown outcome make the plain search exponential (any subset of them may
have happened by any point), so the search only lets one take effect where it is
observed: when it changes the state and a read of its value could come next. That
loses no linearization: in any linearization, an unknown write not read before the
next write can be dropped, and one that is read can be moved to just before the
first read that sees it (nothing else touches the key in between).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

OpKind = Literal["set", "delete", "read"]
INF = math.inf


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    ``value`` is what a ``set`` writes, or what a ``read`` returned (None: absent).
    ``complete`` is ``INF`` for a write whose outcome is unknown.
    """

    client: int
    kind: OpKind
    key: str
    value: str | None
    invoke: float
    complete: float = INF

    def __post_init__(self) -> None:
        if self.kind == "delete" and self.value is not None:
            raise ValueError("a delete has no value")
        if self.kind == "read" and self.complete == INF:
            raise ValueError("a read that did not return belongs in no history")
        if not self.invoke <= self.complete:
            raise ValueError(f"op completes before it is invoked: {self}")

    def describe(self) -> str:
        what = {"set": f"set {self.value!r}", "delete": "delete", "read": f"read -> {self.value!r}"}
        end = "?" if self.complete == INF else f"{self.complete:g}"
        return f"client {self.client} {what[self.kind]} [{self.invoke:g}, {end}]"


@dataclass
class CheckResult:
    """``ok`` is False when some key's history has no linearization; ``problem`` says which."""

    ok: bool
    keys: int = 0
    ops: int = 0
    problem: str = ""
    bad_key: str | None = None
    bad_ops: list[Op] = field(default_factory=list)


class SearchLimitExceeded(Exception):
    """The search for one key took more steps than allowed: neither proved nor refuted."""


def check_history(history: Iterable[Op], *, max_steps: int = 2_000_000) -> CheckResult:
    """Check every key's sub-history; stop at the first key that is not linearizable."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    total = 0
    for key in sorted(by_key):
        ops = by_key[key]
        total += len(ops)
        problem = check_key(ops, max_steps=max_steps)
        if problem:
            return CheckResult(False, len(by_key), total, problem, key, sorted(ops, key=_start))
    return CheckResult(True, len(by_key), total)


def _start(op: Op) -> tuple[float, float]:
    return (op.invoke, op.complete)


def check_key(ops: Sequence[Op], *, max_steps: int = 2_000_000, prune: bool = True) -> str:
    """'' if the ops of one key (initially absent) are linearizable, else why not.

    ``prune=False`` searches without the rules for unknown writes (exponential in them):
    the tests compare both on small histories.
    """
    written = {op.value for op in ops if op.kind == "set"}
    for op in ops:
        if op.kind == "read" and op.value is not None and op.value not in written:
            return f"{op.describe()} returned a value no write wrote"
    read = {op.value for op in ops if op.kind == "read"}
    if not prune:
        return "" if _search(ops, max_steps, prune=False) else "no linearization"
    # A set of unknown outcome whose value nobody read can always take effect last (never):
    # leaving it out changes no read, and it would only widen the search.
    ops = [
        op for op in ops if not (op.kind == "set" and op.complete == INF and op.value not in read)
    ]
    if _search(ops, max_steps, prune=True):
        return ""
    return "no linearization: " + "; ".join(op.describe() for op in sorted(ops, key=_start))


def _step(state: str | None, op: Op) -> tuple[bool, str | None]:
    if op.kind == "set":
        return True, op.value
    if op.kind == "delete":
        return True, None
    return op.value == state, state


class _Event:
    """A call or return of ``op`` in the doubly linked event list (Lowe's 'lift' unlinks a pair)."""

    __slots__ = ("is_call", "match", "next", "op", "op_index", "prev")

    def __init__(self, is_call: bool, op: Op | None, op_index: int) -> None:
        self.is_call = is_call
        self.op = op
        self.op_index = op_index
        self.match: _Event | None = None  # a call's return
        self.prev: _Event | None = None
        self.next: _Event | None = None


def _read_callable(head: _Event, value: str | None) -> bool:
    """Whether a read returning ``value`` could be linearized next (its call precedes every
    pending return)."""
    event = head.next
    while event is not None and event.is_call:
        op = event.op
        assert op is not None
        if op.kind == "read" and op.value == value:
            return True
        event = event.next
    return False


def _search(ops: Sequence[Op], max_steps: int, *, prune: bool) -> bool:
    if not ops:
        return True
    events: list[tuple[float, int, _Event]] = []
    for i, op in enumerate(ops):
        call = _Event(True, op, i)
        ret = _Event(False, op, i)
        call.match = ret
        # At equal times calls sort before returns: such ops overlap (the lenient reading).
        events.append((op.invoke, 0, call))
        events.append((op.complete, 1, ret))
    events.sort(key=lambda e: (e[0], e[1]))
    head = _Event(False, None, -1)  # sentinel
    prev = head
    for _, _, event in events:
        prev.next = event
        event.prev = prev
        prev = event

    def lift(call: _Event) -> None:
        assert call.prev is not None
        assert call.match is not None
        call.prev.next = call.next
        if call.next is not None:
            call.next.prev = call.prev
        ret = call.match
        assert ret.prev is not None
        ret.prev.next = ret.next
        if ret.next is not None:
            ret.next.prev = ret.prev

    def unlift(call: _Event) -> None:
        ret = call.match
        assert ret is not None
        assert ret.prev is not None
        assert call.prev is not None
        ret.prev.next = ret
        if ret.next is not None:
            ret.next.prev = ret
        call.prev.next = call
        if call.next is not None:
            call.next.prev = call

    state: str | None = None
    linearized = 0
    seen: set[tuple[int, str | None]] = set()
    stack: list[tuple[_Event, str | None]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            raise SearchLimitExceeded(f"more than {max_steps} steps on {len(ops)} ops")
        assert entry is not None
        if entry.is_call:
            assert entry.op is not None
            op = entry.op
            ok, new_state = _step(state, op)
            if ok and prune and op.complete == INF:
                ok = new_state != state and _read_callable(head, new_state)
            bit = 1 << entry.op_index
            if ok and (linearized | bit, new_state) not in seen:
                seen.add((linearized | bit, new_state))
                stack.append((entry, state))
                state = new_state
                linearized |= bit
                lift(entry)
                entry = head.next
                continue
            entry = entry.next
        else:  # the return of an op not linearized yet: undo the last choice
            assert entry.op is not None
            if prune and entry.op.complete == INF:
                return True  # every op that returned is linearized; the unknown ones never happen
            if not stack:
                return False
            call, state = stack.pop()
            linearized &= ~(1 << call.op_index)
            unlift(call)
            entry = call.next
    return True
