"""Validation of every LLM correction: a y' is accepted only if it is plausible text.

An LLM teacher's answer is untrusted input to the learner: a refusal, the prompt echoed back, a
runaway generation or a half-decoded byte string would each become a "chosen" sequence the
policy is pushed towards. So each answer goes through ``validate`` before it becomes a
``Correction``; a failed check yields ``corrected_text=None`` with a short reason that the
teacher's metrics count (``teacher/rejected/<reason>``) and that ``pairs.make_pairs`` counts
again as ``teacher/skipped/rejected:<reason>``. Nothing here raises for a bad answer.

Rules, in the order they are checked (docs/teachers.md lists them with examples):

=================  ===========================================================================
``truncated``      a raw-format answer the engine cut at ``max_new_tokens`` (finish reason
                   ``length``): its end is missing, so it cannot be trusted as y'
``empty``          no answer, or y' is empty or whitespace only
``non_text``       NUL or other control characters (except tab, newline, carriage return), or
                   U+FFFD, which decoders put where bytes were not valid UTF-8
``refusal``        the answer starts like a refusal ("I'm sorry", "I can't" ...; configurable)
``unparseable``    the template's output format was not followed (missing markers)
``prompt_echo``    y' is the prompt x (or starts with it) while y did not
``length_blowup``  len(y') > max_length_ratio * max(len(y), length_floor_chars)
``over_edit``      (only with ``max_edit_ratio`` set) the character edit distance y -> y',
                   divided by max(len(y), len(y')), exceeds ``max_edit_ratio``: the teacher
                   rewrote y instead of correcting it minimally (the free-form task's guard,
                   docs/models.md), and the pair would push the policy towards a different
                   answer rather than fix the one it gave
=================  ===========================================================================

Control bytes and refusals are checked on the raw answer (a refusal also right after an opening
marker), the rest on the parsed y'. The teachers add the transport reasons (docs/teachers.md).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence

from correction_rl.edits import normalized_edit_distance
from correction_rl.teachers.templates import CorrectionTemplate
from correction_rl.types import Rollout

REASONS = ("truncated", "empty", "non_text", "refusal", "unparseable", "prompt_echo", "length_blowup", "over_edit")
"""Every reason ``validate`` can return."""

DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"i('m| am) sorry",
    r"i (can('|no)?t|cannot|won't|will not|am unable to|'m unable to|am not able to)",
    r"as an ai\b",
    r"i apologi[sz]e",
    r"unfortunately,? i",
)
"""Case-insensitive regexes matched at the START of the answer (after whitespace and an opening
marker): a refusal opens with them, while a correction that merely contains such words (a
dialogue, a quoted apology) does not."""

_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


@dataclass(frozen=True)
class ValidationRules:
    """The knobs of ``validate`` (from ``TeacherConfig``)."""

    max_length_ratio: float = 4.0
    length_floor_chars: int = 32
    refusal_patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS
    max_edit_ratio: float | None = None
    """``over_edit`` bound on the normalized character edit distance y -> y' (None: off)."""
    _compiled: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_length_ratio <= 0:
            raise ValueError(f"teacher.max_length_ratio must be > 0, got {self.max_length_ratio}")
        if self.max_edit_ratio is not None and not 0 < self.max_edit_ratio <= 1:
            raise ValueError(f"teacher.max_edit_ratio must be in (0, 1], got {self.max_edit_ratio}")
        compiled = []
        for pattern in self.refusal_patterns:
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(f"teacher.refusal_patterns: bad regex {pattern!r}: {exc}") from None
        object.__setattr__(self, "_compiled", tuple(compiled))

    def is_refusal(self, text: str) -> bool:
        head = text.lstrip()[:200]
        return any(p.match(head) for p in self._compiled)


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one answer: y' or a rejection reason."""

    text: str | None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.text is not None


def has_non_text(text: str) -> bool:
    """Control characters (other than tab/newline/CR) or U+FFFD replacement characters."""
    for ch in text:
        if ch == "\ufffd":
            return True
        if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) in ("Cc", "Cs"):
            return True
    return False


def _is_echo(corrected: str, rollout: Rollout) -> bool:
    prompt = rollout.prompt.text.strip()
    if not prompt:
        return False
    response = rollout.response_text.strip()
    text = corrected.strip()
    return text.startswith(prompt) and not response.startswith(prompt)


def asks_per_rollout(on_rejection: str, max_retries: int) -> int:
    """How many answers a teacher may ask for one rollout: one, plus ``max_retries`` re-asks
    after a rejected answer when ``on_rejection`` is ``retry``."""
    return 1 + (max_retries if on_rejection == "retry" else 0)


def validate(
    raw: str | None, rollout: Rollout, template: CorrectionTemplate, rules: ValidationRules,
    finish_reason: str | None = None,
) -> Verdict:
    """Check one teacher answer against the rules above; ``raw`` None counts as ``empty``;
    ``finish_reason`` is the engine's (``length``: cut at the token limit)."""
    if finish_reason == "length" and template.output == "raw":
        return Verdict(None, "truncated")
    if raw is None or raw == "":
        return Verdict(None, "empty")
    if has_non_text(raw):
        return Verdict(None, "non_text")
    inside = raw
    if template.output == "markers" and template.start_marker in raw:
        inside = raw[raw.find(template.start_marker) + len(template.start_marker):]
    if rules.is_refusal(raw) or rules.is_refusal(inside):
        return Verdict(None, "refusal")
    parsed = template.parse(raw)
    if parsed.text is None:
        return Verdict(None, parsed.reason or "unparseable")
    text = parsed.text
    if not text.strip():
        return Verdict(None, "empty")
    if _is_echo(text, rollout):
        return Verdict(None, "prompt_echo")
    limit = rules.max_length_ratio * max(len(rollout.response_text), rules.length_floor_chars)
    if len(text) > limit:
        return Verdict(None, "length_blowup")
    if rules.max_edit_ratio is not None and normalized_edit_distance(rollout.response_text, text) > rules.max_edit_ratio:
        return Verdict(None, "over_edit")
    return Verdict(text)
