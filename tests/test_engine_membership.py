"""The membership-change planner (joint consensus, section 6) and learner changes."""

from __future__ import annotations

import pytest

from raft_http.raft import NotAllowed
from raft_http.raft.engine.membership import (
    plan_add_learner,
    plan_change,
    plan_remove_learners,
    voter_set,
)
from raft_http.types import Membership, Node


def n(*ids: int) -> dict[int, Node]:
    return {i: Node(f"mem-{i}") for i in ids}


def m(configs: list[list[int]], *nodes: int) -> Membership:
    return Membership(configs, n(*nodes))


@pytest.mark.parametrize(
    ("case", "current", "voters", "retain", "steps"),
    [
        ("same-voters", m([[1, 2, 3]], 1, 2, 3), [3, 2, 1], False, [m([[1, 2, 3]], 1, 2, 3)]),
        (
            "promote-learner",
            m([[1, 2, 3]], 1, 2, 3, 4),
            [1, 2, 3, 4],
            False,
            [m([[1, 2, 3], [1, 2, 3, 4]], 1, 2, 3, 4), m([[1, 2, 3, 4]], 1, 2, 3, 4)],
        ),
        (
            "remove-voter",
            m([[1, 2, 3]], 1, 2, 3),
            [1, 2],
            False,
            [m([[1, 2, 3], [1, 2]], 1, 2, 3), m([[1, 2]], 1, 2)],
        ),
        (
            "retain-removed-voter",
            m([[1, 2, 3]], 1, 2, 3),
            [1, 2],
            True,
            [m([[1, 2, 3], [1, 2]], 1, 2, 3), m([[1, 2]], 1, 2, 3)],
        ),
        (
            "learners-stay",
            m([[1, 2, 3]], 1, 2, 3, 9),
            [1, 2],
            False,
            [m([[1, 2, 3], [1, 2]], 1, 2, 3, 9), m([[1, 2]], 1, 2, 9)],
        ),
        (
            "replace-all",
            m([[1, 2, 3]], 1, 2, 3, 4, 5, 6),
            [4, 5, 6],
            False,
            [m([[1, 2, 3], [4, 5, 6]], 1, 2, 3, 4, 5, 6), m([[4, 5, 6]], 4, 5, 6)],
        ),
        (
            "finish-joint-first",
            m([[1, 2, 3], [1, 2]], 1, 2, 3),
            [1, 2],
            False,
            [m([[1, 2]], 1, 2, 3), m([[1, 2]], 1, 2)],  # 3 was a voter being removed
        ),
        (
            "finish-joint-then-change",
            m([[1, 2, 3], [1, 2, 3, 4]], 1, 2, 3, 4),
            [2, 3, 4],
            False,
            [
                m([[1, 2, 3, 4]], 1, 2, 3, 4),
                m([[1, 2, 3, 4], [2, 3, 4]], 1, 2, 3, 4),
                m([[2, 3, 4]], 2, 3, 4),
            ],
        ),
    ],
)
def test_plan_change(
    case: str, current: Membership, voters: list[int], retain: bool, steps: list[Membership]
) -> None:
    assert plan_change(current, voters, retain=retain) == steps, case


def test_every_step_keeps_a_quorum_overlap_with_the_one_before() -> None:
    """Two consecutive configs in force never allow two disjoint majorities (section 6)."""
    current = m([[1, 2, 3]], 1, 2, 3, 4, 5, 6)
    steps = plan_change(current, [4, 5, 6], retain=False)
    previous = current
    for step in steps:
        shared = set(previous.configs[-1]) & {v for c in step.configs for v in c}
        assert previous.configs[-1] in step.configs or step.configs[0] == previous.configs[-1]
        assert shared
        previous = step


@pytest.mark.parametrize(
    ("voters", "message"),
    [
        ([], "^the new membership needs at least one voter$"),
        ([1, 7], r"^nodes \[7\] are not members; add them as learners first$"),
    ],
)
def test_plan_change_refuses(voters: list[int], message: str) -> None:
    with pytest.raises(NotAllowed, match=message):
        plan_change(m([[1, 2, 3]], 1, 2, 3), voters, retain=False)


def test_voter_set_sorts_and_deduplicates() -> None:
    assert voter_set([3, 1, 3, 2]) == [1, 2, 3]
    with pytest.raises(NotAllowed):
        voter_set([])


def test_plan_add_learner() -> None:
    current = m([[1]], 1)
    assert plan_add_learner(current, 2, Node("mem-2")) == m([[1]], 1, 2)
    assert plan_add_learner(m([[1]], 1, 2), 2, Node("mem-2")) is None  # already there
    with pytest.raises(NotAllowed, match="another address"):
        plan_add_learner(m([[1]], 1, 2), 2, Node("elsewhere"))
    with pytest.raises(NotAllowed, match="another address"):
        plan_add_learner(current, 1, Node("elsewhere"))


@pytest.mark.parametrize(
    ("current", "ids", "expected"),
    [
        (m([[1, 2, 3]], 1, 2, 3, 4), [4], m([[1, 2, 3]], 1, 2, 3)),
        (m([[1, 2, 3]], 1, 2, 3, 4, 5), [4, 5], m([[1, 2, 3]], 1, 2, 3)),
        (m([[1, 2, 3]], 1, 2, 3, 4, 5), [5, 9], m([[1, 2, 3]], 1, 2, 3, 4)),
        (m([[1, 2, 3]], 1, 2, 3), [9], None),  # not a member: nothing to do
        (m([[1, 2, 3]], 1, 2, 3), [], None),
        (m([[1, 2], [2, 3]], 1, 2, 3, 4), [4], m([[1, 2], [2, 3]], 1, 2, 3)),
    ],
)
def test_plan_remove_learners(
    current: Membership, ids: list[int], expected: Membership | None
) -> None:
    assert plan_remove_learners(current, ids) == expected


@pytest.mark.parametrize("ids", [[3], [3, 4], [1]])
def test_plan_remove_learners_refuses_voters(ids: list[int]) -> None:
    with pytest.raises(NotAllowed, match="are voters"):
        plan_remove_learners(m([[1, 2], [2, 3]], 1, 2, 3, 4), ids)
