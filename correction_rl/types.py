"""Records that cross a component boundary.

Every hand-off in the system (prompt source -> rollout engine -> teacher -> replay buffer ->
learner -> weight sync) passes one of these frozen dataclasses, never a dict bag, so that a
field rename is a type error at the boundary instead of a silent ``KeyError`` three actors
away. They hold plain Python values (lists of ints, strings) so that they pickle cheaply across
Ray and serialize to one JSON line in the durable correction log; tensors appear only in
``TrainBatch`` (built on the learner) and ``WeightUpdate`` (built for a sync).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is only needed by the learner-side records
    import torch

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Prompt:
    """One task instance x, with what a programmatic teacher needs to check it."""

    prompt_id: str
    text: str
    task: str = ""
    """Task name (``addition``, ``sorting`` ...) or a free-form domain label."""
    answer: str | None = None
    """Canonical answer when the task knows it (oracle teachers); None for open-ended prompts."""
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None
    """A chat conversation ``[{"role": ..., "content": ...}]`` ending with the ``user`` turn the
    policy answers. When set, it (not ``text``) is what the policy's chat template renders
    (``prompts/render.py``); ``text`` then holds the last user message, for oracles, logs and
    tables. None: the prompt is ``text`` alone (one user turn under a chat template)."""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["messages"] is None:
            del out["messages"]  # prompt files written before conversations existed stay the same
        return out

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "Prompt":
        return cls(**record)


@dataclass(frozen=True)
class Rollout:
    """A response y ~ pi(.|x) and the policy version that produced it."""

    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    policy_version: int
    finish_reason: FinishReason = "stop"
    logprobs: list[float] | None = None
    """Engine-side per-token log-probs of ``response_ids`` (for engine/learner mismatch checks)."""
    stop_id: int | None = None
    """The stop token the policy produced when ``finish_reason == "stop"`` (one of the model's
    declared stop ids: ``<|im_end|>`` or ``<|endoftext|>`` for a ChatML model). It is not part of
    ``response_ids``; the pair puts exactly this id back (``pairs/make.py``). None when the
    response was cut at the length limit, or for rollouts made before it was recorded (the pair
    then uses the tokenizer's eos)."""


@dataclass(frozen=True)
class Correction:
    """A teacher's answer to one rollout: y' (possibly == y), or a rejection with its reason."""

    rollout: Rollout
    corrected_text: str | None
    """y'. None when the teacher's output was rejected (see ``rejection``)."""
    teacher: str
    rejection: str | None = None
    """Counted reason when no usable y' came back (``timeout``, ``empty``, ``refusal`` ...)."""
    latency_s: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.corrected_text is not None

    @property
    def is_noop(self) -> bool:
        return self.corrected_text == self.rollout.response_text


def make_pair_id(prompt_id: str, response_ids: list[int], policy_version: int) -> str:
    """Stable id of (x, y, version): the same rollout always maps to the same pair id, which is
    what lets a resumed run skip corrections already in the durable log."""
    digest = hashlib.sha1(
        json.dumps([prompt_id, response_ids, policy_version]).encode()
    ).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class CorrectionPair:
    """What the replay buffer stores and the learner consumes: x, y (rejected), y' (chosen)."""

    pair_id: str
    prompt_ids: list[int]
    rejected_ids: list[int]
    """y, the policy's response tokens."""
    chosen_ids: list[int]
    """y', the teacher's correction, tokenized with the policy's tokenizer."""
    policy_version: int
    teacher: str
    edit_distance: int
    """Token-level Levenshtein distance between y and y': the amount of correction."""
    prompt_id: str = ""
    ref_logps: tuple[float, float] | None = None
    """(log pi_ref(y'|x), log pi_ref(y|x)), filled once at ingestion when the objective needs it."""

    @property
    def is_noop(self) -> bool:
        return self.chosen_ids == self.rejected_ids

    def with_ref_logps(self, chosen: float, rejected: float) -> "CorrectionPair":
        return dataclasses.replace(self, ref_logps=(float(chosen), float(rejected)))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "CorrectionPair":
        record = dict(record)
        if record.get("ref_logps") is not None:
            record["ref_logps"] = tuple(record["ref_logps"])
        return cls(**record)


@dataclass
class TrainBatch:
    """A padded learner batch built from ``CorrectionPair``s (see ``collate.py``).

    Rows ``[0, n)`` are the chosen sequences x+y' and rows ``[n, 2n)`` the rejected x+y, so one
    forward pass scores both; ``response_mask`` is 1 on response tokens only (prompt and padding
    are masked), aligned with ``input_ids`` (position t scores token t given tokens < t).
    """

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    response_mask: "torch.Tensor"
    pair_ids: list[str]
    policy_versions: list[int]
    ref_chosen_logps: "torch.Tensor | None" = None
    ref_rejected_logps: "torch.Tensor | None" = None
    noop: "torch.Tensor | None" = None
    """Bool [n]: y' == y for this pair."""
    prompt_lengths: "torch.Tensor | None" = None
    """Long [n]: tokens of x in pair i (rows i and n+i start with the same prompt)."""
    shared_prefix_lengths: "torch.Tensor | None" = None
    """Long [n]: leading response tokens y and y' share; prompt + this prefix is identical in rows
    i and n+i, which is what the shared-prefix forward (``shared_prefix.py``) encodes once."""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)


@dataclass(frozen=True)
class StepStats:
    """What one learner step reports (all floats so that every sink can log them)."""

    step: int
    loss: float
    margin: float
    """Mean of log pi(y'|x) - log pi(y|x) over the batch (the negated amount of correction)."""
    chosen_logp: float
    rejected_logp: float
    grad_norm: float
    lr: float
    num_pairs: int
    num_tokens: int
    seconds: float
    skipped: bool = False
    """True when the loss was NaN/inf and the update was skipped."""
    extra: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "train/") -> dict[str, float]:
        out = {
            f"{prefix}{k}": float(v)
            for k, v in dataclasses.asdict(self).items()
            if k not in ("extra", "step")
        }
        out.update({f"{prefix}{k}": float(v) for k, v in self.extra.items()})
        return out


@dataclass
class WeightUpdate:
    """One versioned weight sync: flat buckets plus one metadata message.

    ``buckets`` hold the parameters flattened and concatenated (one tensor per bucket), and
    ``layout`` says where each named parameter lives, so the number of messages grows with the
    bucket count (model bytes / bucket size), never with the number of parameters.
    """

    version: int
    layout: list[tuple[str, int, int, tuple[int, ...], str]]
    """(name, bucket index, offset in elements, shape, dtype name) per parameter."""
    buckets: list["torch.Tensor"]

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buckets)


@dataclass(frozen=True)
class Sampling:
    """How a generator decodes: greedy when ``temperature == 0``."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Seed of this call's sampling (engines derive per-request seeds from it)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
