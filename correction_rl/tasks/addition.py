"""Multi-digit addition ``37+85=`` -> ``122``: errors are wrong digits, mostly from carries.

The checker accepts any all-digit spelling of the right value (``0122`` too), so the right
answer is not unique: the oracle keeps leading zeros the response already had when that is
closer, which is the smallest example of "keep what is right in y".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable

from correction_rl.tasks.base import Task, TaskError
from correction_rl.types import Prompt

_PROMPT = re.compile(r"([0-9]+)\+([0-9]+)=")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class AdditionKnobs:
    min_digits: int = 1
    """Fewest digits of an operand."""
    max_digits: int = 3
    """Most digits of an operand (answers have at most one more)."""


class AdditionTask(Task):
    name = "addition"
    Knobs = AdditionKnobs

    def validate_knobs(self) -> None:
        k = self.knobs
        if not 1 <= k.min_digits <= k.max_digits <= 18:
            raise TaskError(
                f"task 'addition': need 1 <= min_digits <= max_digits <= 18, got {k}"
            )

    def sample_text(self, rng: random.Random) -> str:
        a, b = (self._operand(rng) for _ in range(2))
        return f"{a}+{b}="

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.knobs.min_digits, self.knobs.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def solve(self, text: str) -> str:
        match = _PROMPT.fullmatch(text)
        if not match:
            raise TaskError(f"not an addition prompt (want '<a>+<b>='): {text!r}")
        return str(int(match.group(1)) + int(match.group(2)))

    def check(self, prompt: Prompt, response: str) -> bool:
        return bool(_DIGITS.fullmatch(response)) and int(response) == int(self.canonical(prompt))

    def correct_answers_near(self, prompt: Prompt, response: str) -> Iterable[str]:
        canonical = str(int(self.canonical(prompt)))
        # Padding with more zeros than the response has characters can never get closer.
        return ["0" * k + canonical for k in range(len(response) + 1)]
