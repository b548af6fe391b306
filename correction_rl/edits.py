"""Edit distances: how much a teacher changed a response (the "amount of correction").

The counting is delegated to rapidfuzz (a maintained C++ implementation) rather than a
hand-written dynamic program: it is exact, fast enough to run on every rollout, and works on
strings as well as on token-id lists (any sequence of hashables).
"""

from __future__ import annotations

from typing import Sequence

from rapidfuzz.distance import Levenshtein


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1) between two strings
    or two token-id lists."""
    return int(Levenshtein.distance(a, b))


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """``edit_distance(a, b) / max(len(a), len(b))`` in [0, 1]; 0.0 when both are empty.

    Dividing by the longer length makes a one-character fix of a long answer count less than
    the same fix of a short one, so tasks with different answer lengths can be compared.
    """
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Number of leading elements shared by ``a`` and ``b`` (their log-prob cancels in every
    pairwise correction loss)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
