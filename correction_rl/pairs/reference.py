"""Reference log-probs, computed once per pair when it enters the buffer.

The pi/pi_ref forms (dpo, ipo) need log pi_ref(y'|x) and log pi_ref(y|x). pi_ref is frozen, so
those numbers never change: computing them at ingestion and caching them on the pair
(``CorrectionPair.ref_logps``, also written to the durable log) means no learner step ever runs
the reference model, and a resumed run does not either. The one owner of a scorer is the ingest
step (``pairs/ingest.py``), in every mode: in-process in the loop, under Ray in each teacher
worker, next to where pairs are made. No learner holds one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from correction_rl.learner.collate import collate_pairs
from correction_rl.config import ModelConfig, ObjectiveConfig
from correction_rl.learner.shared_prefix import score_pairs
from correction_rl.types import CorrectionPair


class ReferenceScorer:
    """Scores pairs under a frozen model. It takes ownership of ``model`` (no copy is made, so a
    reference never costs two models): pass one nobody trains, e.g. a fresh ``load_model``."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        objective: ObjectiveConfig,
        model_cfg: ModelConfig,
        batch_pairs: int = 32,
    ):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.objective = objective
        self.model_cfg = model_cfg
        self.batch_pairs = max(1, batch_pairs)

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
            scores = score_pairs(self.model, batch, self.objective)
            for pid, c, r in zip(batch.pair_ids, scores.chosen_logps.tolist(), scores.rejected_logps.tolist()):
                scored[pid] = chunk[pid].with_ref_logps(c, r)
        return [scored.get(p.pair_id, p) for p in pairs]
