"""Seeds for randomized tests: the few CI runs, or as many as a soak asks for.

``RAFT_REVIEW_SEEDS=1-200 python -m pytest tests/test_raft_review.py`` runs seeds 1 to 200;
a comma list (``5,17,40``) replays given seeds.
"""

from __future__ import annotations

import os


def seeds_from_env(variable: str, default: list[int]) -> list[int]:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    seeds: list[int] = []
    for part in value.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds
