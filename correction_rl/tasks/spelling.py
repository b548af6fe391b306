"""Spelling correction ``Fix the spelling: The cat sat on teh mat.`` -> ``The cat sat on the mat.``:
the project's free-form task, meant to be corrected by an LLM teacher.

Why it exists: every other task has a short, exactly checkable answer, so the LLM-teacher path
had never trained a policy on text. Here the answer is an English sentence and *any* text is a
valid response (a policy may answer with a different sentence, a partial fix, or noise); what a
good correction is -- keep the words that are right, fix the misspelt ones -- is the minimal
edit an instruction-following teacher is asked for (``teacher.template``, docs/models.md). The
task still knows the clean sentence, so it also has a programmatic check (``accuracy``) and an
oracle, which is how the LLM teacher's own accuracy is measured.

Sentences are the project's offline English sample (``correction_rl.models.corpus``), so no
download is needed; typos are injected deterministically from the prompt stream's seed: a swap
of two adjacent letters, a dropped letter, a doubled letter or a replaced letter, inside words
only (spaces and punctuation stay), at distinct positions. The train / held-out split is the
base class's hash of the prompt text, i.e. of the *typo'd variant*: the sample has only ~60
sentences, so held-out prompts are new misspellings of sentences a policy may also have seen
misspelt differently in training (what is measured is fixing unseen typos, not writing unseen
sentences).
"""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass

from correction_rl.tasks.base import Task, TaskError

PREFIX = "Fix the spelling: "
"""Every prompt is this prefix followed by the misspelt sentence."""

TYPO_KINDS: tuple[str, ...] = ("swap", "drop", "double", "replace")


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The clean sentences: the non-empty lines of the offline English sample, in order."""
    from correction_rl.models.corpus import GENERAL_TEXT

    return tuple(line.strip() for line in GENERAL_TEXT.splitlines() if line.strip())


def inject_typos(sentence: str, count: int, rng: random.Random) -> str:
    """``sentence`` with ``count`` typos at distinct letter positions, never equal to it.

    Each typo is one of ``TYPO_KINDS`` at a letter inside a word; positions are chosen first and
    applied right to left so that earlier edits do not shift later positions. A swap of two equal
    letters (``oo``) changes nothing, so the draw is repeated until the text differs.
    """
    letters = [i for i, ch in enumerate(sentence) if ch.isalpha()]
    if count < 1 or len(letters) < count:
        raise TaskError(f"task 'spelling': cannot put {count} typos into {sentence!r}")
    for _ in range(100):
        chars = list(sentence)
        for pos in sorted(rng.sample(letters, count), reverse=True):
            kind = rng.choice(TYPO_KINDS)
            ch = chars[pos]
            if kind == "swap" and pos + 1 < len(chars) and chars[pos + 1].isalpha():
                chars[pos], chars[pos + 1] = chars[pos + 1], ch
            elif kind == "double":
                chars.insert(pos, ch)
            elif kind == "replace":
                new = rng.choice(string.ascii_lowercase.replace(ch.lower(), ""))
                chars[pos] = new.upper() if ch.isupper() else new
            else:  # drop (also a swap at a word's last letter)
                del chars[pos]
        text = "".join(chars)
        if text != sentence:
            return text
    raise TaskError(f"task 'spelling': could not misspell {sentence!r}")  # pragma: no cover


@dataclass(frozen=True)
class SpellingKnobs:
    min_typos: int = 1
    """Fewest typos per sentence."""
    max_typos: int = 2
    """Most typos per sentence (each at a different letter)."""
    max_chars: int = 80
    """Only sentences of the sample up to this many characters (short answers keep tiny models
    and their teacher quick on a CPU); 90 or more uses all of them."""


class SpellingTask(Task):
    name = "spelling"
    Knobs = SpellingKnobs

    def validate_knobs(self) -> None:
        k = self.knobs
        if not 1 <= k.min_typos <= k.max_typos <= 10:
            raise TaskError(f"task 'spelling': need 1 <= min_typos <= max_typos <= 10, got {k}")
        if not self._pool():
            shortest = min(map(len, sentences()))
            raise TaskError(f"task 'spelling': max_chars={k.max_chars} leaves no sentence (the shortest has {shortest})")

    def _pool(self) -> tuple[str, ...]:
        return tuple(s for s in sentences() if len(s) <= self.knobs.max_chars)

    def sample_text(self, rng: random.Random) -> str:
        clean = rng.choice(self._pool())
        return PREFIX + inject_typos(clean, rng.randint(self.knobs.min_typos, self.knobs.max_typos), rng)

    def solve(self, text: str) -> str:
        """The clean sentence the prompt's misspelt one came from: the sample's sentence nearest
        in edit distance (typos are few, so it is unambiguous); ``TaskError`` when the text has
        no prefix or is not near any sentence of the sample (give such prompts an ``answer``)."""
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein

        if not text.startswith(PREFIX):
            raise TaskError(f"not a spelling prompt (want {PREFIX!r} + a sentence): {text!r}")
        typoed = text[len(PREFIX):]
        best, dist, _ = process.extractOne(typoed, sentences(), scorer=Levenshtein.distance)
        if dist > max(4, len(best) // 4):
            raise TaskError(f"not a misspelling of a sentence of the task's sample: {typoed!r}")
        return best
