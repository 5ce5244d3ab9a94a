"""Quorum arithmetic for one config (majority) and for joint consensus (a majority of each).

A membership is a list of configs: one in a uniform membership, two (old, new) while a
change is in joint consensus. Every decision that needs "a quorum" needs a majority of
every config at once (Raft paper, section 6).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence


def is_quorum(configs: Sequence[Collection[int]], granted: Iterable[int]) -> bool:
    """True when ``granted`` holds a majority of every config (with no config, nobody is needed)."""
    ids = set(granted)
    return all(len(ids.intersection(config)) * 2 > len(config) for config in configs)


def quorum_value(
    configs: Sequence[Collection[int]], value_of: Callable[[int], float]
) -> float | None:
    """The greatest ``v`` such that in every config a majority has ``value_of(node) >= v``.

    With matched log indexes it is the commit index; with the times of the last
    acknowledgements, the time up to which a quorum has confirmed the leader.
    None when every config is empty.
    """
    result: float | None = None
    for config in configs:
        if not config:
            continue
        values = sorted((value_of(n) for n in config), reverse=True)
        majority_value = values[len(values) // 2]
        result = majority_value if result is None else min(result, majority_value)
    return result


def committed_index(configs: Sequence[Collection[int]], matched: Callable[[int], int]) -> int:
    """The greatest index that a majority of every config has matched (-1 when none).

    ``matched(node_id)`` is the last index known to be on that node (-1 for none).
    """
    value = quorum_value(configs, matched)
    return -1 if value is None else int(value)


def quorum_acked_at(
    configs: Sequence[Collection[int]],
    self_id: int,
    acked_at: Callable[[int], float],
    now: float,
) -> float:
    """The time up to which a quorum of every config has acknowledged the leader ``self_id``.

    The leader acknowledges itself ``now``; ``acked_at(peer)`` is the send time of the
    newest request that peer answered. With no voters at all the leader alone is the
    quorum, so the answer is ``now``.
    """
    agreed = quorum_value(configs, lambda n: now if n == self_id else acked_at(n))
    return now if agreed is None else agreed
