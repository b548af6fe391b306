"""LoRA on the learner (issue 18): only the adapter trains, both backends, exports, resume."""

from __future__ import annotations

import pytest
import torch

from correction_rl.config import ConfigError, LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.config.sections import LoRAConfig
from correction_rl.learner.learner import Learner
from correction_rl.models import build_model
from test_learner import PAIRS, TOKENIZER, with_reference

LORA = LoRAConfig(enabled=True, rank=4, alpha=8.0)


def make_lora_learner(backend="torch", stage=0, form="dpo", lora=LORA, lora_merge=False, **kw) -> Learner:
    args = dict(backend=backend, zero_stage=stage, lr=1e-2, micro_batch_pairs=8, grad_accum=2, lora=lora)
    args.update(kw)
    return Learner(build_model("tiny", seed=0), pad_id=TOKENIZER.pad_token_id, learner_cfg=LearnerConfig(**args),
                   objective_cfg=ObjectiveConfig(form=form), model_cfg=ModelConfig(), total_steps=100,
                   lora_merge=lora_merge)


def _base_params(learner):
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" not in n}


def test_only_the_adapter_gets_gradients_and_optimizer_state():
    learner = make_lora_learner()
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # one adapter pair per target layer: 4 projections x 2 layers x (A, B)
    assert len(trainable) == 4 * learner.model.config.num_hidden_layers * 2
    base = _base_params(learner)
    pairs = with_reference(PAIRS)
    first = learner.train_step(pairs)
    for _ in range(5):
        last = learner.train_step(pairs)
    assert last.margin > first.margin + 0.5  # the adapter learns
    after = _base_params(learner)
    assert all(torch.equal(base[n], after[n]) for n in base)  # the base never moves
    state = learner.backend.optimizer.state
    ids = {id(p) for p in learner.backend.optimizer.param_groups[0]["params"]}
    lora_ids = {id(p) for n, p in learner.model.named_parameters() if "lora_" in n}
    assert ids == lora_ids and len(state) == len(lora_ids)
    assert all(p.grad is None for n, p in learner.model.named_parameters() if "lora_" not in n)


def test_unknown_target_module_names_the_field():
    with pytest.raises(ConfigError, match="learner.lora.target_modules.*qproj"):
        make_lora_learner(lora=LoRAConfig(enabled=True, target_modules=["qproj"]))


def test_adapter_export_is_small_and_merged_export_is_the_effective_model():
    learner = make_lora_learner(grad_accum=1, micro_batch_pairs=16)
    pairs = with_reference(PAIRS)
    for _ in range(3):
        learner.train_step(pairs)
    adapter = dict(learner.named_weights())
    assert adapter and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in adapter)
    assert all(n.startswith("base_model.model.") and ".default." not in n for n in adapter)
    learner.lora_merge = True
    merged = dict(learner.named_weights())
    plain = build_model("tiny", seed=0)
    assert set(merged) == {n for n, _ in plain.named_parameters()}
    with torch.no_grad():
        for n, p in plain.named_parameters():
            p.copy_(merged[n])
    plain.eval()
    learner.model.eval()
    ids = torch.tensor([TOKENIZER("12+34=")["input_ids"]])
    with torch.no_grad():
        want = learner.model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert not torch.allclose(want, build_model("tiny", seed=0)(input_ids=ids).logits, atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_lora_step_equals_torch_lora_step(stage):
    results = {}
    for backend, zero in (("torch", 0), ("deepspeed", stage)):
        torch.manual_seed(0)  # the adapter's A is drawn at wrap time
        learner = make_lora_learner(backend, zero)
        assert {n for n, p in learner.model.named_parameters() if p.requires_grad} == \
            {n for n, _ in learner.model.named_parameters() if "lora_" in n}
        pairs = with_reference(PAIRS)
        stats = [learner.train_step(pairs) for _ in range(3)]
        results[backend] = ({n: t.clone() for n, t in learner.named_weights()}, stats)
    (w_t, s_t), (w_d, s_d) = results["torch"], results["deepspeed"]
    assert set(w_t) == set(w_d)
    moved = max(w_t[n].abs().max().item() for n in w_t if ".lora_B." in n)
    assert moved > 1e-3
    worst = max((w_t[n] - w_d[n]).abs().max().item() for n in w_t)
    assert worst < 1e-3 * moved
    for a, b in zip(s_t, s_d):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)


@pytest.mark.parametrize("backend,stage", [("torch", 0), pytest.param("deepspeed", 2, marks=pytest.mark.slow)])
def test_lora_learner_state_resumes_exactly_and_holds_only_the_adapter(tmp_path, backend, stage):
    """Train 3 steps, save, train 2 more; a fresh LoRA learner (another random A) loaded from
    the save and trained the same 2 steps ends with the same adapter, LR, version and counters;
    the saved state holds the adapter and its AdamW moments, not the frozen base."""
    pairs = with_reference(PAIRS)
    kw = dict(lr_schedule="linear", warmup_steps=2)
    a = make_lora_learner(backend, stage, **kw)
    for _ in range(3):
        a.train_step(pairs)
    a.save_state(tmp_path / "learner")
    tail_a = [a.train_step(pairs) for _ in range(2)]
    b = make_lora_learner(backend, stage, **kw)
    before = {n: t.clone() for n, t in b.named_weights()}
    b.load_state(tmp_path / "learner")
    assert b.version == 3
    tail_b = [b.train_step(pairs) for _ in range(2)]
    wa, wb = dict(a.named_weights()), dict(b.named_weights())
    assert max((wa[n] - before[n]).abs().max().item() for n in wa) > 1e-3
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) < 1e-6
    assert [s.lr for s in tail_a] == pytest.approx([s.lr for s in tail_b])
    assert [s.loss for s in tail_a] == pytest.approx([s.loss for s in tail_b], rel=1e-5)
    assert b.version == 5 and b.counters == a.counters
    saved = sum(f.stat().st_size for f in (tmp_path / "learner").rglob("*") if f.is_file())
    base = sum(p.numel() * p.element_size() for n, p in a.model.named_parameters() if "lora_" not in n)
    assert saved < base / 4  # the base is model.path, never copied into a checkpoint
    if backend == "torch":
        state = torch.load(tmp_path / "learner" / "learner.pt", weights_only=False)
        assert state["model"] and all("lora_" in n for n in state["model"])


def test_a_lora_checkpoint_into_a_full_learner_is_refused(tmp_path):
    a = make_lora_learner()
    a.save_state(tmp_path / "learner")
    full = make_lora_learner(lora=LoRAConfig())  # LoRA off: every weight trains
    with pytest.raises(RuntimeError, match="Missing key"):
        full.load_state(tmp_path / "learner")
    other_layers = make_lora_learner(lora=LoRAConfig(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="learner.lora must match"):
        other_layers.load_state(tmp_path / "learner")


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_policy_export_as_adapter_or_merged(tmp_path, export):
    from peft import PeftModel

    from correction_rl.models import load_model

    learner = make_lora_learner(lora=LoRAConfig(enabled=True, rank=4, alpha=8.0, export=export),
                                grad_accum=1, micro_batch_pairs=16)
    for _ in range(3):
        learner.train_step(with_reference(PAIRS))
    build_model("tiny", seed=0).save_pretrained(tmp_path / "base")
    learner.save_pretrained(tmp_path / "policy")
    if export == "adapter":
        assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(load_model(tmp_path / "base"), str(tmp_path / "policy"))
    else:
        assert not (tmp_path / "policy" / "adapter_config.json").exists()
        reloaded = load_model(tmp_path / "policy")  # a plain HF model
    ids = torch.tensor([TOKENIZER("12+34=")["input_ids"]])
    learner.model.eval()
    with torch.no_grad():
        want, got = learner.model(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits
        base = load_model(tmp_path / "base")(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lora_on_a_zero_init_partitioned_policy_matches_torch(tiny_model_dir):
    """ZeRO-3 with ``zero_init``: peft wraps a policy built partitioned; DeepSpeed partitions the
    new adapter at ``initialize``. Same steps as the torch LoRA learner, same adapter."""
    from correction_rl.learner.backends import load_policy

    pairs = with_reference(PAIRS)
    results = {}
    for backend, stage in (("torch", 0), ("deepspeed", 3)):
        cfg = LearnerConfig(backend=backend, zero_stage=stage, zero_init=True, lr=1e-2, micro_batch_pairs=8,
                            grad_accum=2, lora=LORA)
        model = load_policy(tiny_model_dir, cfg, torch.float32)
        torch.manual_seed(0)  # the adapter's A is drawn at wrap time
        learner = Learner(model, TOKENIZER.pad_token_id, cfg, ObjectiveConfig(form="dpo"), ModelConfig(),
                          total_steps=100)
        stats = [learner.train_step(pairs) for _ in range(3)]
        results[backend] = ({n: t.clone() for n, t in learner.named_weights()}, stats)
    (w_t, s_t), (w_d, s_d) = results["torch"], results["deepspeed"]
    assert set(w_t) == set(w_d) and all(".lora_" in n for n in w_t)
    moved = max(w_t[n].abs().max().item() for n in w_t if ".lora_B." in n)
    assert moved > 1e-3
    assert max((w_t[n] - w_d[n]).abs().max().item() for n in w_t) < 1e-3 * moved
    for a, b in zip(s_t, s_d):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_resume_config_check_covers_lora_and_accepts_checkpoints_from_before_it():
    from correction_rl.config import RunConfig, to_dict
    from correction_rl.config.sections import LearnerConfig as LC
    from correction_rl.run.checkpoint import config_diffs

    now = to_dict(RunConfig())
    old = to_dict(RunConfig())
    del old["learner"]["lora"]  # a checkpoint written before learner.lora existed
    assert config_diffs(old, now) == {}
    with_lora = to_dict(RunConfig(learner=LC(lora=LoRAConfig(enabled=True))))
    assert set(config_diffs(old, with_lora)) == {"learner.lora.enabled"}
    assert set(config_diffs(now, to_dict(RunConfig(learner=LC(lora=LoRAConfig(rank=8)))))) == {"learner.lora.rank"}
