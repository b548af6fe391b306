"""Weight export (weights/export.py): exported bytes equal the learner's weights in both backends;
borrowed buckets are views (no copy); reused buffers never overwrite a version still held."""

from __future__ import annotations

import pytest
import torch
from _helpers import addition_pairs

from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.learner.learner import Learner
from correction_rl.models import build_model, build_tokenizer
from correction_rl.weights.export import WeightExporter, pack_parameters, plan_buckets, plan_key
from correction_rl.weights.group import WeightLayout
from correction_rl.weights.sync import flatten_to_buckets, unflatten

TOKENIZER = build_tokenizer()
BUCKET = 1 << 16  # several buckets for the tiny model


def _learner(backend: str, stage: int = 0) -> Learner:
    return Learner(build_model("tiny", seed=0), pad_id=TOKENIZER.pad_token_id,
                   learner_cfg=LearnerConfig(backend=backend, zero_stage=stage, lr=1e-3, micro_batch_pairs=8),
                   objective_cfg=ObjectiveConfig(form="logistic"), model_cfg=ModelConfig(), total_steps=10)


def _storage_spans(tensors) -> list[tuple[int, int]]:
    return [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in tensors]


def _check_export(learner: Learner) -> None:
    """Borrowed and copied exports both carry exactly the learner's current weights; the borrowed
    buckets lie inside the parameters' own storage (zero copy), the copied ones outside it."""
    exporter = WeightExporter(BUCKET)
    for _ in range(2):  # before and after a step: the borrowed views follow the live weights
        weights = {n: t.clone() for n, t in learner.named_weights()}
        borrowed = exporter.export(learner.named_weights(), learner.version, borrow=True)
        assert exporter.last_stats["copied_buckets"] == 0 and len(borrowed.buckets) > 1
        param_spans = _storage_spans(learner.model.parameters())
        for bucket in borrowed.buckets:
            assert any(lo <= bucket.data_ptr() < hi for lo, hi in param_spans)
        copied = exporter.export(learner.named_weights(), learner.version)
        assert exporter.last_stats["view_buckets"] == 0
        for bucket in copied.buckets:
            assert not any(lo <= bucket.data_ptr() < hi for lo, hi in param_spans)
        fresh = flatten_to_buckets(learner.named_weights(), learner.version, BUCKET)
        for update in (borrowed, copied):
            assert update.layout == fresh.layout
            got = dict(unflatten(update))
            assert got.keys() == weights.keys()
            for name, value in weights.items():
                assert torch.equal(got[name], value), name  # bit-equal, dtype included
        del borrowed, copied
        stats = learner.train_step(addition_pairs(TOKENIZER))
        assert not stats.skipped
    assert any(not torch.equal(weights[n], t) for n, t in learner.named_weights())  # the step moved them


def test_torch_learner_exports_its_weights_exactly_and_borrows_them():
    learner = _learner("torch")
    storages = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    assert len(storages) == 1  # packed once at construction (pack_parameters)
    _check_export(learner)


@pytest.mark.slow
def test_deepspeed_zero2_learner_exports_its_weights_exactly_and_borrows_them():
    _check_export(_learner("deepspeed", 2))


@pytest.mark.slow
def test_deepspeed_zero0_learner_exports_its_weights_exactly_and_borrows_them():
    learner = _learner("deepspeed", 0)  # packed at construction, before DeepSpeed sees them
    assert len({p.untyped_storage().data_ptr() for p in learner.model.parameters()}) == 1
    _check_export(learner)


def test_before_update_runs_after_backward_and_before_the_weights_change():
    learner = _learner("torch")
    weights = {n: t.clone() for n, t in learner.named_weights()}
    seen = []

    def before_update() -> None:
        grads = [p.grad for p in learner.model.parameters() if p.requires_grad]
        seen.append((all(torch.equal(weights[n], t) for n, t in learner.named_weights()),
                     any(g is not None and bool(g.abs().sum() > 0) for g in grads)))

    learner.train_step(addition_pairs(TOKENIZER), before_update=before_update)
    assert seen == [(True, True)]  # once: the weights unchanged, the gradients already there
    assert any(not torch.equal(weights[n], t) for n, t in learner.named_weights())


def test_a_held_version_keeps_its_bytes_when_later_versions_are_exported():
    model = build_model("tiny", seed=0)
    exporter = WeightExporter(BUCKET)  # plain model: not packed, so every export copies

    def bump():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    v1 = exporter.export(model.named_parameters(), 1)
    held = [b.clone() for b in v1.buckets]
    held_array = v1.buckets[0].numpy()  # a consumer may keep a view (numpy, unflatten) alone
    view_only = dict(unflatten(v1))
    name, first = next(iter(view_only.items()))
    first_bytes = first.clone()
    bump()
    v2 = exporter.export(model.named_parameters(), 2)
    assert all(torch.equal(a, b) for a, b in zip(held, v1.buckets))
    del v1  # only the numpy array and the unflattened views still hold version 1
    bump()
    v3 = exporter.export(model.named_parameters(), 3)
    assert torch.equal(torch.from_numpy(held_array), held[0])
    assert torch.equal(view_only[name], first_bytes)
    expected = dict(model.named_parameters())
    assert all(torch.equal(v, expected[n]) for n, v in unflatten(v3))
    assert not torch.equal(dict(unflatten(v2))[name], expected[name])  # v2 kept its own bytes too
    # nothing was overwritten: three live versions, three buffer sets (the oldest let go)
    assert exporter.last_stats["allocated_slots"] == 3
    del held_array, view_only, first, v2, v3
    for version in range(4, 10):  # once released, the buffers are reused: no new allocation
        bump()
        update = exporter.export(model.named_parameters(), version)
        assert all(torch.equal(v, expected[n]) for n, v in unflatten(update))
        del update
    assert exporter.last_stats["allocated_slots"] == 3


def test_the_plan_matches_the_collective_layout_and_follows_a_changed_model():
    model = build_model("tiny", seed=0)
    exporter = WeightExporter(BUCKET)
    update = exporter.export(model.named_parameters(), 1)
    assert WeightLayout.of(update) == WeightLayout.plan(model.named_parameters(), BUCKET)
    del update
    bigger = build_model("base", seed=0)
    update = exporter.export(bigger.named_parameters(), 2)  # another model: planned anew
    assert all(torch.equal(v, dict(bigger.named_parameters())[n]) for n, v in unflatten(update))
    with pytest.raises(ValueError, match="duplicate parameter name"):
        plan_buckets(plan_key([("a", torch.zeros(2)), ("a", torch.zeros(2))]), BUCKET)


def test_pack_parameters_keeps_identity_and_values_and_is_idempotent():
    model = build_model("tiny", seed=0)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    assert pack_parameters(model) == len(before)
    assert pack_parameters(model) == 0  # already back to back
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1])
    exporter = WeightExporter(1 << 30)
    update = exporter.export(model.named_parameters(), 1, borrow=True)
    assert exporter.last_stats["copied_buckets"] == 0 and len(update.buckets) == 1


@pytest.mark.gpu
def test_cuda_weights_export_into_pinned_host_buffers():
    model = build_model("tiny", seed=0).cuda()
    pack_parameters(model)
    exporter = WeightExporter(BUCKET, device="cpu")
    update = exporter.export(model.named_parameters(), 1, borrow=True)  # other device: copies
    assert all(b.device.type == "cpu" and b.is_pinned() for b in update.buckets)
    assert all(torch.equal(v, dict(model.named_parameters())[n].cpu()) for n, v in unflatten(update))
    on_gpu = WeightExporter(BUCKET).export(model.named_parameters(), 1, borrow=True)
    assert all(b.device.type == "cuda" for b in on_gpu.buckets)
