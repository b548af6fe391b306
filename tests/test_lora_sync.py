"""Adapter-only weight sync (issue 18): the update holds only lora_A / lora_B, and the HF engine
that applies it decodes exactly like the learner (greedy token ids and log-probs)."""

from __future__ import annotations

import pytest
import torch

from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.config.sections import LoRAConfig
from correction_rl.learner.backends import load_policy
from correction_rl.learner.learner import Learner
from correction_rl.rollout.hf import HFGenerator
from correction_rl.types import Prompt, Sampling
from correction_rl.weights.adapter import is_adapter_update
from correction_rl.weights.sync import InProcessSync, flatten_to_buckets
from test_learner import PAIRS, TOKENIZER, with_reference

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)
PROMPTS = [Prompt(prompt_id=f"q{i}", text=f"{i}+{i}=") for i in range(10, 26)]
GREEDY = Sampling(max_new_tokens=6, temperature=0.0)


def trained_lora_learner(model_dir, steps=6, lora_merge=False) -> Learner:
    cfg = LearnerConfig(backend="torch", lr=2e-2, micro_batch_pairs=16, grad_accum=1, lora=LORA)
    learner = Learner(load_policy(model_dir, cfg, torch.float32), pad_id=TOKENIZER.pad_token_id,
                      learner_cfg=cfg, objective_cfg=ObjectiveConfig(form="dpo"), model_cfg=ModelConfig(),
                      total_steps=100, lora_merge=lora_merge)
    pairs = with_reference(PAIRS)
    for _ in range(steps):
        learner.train_step(pairs)
    return learner


def _decode(gen):
    return [(r.response_ids, r.logprobs) for r in gen.generate(PROMPTS, GREEDY)]


def test_adapter_sync_gives_greedy_equality_with_the_learner_in_hf(tiny_model_dir, tiny_tokenizer):
    learner = trained_lora_learner(tiny_model_dir)
    engine = HFGenerator(tiny_model_dir, lora=LORA)
    base = _decode(engine)
    sync = InProcessSync([engine], timeout_s=60, source=learner)
    report = sync.start(learner.version).wait()
    assert engine.policy_version == learner.version
    full_bytes = sum(p.numel() * p.element_size() for p in learner.model.get_base_model().parameters())
    assert report.num_bytes * 20 <= full_bytes  # only the adapter travelled
    synced = _decode(engine)
    learner.model.eval()
    reference = _decode(HFGenerator(learner.model, tiny_tokenizer))
    assert synced == reference  # token ids AND log-probs, bit for bit
    assert [ids for ids, _ in synced] != [ids for ids, _ in base]  # the adapter changed the policy
    # a second round of training and sync stays exact (no rebuild, the base is never rewritten)
    learner.model.train()
    learner.train_step(with_reference(PAIRS))
    sync.start(learner.version).wait()
    learner.model.eval()
    assert _decode(engine) == _decode(HFGenerator(learner.model, tiny_tokenizer))


def test_update_is_adapter_only_and_merge_ships_full_weights(tiny_model_dir, tiny_tokenizer):
    learner = trained_lora_learner(tiny_model_dir, steps=3)
    adapter = flatten_to_buckets(learner.named_weights(), 1, 2**20)
    assert is_adapter_update(adapter)
    assert {n.rsplit(".", 2)[-2] for n, *_ in adapter.layout} == {"lora_A", "lora_B"}
    learner.lora_merge = True  # sync.lora_merge: a plain engine, full weights
    engine = HFGenerator(tiny_model_dir)
    InProcessSync([engine], timeout_s=60, source=learner).start(learner.version).wait()
    learner.model.eval()
    # merged weights round differently from base + B(A(x)): compare ids, and log-probs closely
    got, want = _decode(engine), _decode(HFGenerator(learner.model, tiny_tokenizer))
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)


def test_an_adapter_update_to_an_engine_without_adapter_names_the_fix(tiny_model_dir):
    learner = trained_lora_learner(tiny_model_dir, steps=1)
    engine = HFGenerator(tiny_model_dir)
    with pytest.raises(ValueError, match="sync.lora_merge"):
        engine.load_weights(flatten_to_buckets(learner.named_weights(), 1, 2**20))
    wrong_rank = HFGenerator(tiny_model_dir, lora=LoRAConfig(enabled=True, rank=8, alpha=8.0))
    with pytest.raises(ValueError, match="learner.lora.rank"):
        wrong_rank.load_weights(flatten_to_buckets(learner.named_weights(), 1, 2**20))


def test_lora_paths_vllm_cannot_take_are_refused_at_start():
    from correction_rl.config import ConfigError, config_from_dict
    from correction_rl.distributed.settings import check_settings
    from correction_rl.rollout.vllm_lora import engine_args

    gpus = {"gpus_per_learner_rank": 1, "gpus_per_rollout_worker": 1}
    cfg = config_from_dict({"rollout": {"engine": "vllm"}, "sync": {"transport": "collective"},
                            "learner": {"lora": {"enabled": True}}, "resources": gpus})
    with pytest.raises(ConfigError, match="sync.transport.*sync.lora_merge"):
        check_settings(cfg)
    check_settings(config_from_dict({"rollout": {"engine": "vllm"}, "sync": {"transport": "collective", "lora_merge": True},
                                     "learner": {"lora": {"enabled": True}}, "resources": gpus}))
    with pytest.raises(ConfigError, match="learner.lora.rank.*sync.lora_merge"):
        engine_args(LoRAConfig(enabled=True, rank=600), keep=3)
    assert engine_args(LoRAConfig(enabled=True, rank=12), keep=3) == {
        "enable_lora": True, "max_lora_rank": 16, "max_loras": 3, "max_cpu_loras": 3}
