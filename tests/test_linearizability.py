"""The linearizability checker (tests/sim/linearizability.py) on good and bad histories."""

from __future__ import annotations

import random

import pytest

from sim.linearizability import INF, Op, SearchLimitExceeded, check_history, check_key


def w(client: int, value: str, invoke: float, complete: float = INF, key: str = "k") -> Op:
    return Op(client, "set", key, value, invoke, complete)


def d(client: int, invoke: float, complete: float = INF, key: str = "k") -> Op:
    return Op(client, "delete", key, None, invoke, complete)


def r(client: int, value: str | None, invoke: float, complete: float, key: str = "k") -> Op:
    return Op(client, "read", key, value, invoke, complete)


def test_empty_and_sequential_histories_are_linearizable() -> None:
    assert check_history([]).ok
    history = [r(1, None, 0, 1), w(1, "a", 2, 3), r(1, "a", 4, 5), d(1, 6, 7), r(1, None, 8, 9)]
    result = check_history(history)
    assert result.ok
    assert (result.keys, result.ops) == (1, 5)


def test_stale_read_is_caught() -> None:
    # "b" was acknowledged before the read began, yet the read saw "a".
    history = [w(1, "a", 0, 1), w(1, "b", 2, 3), r(2, "a", 4, 5)]
    result = check_history(history)
    assert not result.ok
    assert result.bad_key == "k"
    assert "no linearization" in result.problem


def test_lost_write_is_caught() -> None:
    # An acknowledged write that no later read sees: the value went back to absent.
    assert check_key([w(1, "a", 0, 1), r(2, None, 2, 3)])
    # ... or the write vanished under a later one's read order.
    assert check_key([w(1, "a", 0, 1), r(2, "a", 2, 3), r(3, None, 4, 5)])


def test_read_of_a_value_never_written_is_caught() -> None:
    problem = check_key([w(1, "a", 0, 1), r(2, "zzz", 2, 3)])
    assert "no write wrote" in problem


def test_deleted_value_read_back_is_caught() -> None:
    assert check_key([w(1, "a", 0, 1), d(1, 2, 3), r(2, "a", 4, 5)])


def test_concurrent_overlapping_ops_may_take_effect_in_either_order() -> None:
    # Two writes overlapping each other and two reads: each read may see either order,
    # and a read concurrent with a write may see the old or the new value.
    history = [
        w(1, "a", 0, 10),
        w(2, "b", 1, 9),
        r(3, "b", 2, 3),
        r(4, "a", 4, 11),
        r(5, None, 0.5, 1.5),
    ]
    assert check_history(history).ok


def test_reads_that_disagree_on_the_order_of_two_writes_are_caught() -> None:
    # Once one read saw "b" then "a" (strictly later), no read after that may see "b" again.
    history = [
        w(1, "a", 0, 10),
        w(2, "b", 0, 10),
        r(3, "b", 1, 2),
        r(3, "a", 3, 4),
        r(3, "b", 5, 6),
    ]
    assert not check_history(history).ok


def test_ops_touching_at_one_instant_overlap() -> None:
    # A read invoked at the very time a write completes may still see the old value.
    assert check_history([w(1, "a", 0, 5), r(2, None, 5, 6)]).ok
    assert not check_history([w(1, "a", 0, 5), r(2, None, 5.001, 6)]).ok


def test_unknown_outcome_write_may_have_happened() -> None:
    # The writer timed out, yet a later read sees its value: fine.
    history = [w(1, "a", 0, 1), w(2, "b", 2), r(3, "b", 10, 11), r(3, "b", 12, 13)]
    assert check_history(history).ok


def test_unknown_outcome_write_may_not_have_happened() -> None:
    history = [w(1, "a", 0, 1), w(2, "b", 2), r(3, "a", 10, 11), r(3, "a", 12, 13)]
    assert check_history(history).ok


def test_unknown_outcome_write_cannot_happen_before_its_invoke_or_twice() -> None:
    # A read that completed before the write was even invoked cannot see it.
    assert not check_history([r(1, "b", 0, 1), w(2, "b", 2)]).ok
    # Once it took effect and was overwritten, it cannot take effect again.
    history = [w(2, "b", 0), r(1, "b", 1, 2), w(1, "c", 3, 4), r(1, "c", 5, 6), r(1, "b", 7, 8)]
    assert not check_history(history).ok


def test_unknown_outcome_delete_both_ways() -> None:
    assert check_history([w(1, "a", 0, 1), d(2, 2), r(3, "a", 5, 6)]).ok
    assert check_history([w(1, "a", 0, 1), d(2, 2), r(3, None, 5, 6)]).ok
    # ... but once it took effect it stays in effect until another write.
    assert not check_history([w(1, "a", 0, 1), d(2, 2), r(3, None, 5, 6), r(3, "a", 7, 8)]).ok


def test_keys_are_checked_independently() -> None:
    history = [w(1, "a", 0, 1, key="x"), w(1, "b", 0, 1, key="y"), r(2, "b", 2, 3, key="y")]
    assert check_history(history).ok
    bad = [*history, r(2, "a", 4, 5, key="y")]
    result = check_history(bad)
    assert not result.ok
    assert result.bad_key == "y"
    assert [op.key for op in result.bad_ops] == ["y", "y", "y"]


def test_ops_are_validated() -> None:
    with pytest.raises(ValueError, match="no value"):
        Op(1, "delete", "k", "x", 0, 1)
    with pytest.raises(ValueError, match="did not return"):
        Op(1, "read", "k", None, 0)
    with pytest.raises(ValueError, match="before it is invoked"):
        Op(1, "set", "k", "x", 2, 1)


def _register_history(
    rng: random.Random, clients: int, ops: int, unknown_rate: float = 0.15
) -> list[Op]:
    """Run clients against one atomic register: each op takes effect at a random instant
    inside its interval, so the history is linearizable by construction."""
    timeline: list[tuple[float, int, Op]] = []
    free_at = [0.0] * clients
    for n in range(ops):
        c = rng.randrange(clients)
        invoke = free_at[c] + rng.random()
        complete = invoke + rng.random() * 3
        effect = rng.uniform(invoke, complete)
        kind = rng.choice(["set", "set", "delete", "read"])
        unknown = kind != "read" and rng.random() < unknown_rate
        timeline.append(
            (
                effect,
                n,
                Op(
                    c,
                    kind,
                    "k",
                    f"v{n}" if kind == "set" else None,
                    invoke,
                    INF if unknown else complete,
                ),
            )
        )
        free_at[c] = complete
    state: str | None = None
    history = []
    for _, _, op in sorted(timeline, key=lambda t: (t[0], t[1])):
        if op.kind == "read":
            op = Op(op.client, "read", op.key, state, op.invoke, op.complete)
        else:
            state = op.value
        history.append(op)
    return history


@pytest.mark.parametrize("seed", range(40))
def test_random_atomic_register_histories_are_linearizable(seed: int) -> None:
    history = _register_history(random.Random(seed), clients=4, ops=40)
    assert check_history(history).ok


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_with_one_corrupted_read_are_caught(seed: int) -> None:
    """Make one read return another value (stale, lost or never written): always caught."""
    rng = random.Random(seed)
    # One client and no unknown outcomes: the history has one linearization, so any
    # changed read is wrong.
    history = _register_history(rng, clients=1, ops=30, unknown_rate=0.0)
    reads = [i for i, op in enumerate(history) if op.kind == "read"]
    if not reads:
        pytest.skip("no read drawn")
    i = rng.choice(reads)
    values = {op.value for op in history if op.kind == "set"} | {None}
    wrong = sorted(values - {history[i].value}, key=str)
    if not wrong:
        pytest.skip("no other value to read")
    op = history[i]
    history[i] = Op(op.client, "read", op.key, rng.choice(wrong), op.invoke, op.complete)
    assert not check_history(history).ok


def test_many_concurrent_unknown_writes_stay_tractable() -> None:
    # 30 timed-out writes all readable, overlapping 30 reads: memoisation keeps this small.
    history = [w(c, f"v{c}", 0) for c in range(30)]
    history += [r(100, f"v{c}", 10 + 2 * c, 11 + 2 * c) for c in range(30)]
    assert check_history(history).ok


def test_search_limit_is_reported_not_guessed() -> None:
    history = [w(c, f"v{c}", 0, 100) for c in range(12)]
    history += [r(100 + c, f"v{c}", 1, 99) for c in range(12)]
    with pytest.raises(SearchLimitExceeded):
        check_history(history, max_steps=50)


@pytest.mark.parametrize("seed", range(60))
def test_pruned_search_agrees_with_the_plain_search(seed: int) -> None:
    """The rules that keep unknown writes tractable lose no linearization and add none."""
    rng = random.Random(1000 + seed)
    history = _register_history(rng, clients=3, ops=14, unknown_rate=0.4)
    if seed % 2:  # corrupt one read half of the time
        reads = [i for i, op in enumerate(history) if op.kind == "read"]
        if reads:
            i = rng.choice(reads)
            op = history[i]
            value = rng.choice([None, *(o.value for o in history if o.kind == "set")])
            history[i] = Op(op.client, "read", op.key, value, op.invoke, op.complete)
    assert (check_key(history) == "") == (check_key(history, prune=False) == "")
