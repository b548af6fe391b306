"""Reference log-probs, computed once per pair when it enters the buffer.

The pi/pi_ref forms (dpo, ipo) need log pi_ref(y'|x) and log pi_ref(y|x). pi_ref is frozen, so
those numbers never change: computing them at ingestion and caching them on the pair
(``CorrectionPair.ref_logps``, also written to the durable log) means no learner step ever runs
the reference model, and a resumed run does not either. The one owner of a scorer is the ingest
step (``pairs/ingest.py``), in every mode: in-process in the loop, under Ray in each teacher
worker, next to where pairs are made. No learner holds one.

With LoRA (``learner.lora.enabled``) the learner's frozen base is the starting policy, so in
the in-process mode the scorer is the learner's own model with the adapter disabled
(``ReferenceScorer.adapter_disabled``): no second copy of the policy exists at all. Under Ray
the teacher workers have no learner in their process and keep loading the base from
``model.path``, which holds the same frozen weights (docs/lora.md).
"""

from __future__ import annotations

import contextlib

from typing import Any, Callable, ContextManager, Sequence

import torch

from correction_rl.learner.collate import collate_pairs
from correction_rl.config import ModelConfig, ObjectiveConfig
from correction_rl.learner.shared_prefix import score_pairs
from correction_rl.types import CorrectionPair


class ReferenceScorer:
    """Scores pairs under a frozen model. It takes ownership of ``model`` (no copy is made, so a
    reference never costs two models): pass one nobody trains, e.g. a fresh ``load_model``.

    ``context``: when given, ``model`` is NOT owned (a LoRA learner's model, still training) and
    every scoring pass runs inside ``context()`` (the adapter disabled) in eval mode, the model's
    train/eval mode restored afterwards."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        objective: ObjectiveConfig,
        model_cfg: ModelConfig,
        batch_pairs: int = 32,
        context: Callable[[], ContextManager] | None = None,
    ):
        self.model = model
        self._context = context
        if context is None:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.pad_id = pad_id
        self.objective = objective
        self.model_cfg = model_cfg
        self.batch_pairs = max(1, batch_pairs)

    @classmethod
    def adapter_disabled(cls, learner: Any, pad_id: int, objective: ObjectiveConfig, model_cfg: ModelConfig,
                         batch_pairs: int = 32) -> "ReferenceScorer":
        """pi_ref as a LoRA ``Learner``'s base: its model with the adapter disabled."""
        return cls(learner.model, pad_id, objective, model_cfg, batch_pairs, context=learner.reference_mode)

    @contextlib.contextmanager
    def _scoring(self):
        if self._context is None:
            yield
            return
        was_training = self.model.training
        self.model.eval()
        try:
            with self._context():
                yield
        finally:
            self.model.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def attach(self, pairs: Sequence[CorrectionPair]) -> list[CorrectionPair]:
        """``pairs`` with ``ref_logps`` filled (pairs that already have them are kept as they are;
        pairs the collator drops for length keep ``None`` and are dropped again by the learner)."""
        scored: dict[str, CorrectionPair] = {}
        todo = [p for p in pairs if p.ref_logps is None]
        for start in range(0, len(todo), self.batch_pairs):
            chunk = {p.pair_id: p for p in todo[start : start + self.batch_pairs]}
            batch, _ = collate_pairs(
                list(chunk.values()), self.pad_id, self.model_cfg.max_seq_len, self.model_cfg.truncation
            )
            if batch is None:
                continue
            for name, value in vars(batch).items():
                if isinstance(value, torch.Tensor):
                    setattr(batch, name, value.to(self.device))
            with self._scoring():
                scores = score_pairs(self.model, batch, self.objective)
            for pid, c, r in zip(batch.pair_ids, scores.chosen_logps.tolist(), scores.rejected_logps.tolist()):
                scored[pid] = chunk[pid].with_ref_logps(c, r)
        return [scored.get(p.pair_id, p) for p in pairs]
