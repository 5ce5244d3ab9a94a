"""Quorum arithmetic for one config (majority) and for joint consensus (a majority of each)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence


def is_quorum(configs: Sequence[Collection[int]], granted: Iterable[int]) -> bool:
    """True when ``granted`` holds a majority of every config (an empty config needs nobody)."""
    ids = set(granted)
    return all(len(ids.intersection(config)) * 2 > len(config) for config in configs)


def committed_index(configs: Sequence[Collection[int]], matched: Callable[[int], int]) -> int:
    """The greatest index that a majority of every config has matched (-1 when none).

    ``matched(node_id)`` is the last index known to be on that node (-1 for none).
    """
    result: int | None = None
    for config in configs:
        if not config:
            continue
        indexes = sorted((matched(n) for n in config), reverse=True)
        quorum_index = indexes[len(indexes) // 2]
        result = quorum_index if result is None else min(result, quorum_index)
    return -1 if result is None else result
