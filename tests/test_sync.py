"""Bucketing, versioning, timeouts and reports of the weight sync (no vLLM needed)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from correction_rl.rollout.hf import HFGenerator
from correction_rl.weights.sync import (
    InProcessSync,
    StaleWeightsError,
    SyncTimeout,
    flatten_to_buckets,
    num_messages,
    unflatten,
)
from correction_rl.types import WeightUpdate
from correction_rl.weights.transport import DoneSync, WeightTransport, sync as run_sync


def _named(count: int, numel: int, dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(count)
    return [(f"p{i}", torch.randn(numel, generator=gen).to(dtype).reshape(-1, 1)) for i in range(count)]


def test_round_trip_is_exact_and_views_share_the_buckets():
    tensors = [
        ("a", torch.randn(3, 5)),
        ("b", torch.randn(7).to(torch.bfloat16)),
        ("c", torch.randn(2, 2, 2)),
        ("d", torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        ("e", torch.randn(11).to(torch.bfloat16)),
    ]
    update = flatten_to_buckets(iter(tensors), version=3, bucket_bytes=64)
    out = list(unflatten(update))
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, want), (_, got) in zip(tensors, out):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        # a view into one of the buckets, not a copy
        assert any(got.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for b in update.buckets)
    assert all(b.dim() == 1 for b in update.buckets)
    assert len({b.dtype for b in update.buckets}) == 3
    assert update.num_bytes == sum(t.numel() * t.element_size() for _, t in tensors)


def test_messages_do_not_grow_with_parameter_count():
    total = 1 << 16  # elements; 256 KiB of float32 either way
    bucket_bytes = 64 * 1024
    few = flatten_to_buckets(_named(4, total // 4), 1, bucket_bytes)
    many = flatten_to_buckets(_named(1024, total // 1024), 1, bucket_bytes)
    assert few.num_bytes == many.num_bytes == total * 4
    expected = math.ceil(total * 4 / bucket_bytes) + 1
    assert num_messages(few) == num_messages(many) == expected


def test_tensor_bigger_than_a_bucket_gets_its_own_bucket():
    update = flatten_to_buckets(_named(3, 1000), 1, bucket_bytes=100)
    assert len(update.buckets) == 3
    assert [b.numel() for b in update.buckets] == [1000, 1000, 1000]


def test_corrupt_layout_names_the_parameter():
    update = flatten_to_buckets(_named(2, 10), 1, bucket_bytes=1 << 20)
    bad = WeightUpdate(update.version, [("p1", 0, 15, (10, 1), "float32")], update.buckets)
    with pytest.raises(ValueError, match="'p1'"):
        list(unflatten(bad))


def test_hf_generator_rejects_version_regression_and_partial_updates(tiny_model_dir, learner_weights):
    gen = HFGenerator(tiny_model_dir, policy_version=5)
    old = flatten_to_buckets(learner_weights.items(), version=4, bucket_bytes=1 << 20)
    with pytest.raises(StaleWeightsError, match="version 5.*older update version 4"):
        gen.load_weights(old)
    assert gen.policy_version == 5
    partial = flatten_to_buckets(list(learner_weights.items())[:-1], version=6, bucket_bytes=1 << 20)
    with pytest.raises(ValueError, match="does not cover 1 parameters"):
        gen.load_weights(partial)
    renamed = flatten_to_buckets(
        [("module." + n, t) for n, t in learner_weights.items()], version=6, bucket_bytes=1 << 20
    )
    with pytest.raises(KeyError, match="module.model.embed_tokens.weight"):
        gen.load_weights(renamed)


def test_in_process_sync_copies_the_weights_and_reports(tiny_model_dir, learner_weights):
    gens = [HFGenerator(tiny_model_dir), HFGenerator(tiny_model_dir)]
    sync = InProcessSync(gens, timeout_s=30)
    assert isinstance(sync, WeightTransport) and not sync.overlaps_training
    update = flatten_to_buckets(learner_weights.items(), version=1, bucket_bytes=256 * 1024)
    report = sync.publish(update)
    assert report.version == 1 and report.num_targets == 2
    assert report.num_bytes == sum(t.numel() * 4 for t in learner_weights.values())
    assert report.num_messages == len(update.buckets) + 1 < len(learner_weights)
    assert report.seconds > 0 and report.gb_per_s > 0
    for gen in gens:
        assert gen.policy_version == 1
        for name, p in gen.model.named_parameters():
            assert torch.equal(p, learner_weights[name]), name
    assert set(report.as_metrics()) >= {"sync/seconds", "sync/gb_per_s", "sync/num_messages"}


class _Source:
    """A learner stand-in for the export: the same ``named_weights`` a ``Learner`` has."""

    def __init__(self, weights):
        self.weights = weights

    def named_weights(self):
        return iter(self.weights.items())


def test_in_process_transport_exports_inside_start(tiny_model_dir, learner_weights):
    """``start(v)`` flattens the source's weights itself and every generator serves v after it."""
    gens = [HFGenerator(tiny_model_dir), HFGenerator(tiny_model_dir)]
    transport = InProcessSync(gens, timeout_s=30, source=_Source(learner_weights), bucket_bytes=256 * 1024)
    pending = transport.start(3)
    assert isinstance(pending, DoneSync) and pending.version == 3
    report = pending.wait()
    assert report.version == 3 and report.num_targets == 2
    assert report.num_bytes == sum(t.numel() * 4 for t in learner_weights.values())
    for gen in gens:
        assert gen.policy_version == 3
        for name, p in gen.model.named_parameters():
            assert torch.equal(p, learner_weights[name]), name
    assert run_sync(transport, 4).version == 4
    transport.close()
    with pytest.raises(ValueError, match="source"):
        InProcessSync(gens).start(5)


class StalledGenerator(HFGenerator):
    """An HF engine whose weight load blocks until released: a stand-in for a dead worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def load_weights(self, update):
        self.release.wait(timeout=60)
        super().load_weights(update)


def test_timeout_fires_on_a_stalled_apply(tiny_model_dir, learner_weights):
    healthy, stalled = HFGenerator(tiny_model_dir), StalledGenerator(tiny_model_dir)
    sync = InProcessSync([healthy, stalled], timeout_s=0.5)
    update = flatten_to_buckets(learner_weights.items(), version=7, bucket_bytes=1 << 20)
    start = time.perf_counter()
    with pytest.raises(SyncTimeout) as info:
        sync.publish(update)
    elapsed = time.perf_counter() - start
    stalled.release.set()
    message = str(info.value)
    assert "version 7" in message and "StalledGenerator" in message and "0.5 s" in message
    assert info.value.version == 7 and info.value.timeout_s == 0.5
    assert elapsed < 5.0
    assert healthy.policy_version == 7  # the engines before the stalled one were updated


def test_errors_inside_the_apply_propagate(tiny_model_dir, learner_weights):
    gen = HFGenerator(tiny_model_dir, policy_version=2)
    update = flatten_to_buckets(learner_weights.items(), version=1, bucket_bytes=1 << 20)
    with pytest.raises(StaleWeightsError):
        InProcessSync([gen], timeout_s=10).publish(update)


def test_repeated_syncs_into_an_owned_hf_model_stay_exact(tiny_model_dir, learner_weights):
    """The second sync with the same layout takes the flat-buffer fast path; a new layout
    (another bucket size) goes through the validated per-parameter path again."""
    gen = HFGenerator(tiny_model_dir)
    for version, (scale, bucket_bytes) in enumerate([(1.0, 1 << 20), (2.0, 1 << 20), (3.0, 1 << 16)], 1):
        weights = [(n, t * scale) for n, t in learner_weights.items()]
        gen.load_weights(flatten_to_buckets(weights, version, bucket_bytes))
        for name, p in gen.model.named_parameters():
            assert torch.equal(p, learner_weights[name] * scale), (version, name)
        assert gen.policy_version == version
    with torch.no_grad():  # the model still runs on its re-homed parameters
        assert torch.isfinite(gen.model(input_ids=torch.tensor([[1, 5, 6]])).logits).all()
