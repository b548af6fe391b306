"""Learner: a real update lowers the amount of correction; DeepSpeed == torch; bad batches."""

from __future__ import annotations

import math

import pytest
import torch

from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.learner.backends import lr_lambda
from correction_rl.learner.learner import Learner
from correction_rl.models import build_model, build_tokenizer
from correction_rl.types import CorrectionPair

TOKENIZER = build_tokenizer()


def pair(i: int, prompt: str, y: str, y_prime: str) -> CorrectionPair:
    enc = lambda text: TOKENIZER(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = TOKENIZER.eos_token_id
    rejected, chosen = enc(y) + [eos], enc(y_prime) + [eos]
    return CorrectionPair(
        pair_id=f"p{i}",
        prompt_ids=TOKENIZER(prompt)["input_ids"],
        rejected_ids=rejected,
        chosen_ids=chosen,
        policy_version=0,
        teacher="test",
        edit_distance=sum(a != b for a, b in zip(chosen, rejected)),
    )


PAIRS = [pair(i, f"{i}+{i}=", str(2 * i + 1), str(2 * i)) for i in range(10, 26)]


def make_learner(backend="torch", stage=0, form="logistic", **learner_kw) -> Learner:
    kw = dict(backend=backend, zero_stage=stage, lr=1e-3, micro_batch_pairs=8, grad_accum=2)
    kw.update(learner_kw)
    return Learner(
        build_model("tiny", seed=0),
        pad_id=TOKENIZER.pad_token_id,
        learner_cfg=LearnerConfig(**kw),
        objective_cfg=ObjectiveConfig(form=form),
        model_cfg=ModelConfig(),
        total_steps=100,
    )


def test_overfitting_one_batch_raises_the_margin():
    learner = make_learner(form="logistic")
    first = learner.train_step(PAIRS)
    for _ in range(15):
        last = learner.train_step(PAIRS)
    assert last.margin > first.margin + 2.0
    assert last.loss < first.loss
    assert learner.version == 16 and not last.skipped
    assert last.num_pairs == len(PAIRS) and last.num_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_step_equals_torch_step(stage):
    init = {n: p.detach().clone() for n, p in build_model("tiny", seed=0).named_parameters()}
    results = {}
    for backend, zero in (("torch", 0), ("deepspeed", stage)):
        learner = make_learner(backend, zero, form="dpo")
        pairs = learner.attach_reference(PAIRS)
        stats = [learner.train_step(pairs) for _ in range(3)]
        results[backend] = ({n: t.clone() for n, t in learner.named_weights()}, stats)
    (w_torch, s_torch), (w_ds, s_ds) = results["torch"], results["deepspeed"]
    moved = max((w_torch[n] - init[n]).abs().max().item() for n in init)
    assert moved > 1e-3  # the step really changed the weights
    worst = max((w_torch[n] - w_ds[n]).abs().max().item() for n in init)
    assert worst < 1e-4 * moved * 10
    for a, b in zip(s_torch, s_ds):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
        assert a.lr == pytest.approx(b.lr)


def test_nonfinite_loss_skips_the_step_and_training_goes_on():
    learner = make_learner(form="dpo", grad_accum=1, micro_batch_pairs=16)
    good = learner.attach_reference(PAIRS)
    poisoned = [p.with_ref_logps(float("nan"), 0.0) for p in good]
    before = {n: t.clone() for n, t in learner.named_weights()}
    stats = learner.train_step(poisoned)
    assert stats.skipped and learner.version == 0
    assert stats.extra["skipped_steps"] == 1 and stats.extra["nonfinite_microbatches"] == 1
    after = dict(learner.named_weights())
    assert all(torch.equal(before[n], after[n]) for n in before)
    ok = learner.train_step(good)
    assert not ok.skipped and learner.version == 1 and math.isfinite(ok.loss)


def test_a_nonfinite_microbatch_is_left_out_of_the_step():
    learner = make_learner(form="dpo", grad_accum=2, micro_batch_pairs=8)
    good = learner.attach_reference(PAIRS)
    mixed = good[:8] + [p.with_ref_logps(float("inf"), float("-inf")) for p in good[8:]]
    stats = learner.train_step(mixed)
    assert not stats.skipped and learner.version == 1
    assert stats.num_pairs == 8 and stats.extra["nonfinite_microbatches"] == 1


def test_noop_pairs_are_dropped_and_counted():
    noop = pair(99, "1+1=", "2", "2")
    learner = make_learner(form="logistic")
    stats = learner.train_step(PAIRS[:4] + [noop])
    assert stats.num_pairs == 4 and stats.extra["dropped_noop"] == 1


def test_too_long_pairs_follow_the_truncation_policy():
    long_pair = pair(98, "1+1=", "9" * 300, "8" * 300)
    learner = Learner(
        build_model("tiny", seed=0), TOKENIZER.pad_token_id,
        LearnerConfig(backend="torch", micro_batch_pairs=8), ObjectiveConfig(form="logistic"),
        ModelConfig(max_seq_len=64, truncation="drop"), total_steps=10,
    )
    stats = learner.train_step(PAIRS[:3] + [long_pair])
    assert stats.num_pairs == 3 and stats.extra["dropped_by_truncation"] == 1


def test_lr_schedules():
    cfg = LearnerConfig(lr_schedule="cosine", warmup_steps=4)
    f = lr_lambda(cfg, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda(LearnerConfig(lr_schedule="linear"), total_steps=10)
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda(LearnerConfig(), 10)(7) == 1.0
