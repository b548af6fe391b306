"""The one ingest step of every mode: teacher corrections -> pairs -> pi_ref log-probs -> buffer.

Why one step: the route of a pair must be the same whatever runs the loop. In-process the loop
calls it after the teacher; under Ray each ``TeacherWorker`` calls it next to its teacher. In
both, the pairs are made with the policy tokenizer (``pairs/make.py``: token-consistent
chosen/rejected ids), their reference log-probs are attached ONCE here (``pairs/reference.py``),
and only then do they reach the buffer, whose durable log therefore holds complete pairs.

Why ``Ingest`` owns pi_ref: the reference is the starting policy, frozen. Building it here, from
``model.path`` and never from the learner's live model, makes it impossible for a reference to
drift with training, and means no learner (or learner rank) holds a policy copy it never calls.
Reference-free objectives (``needs_reference`` false) build no model at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from correction_rl.pairs.make import make_pairs
from correction_rl.types import Correction, CorrectionPair

if TYPE_CHECKING:
    from correction_rl.config import RunConfig
    from correction_rl.pairs.reference import ReferenceScorer


class PairSink(Protocol):
    """Where ingested pairs go: ``ReplayBuffer`` in-process, the ``BufferActor`` (through a
    Ray call wrapper) under Ray. ``batch_key`` names a hand-off the sink resolves in the same
    call (async mode's ``HandoffLedger``); a local buffer has none, so it is passed only when set.

    ``add`` returns the number of pairs admitted to memory, or an object with an ``admitted``
    field (``ReplayBuffer``'s ``AddResult``)."""

    def add(self, pairs: list[CorrectionPair], batch_key: Any = None) -> Any: ...


@dataclass(frozen=True)
class IngestResult:
    """What one ingest call did; nothing is dropped without a count."""

    pairs: list[CorrectionPair]
    """The pairs handed to the sink (with ``ref_logps`` when the objective needs them)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Corrections that did not become pairs, by reason (``make_pairs``' counted reasons)."""
    added: int = 0
    """Pairs the sink reported admitted to memory (logged duplicates and stale pairs are not)."""


class Ingest:
    """Corrections -> token-consistent pairs -> reference log-probs -> sink."""

    def __init__(self, tokenizer: Any, reference: "ReferenceScorer | None"):
        self.tokenizer = tokenizer
        self.reference = reference

    @classmethod
    def from_config(cls, cfg: "RunConfig", tokenizer: Any, device: str | None = None,
                    policy: Any = None) -> "Ingest":
        """The ingest step of a run: a ``ReferenceScorer`` over the INITIAL policy
        (``model.path``, loaded here, in the learner's dtype) when the objective needs pi_ref.

        ``policy``: the run's ``Learner`` when it lives in this process (in-process mode). With
        ``learner.lora.enabled`` its frozen base IS the initial policy, so pi_ref is that model
        with the adapter disabled and no second copy is loaded (docs/lora.md). Under Ray the
        teacher workers have no learner in their process and load the base from ``model.path``
        (the same weights: LoRA never changes them); no learner rank carries a copy."""
        from correction_rl.learner.objectives import needs_reference

        if not needs_reference(cfg.objective):
            return cls(tokenizer, None)
        import torch

        from correction_rl.pairs.reference import ReferenceScorer

        if policy is not None and cfg.learner.lora.enabled:
            return cls(tokenizer, ReferenceScorer.adapter_disabled(
                policy, tokenizer.pad_token_id, cfg.objective, cfg.model, cfg.learner.micro_batch_pairs))

        from correction_rl.learner.backends import resolve_dtype
        from correction_rl.models import load_model

        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(cfg.model.path).to(target, dtype=resolve_dtype(cfg.model, cfg.learner))
        model.config.use_cache = False
        scorer = ReferenceScorer(model, tokenizer.pad_token_id, cfg.objective, cfg.model,
                                 cfg.learner.micro_batch_pairs)
        return cls(tokenizer, scorer)

    def prepare(self, corrections: Sequence[Correction]) -> tuple[list[CorrectionPair], dict[str, int]]:
        """The pairs of ``corrections`` with their reference log-probs, and the skipped counts:
        everything but the hand-over to a sink (for callers that return pairs to a driver)."""
        pairs, skipped = make_pairs(list(corrections), self.tokenizer, self.tokenizer.eos_token_id)
        if self.reference is not None and pairs:
            pairs = self.reference.attach(pairs)
        return pairs, skipped

    def __call__(self, corrections: Sequence[Correction], sink: PairSink, batch_key: Any = None) -> IngestResult:
        pairs, skipped = self.prepare(corrections)
        out = sink.add(pairs) if batch_key is None else sink.add(pairs, batch_key)
        added = int(getattr(out, "admitted", out))
        return IngestResult(pairs=pairs, skipped=skipped, added=added)

    def close(self) -> None:
        """Free the reference model (a worker that is shutting down)."""
        self.reference = None
