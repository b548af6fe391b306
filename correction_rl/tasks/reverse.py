"""String reversal ``rev:abcde=`` -> ``edcba``: a pure string transformation whose errors are
misplaced characters, with no arithmetic involved."""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from correction_rl.tasks.base import Task, TaskError

_PROMPT = re.compile(r"rev:([a-z]+)=")


@dataclass(frozen=True)
class ReverseKnobs:
    min_len: int = 3
    """Shortest word."""
    max_len: int = 7
    """Longest word."""
    alphabet: int = 26
    """Letters are drawn from the first ``alphabet`` lower-case letters."""


class ReverseTask(Task):
    name = "reverse"
    Knobs = ReverseKnobs

    def validate_knobs(self) -> None:
        k = self.knobs
        if not 1 <= k.min_len <= k.max_len <= 30:
            raise TaskError(f"task 'reverse': need 1 <= min_len <= max_len <= 30, got {k}")
        if not 2 <= k.alphabet <= 26:
            raise TaskError(f"task 'reverse': alphabet must be in 2..26, got {k.alphabet}")

    def sample_text(self, rng: random.Random) -> str:
        n = rng.randint(self.knobs.min_len, self.knobs.max_len)
        letters = string.ascii_lowercase[: self.knobs.alphabet]
        return "rev:" + "".join(rng.choice(letters) for _ in range(n)) + "="

    def solve(self, text: str) -> str:
        match = _PROMPT.fullmatch(text)
        if not match:
            raise TaskError(f"not a reversal prompt (want 'rev:<lower-case word>='): {text!r}")
        return match.group(1)[::-1]
