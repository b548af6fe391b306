"""What a verifiable task is: a seeded problem generator, a checker and an oracle corrector.

A task owns everything a program needs to stand in for a teacher: it can write prompts, say
whether a response is right, and return the *minimal* correction of a wrong response. Tasks are
written in the character tokenizer's alphabet (printable ASCII), with short prompts and answers
so that tiny models learn them in minutes on a CPU.

Train and held-out prompts are told apart by hashing the prompt text, not by the seed: the same
problem always falls in the same split whatever seed or difficulty produced it, so a policy can
never be evaluated on a problem it was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Iterator, Literal

from correction_rl.edits import edit_distance
from correction_rl.types import Prompt
from correction_rl.errors import UserError

Split = Literal["train", "eval"]
SPLITS: tuple[str, ...] = ("train", "eval")


class TaskError(ValueError, UserError):
    """Bad task input: unknown task or knob, a bad knob value, or a prompt the task can't parse."""


class Task(ABC):
    """Base class of every task; subclasses set ``name`` and ``Knobs`` and implement
    ``sample_text`` and ``solve``.

    ``Knobs`` is a dataclass of integer difficulty knobs with defaults (integers so that they fit
    ``TaskConfig.difficulty``); ``validate_knobs`` checks their values.
    """

    name: ClassVar[str]
    Knobs: ClassVar[type]
    eval_fraction: ClassVar[float] = 0.2
    """Share of the problem space that belongs to the held-out split."""

    def __init__(self, **knobs: int) -> None:
        allowed = [f.name for f in dataclasses.fields(self.Knobs)]
        unknown = sorted(set(knobs) - set(allowed))
        if unknown:
            raise TaskError(
                f"task {self.name!r}: unknown difficulty knob(s) {unknown}; allowed: {allowed}"
            )
        for key, value in knobs.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TaskError(f"task {self.name!r}: knob {key!r} must be an int, got {value!r}")
        self.knobs = self.Knobs(**knobs)
        self.validate_knobs()

    def validate_knobs(self) -> None:
        """Raise ``TaskError`` naming the knob when a value makes no sense."""

    # -- what each task implements ------------------------------------------------------------

    @abstractmethod
    def sample_text(self, rng: random.Random) -> str:
        """Prompt text of one random problem at the current difficulty."""

    @abstractmethod
    def solve(self, text: str) -> str:
        """Canonical answer of a prompt text; ``TaskError`` when the text is not this task's."""

    def check(self, prompt: Prompt, response: str) -> bool:
        """Is ``response`` a right answer? Default: exactly the canonical answer."""
        return response == self.canonical(prompt)

    def correct_answers_near(self, prompt: Prompt, response: str) -> Iterable[str]:
        """Right answers among which the oracle picks the one closest to ``response``.

        Tasks whose right answer is unique return only the canonical answer (the default); tasks
        that accept several spellings return the ones that could be closer to ``response``.
        """
        return (self.canonical(prompt),)

    # -- shared behaviour --------------------------------------------------------------------

    def canonical(self, prompt: Prompt) -> str:
        """The answer a prompt record carries, or the one the task computes from its text."""
        if prompt.answer is not None:
            return prompt.answer
        try:
            return self.solve(prompt.text)
        except TaskError as exc:
            raise TaskError(f"prompt {prompt.prompt_id!r}: {exc}") from None

    def minimal_correction(self, prompt: Prompt, response: str) -> str:
        """The right answer closest to ``response`` in edit distance; ``response`` itself when it
        is already right.

        Keeping what is right and fixing only what is wrong is what makes y' a useful training
        signal: y and y' share everything the policy got right, so the correction loss only
        pushes on the tokens that were wrong. Since the canonical answer is always a candidate,
        the result is never farther from ``response`` than the canonical answer is.
        """
        if self.check(prompt, response):
            return response
        canonical = self.canonical(prompt)
        candidates = list(self.correct_answers_near(prompt, response))
        return min(candidates, key=lambda c: (edit_distance(response, c), c != canonical))

    def split_of(self, text: str) -> Split:
        """Deterministic split of a problem: a hash of the task name and the prompt text."""
        digest = hashlib.sha256(f"{self.name}|{text}".encode()).digest()
        return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < self.eval_fraction else "train"

    def make_prompt(self, text: str) -> Prompt:
        split = self.split_of(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return Prompt(
            prompt_id=f"{self.name}-{split}-{digest}",
            text=text,
            task=self.name,
            answer=self.solve(text),
            meta={"split": split},
        )

    def stream(self, split: Split, seed: int) -> Iterator[Prompt]:
        """Endless seeded prompts of one split (repeats possible): the warm start's data."""
        _check_split(split)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        while True:
            text = self.sample_text(rng)
            if self.split_of(text) == split:
                yield self.make_prompt(text)

    def generate(self, n: int, split: Split, seed: int) -> list[Prompt]:
        """``n`` distinct prompts of one split, the same list for the same seed and knobs."""
        _check_split(split)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: dict[str, Prompt] = {}
        for _ in range(max(1000, 50 * n)):
            if len(seen) == n:
                break
            text = self.sample_text(rng)
            if text not in seen and self.split_of(text) == split:
                seen[text] = self.make_prompt(text)
        if len(seen) < n:
            raise TaskError(
                f"task {self.name!r} with {dataclasses.asdict(self.knobs)}: found only "
                f"{len(seen)} distinct {split} prompts, asked for {n}; raise the difficulty"
            )
        return list(seen.values())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
