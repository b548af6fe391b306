"""Sorting a list of numbers ``sort:31,5,9=`` -> ``5,9,31``: errors are swapped, dropped or
duplicated elements, i.e. edits at the level of whole items rather than single digits."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from correction_rl.tasks.base import Task, TaskError

_PROMPT = re.compile(r"sort:([0-9]+(?:,[0-9]+)*)=")


@dataclass(frozen=True)
class SortingKnobs:
    min_len: int = 3
    """Fewest numbers in a list."""
    max_len: int = 5
    """Most numbers in a list."""
    max_value: int = 99
    """Numbers are drawn uniformly from 0..max_value."""


class SortingTask(Task):
    name = "sorting"
    Knobs = SortingKnobs

    def validate_knobs(self) -> None:
        k = self.knobs
        if not 1 <= k.min_len <= k.max_len <= 12:
            raise TaskError(f"task 'sorting': need 1 <= min_len <= max_len <= 12, got {k}")
        if not 1 <= k.max_value <= 999:
            raise TaskError(f"task 'sorting': max_value must be in 1..999, got {k.max_value}")

    def sample_text(self, rng: random.Random) -> str:
        n = rng.randint(self.knobs.min_len, self.knobs.max_len)
        numbers = [rng.randint(0, self.knobs.max_value) for _ in range(n)]
        return "sort:" + ",".join(map(str, numbers)) + "="

    def solve(self, text: str) -> str:
        match = _PROMPT.fullmatch(text)
        if not match:
            raise TaskError(f"not a sorting prompt (want 'sort:<n>,<n>,...='): {text!r}")
        numbers = sorted(int(x) for x in match.group(1).split(","))
        return ",".join(map(str, numbers))
