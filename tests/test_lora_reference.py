"""pi_ref with LoRA is the learner's base with the adapter disabled (issue 18): no second copy,
and its log-probs equal those of the untouched starting model."""

from __future__ import annotations

import torch

from correction_rl.config import config_from_dict
from correction_rl.learner.shared_prefix import score_pairs
from correction_rl.pairs.ingest import Ingest
from correction_rl.pairs.reference import ReferenceScorer
from correction_rl.learner.collate import collate_pairs
from test_learner import PAIRS, TOKENIZER, with_reference
from test_lora_learner import make_lora_learner


def test_reference_logps_equal_the_untouched_starting_model_after_training():
    learner = make_lora_learner(grad_accum=1, micro_batch_pairs=16)
    fresh = with_reference(PAIRS)  # a separate, untouched tiny model (seed 0): the old way
    for _ in range(4):
        learner.train_step(fresh)
    scorer = ReferenceScorer.adapter_disabled(learner, TOKENIZER.pad_token_id, learner.objective,
                                              learner.model_cfg, batch_pairs=8)
    assert scorer.model is learner.model  # no copy
    learner.model.train()
    scored = scorer.attach(PAIRS)
    assert learner.model.training  # the learner's mode is restored
    for a, b in zip(scored, fresh):
        assert a.ref_logps == b.ref_logps  # bit-identical: the base layers alone ran
    # and the adapter really moved the policy away from the reference
    batch, _ = collate_pairs(PAIRS, TOKENIZER.pad_token_id, 256, "truncate_response")
    learner.model.eval()
    with torch.no_grad():
        live = score_pairs(learner.model, batch, learner.objective).chosen_logps
    ref = torch.tensor([p.ref_logps[0] for p in fresh])
    assert (live - ref).abs().max() > 1e-2


def test_ingest_uses_the_lora_learner_base_in_process(tiny_model_dir):
    cfg = config_from_dict({"model": {"path": str(tiny_model_dir)}, "objective": {"form": "dpo"},
                            "learner": {"backend": "torch", "lora": {"enabled": True}}})
    learner = make_lora_learner()
    ingest = Ingest.from_config(cfg, TOKENIZER, policy=learner)
    assert ingest.reference is not None and ingest.reference.model is learner.model
    # without LoRA, or without a learner in this process (Ray teacher workers), the base is loaded
    plain = Ingest.from_config(cfg, TOKENIZER)
    assert plain.reference.model is not learner.model
