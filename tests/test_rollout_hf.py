"""The HF ``generate`` engine: rollout fields, log-probs, seeding, and weights after a sync."""

from __future__ import annotations

import pytest
import torch
from conftest import TRAIN_EXAMPLES

from correction_rl.rollout import Generator
from correction_rl.rollout.hf import HFGenerator
from correction_rl.weights.sync import InProcessSync, flatten_to_buckets
from correction_rl.types import Prompt, Sampling

GREEDY = Sampling(max_new_tokens=8, temperature=0.0)


def _prompts() -> list[Prompt]:
    return [Prompt(f"p{i}", text) for i, (text, _) in enumerate(TRAIN_EXAMPLES)]


def _teacher_forced_logps(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def test_greedy_after_sync_equals_the_learner(tiny_model_dir, tiny_tokenizer, learner_model):
    engine = HFGenerator(tiny_model_dir)
    assert isinstance(engine, Generator)
    before = [r.response_text for r in engine.generate(_prompts(), GREEDY)]

    # one more AdamW step on the learner side, then publish through the in-process transport
    opt = torch.optim.AdamW(learner_model.parameters(), lr=1e-3)
    ids = tiny_tokenizer(["12+34=46"], return_tensors="pt")["input_ids"]
    learner_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    update = flatten_to_buckets(learner_model.named_parameters(), version=1, bucket_bytes=128 * 1024)
    InProcessSync([engine]).publish(update)

    learner = HFGenerator(learner_model, tiny_tokenizer, policy_version=1)
    want = learner.generate(_prompts(), GREEDY)
    got = engine.generate(_prompts(), GREEDY)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    assert [r.response_text for r in got] == [answer for _, answer in TRAIN_EXAMPLES]
    assert [r.response_text for r in got] != before  # the sync really changed the engine
    assert all(r.policy_version == 1 and r.finish_reason == "stop" for r in got)


def test_greedy_logprobs_are_the_models_teacher_forced_logprobs(tiny_model_dir, learner_model, tiny_tokenizer):
    engine = HFGenerator(learner_model, tiny_tokenizer)
    prompts = _prompts() + [Prompt("free", "99+1=")]
    for r in engine.generate(prompts, GREEDY):
        assert len(r.logprobs) == len(r.response_ids) > 0
        want = _teacher_forced_logps(learner_model, r.prompt_ids, r.response_ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=1e-4)


def test_sampled_logprobs_use_the_temperature(learner_model, tiny_tokenizer):
    engine = HFGenerator(learner_model, tiny_tokenizer)
    sampling = Sampling(max_new_tokens=6, temperature=2.0, seed=3)
    for r in engine.generate(_prompts(), sampling):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = learner_model(input_ids=ids).logits[0, len(r.prompt_ids) - 1 : -1]
        n = len(r.response_ids)
        want = torch.log_softmax(logits / 2.0, -1).gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), want[:n], atol=1e-4, rtol=1e-4)


def test_length_stop_and_empty_prompt(learner_model, tiny_tokenizer):
    engine = HFGenerator(learner_model, tiny_tokenizer)
    cut = engine.generate([Prompt("a", "12+34=")], Sampling(max_new_tokens=1, temperature=0))[0]
    assert cut.finish_reason == "length" and cut.response_text == "4" and len(cut.logprobs) == 1
    full = engine.generate([Prompt("a", "12+34=")], GREEDY)[0]
    assert full.finish_reason == "stop" and full.response_ids == tiny_tokenizer("46")["input_ids"][1:]
    empty = engine.generate([Prompt("e", ""), Prompt("x", "7+8=")], GREEDY)
    assert empty[0].prompt_ids == [tiny_tokenizer.bos_token_id]
    assert 0 < len(empty[0].response_ids) <= 8 and len(empty[0].logprobs) == len(empty[0].response_ids)
    assert empty[1].response_text == "15"  # left padding next to a short prompt changes nothing
    assert engine.generate([], GREEDY) == []


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    engine = HFGenerator(tiny_model_dir)
    prompts = [Prompt("a", "1+1="), Prompt("b", "")]
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=11)
    first = [r.response_ids for r in engine.generate(prompts, s)]
    assert first == [r.response_ids for r in engine.generate(prompts, s)]
    other = [r.response_ids for r in engine.generate(prompts, Sampling(max_new_tokens=10, temperature=1.0, seed=12))]
    assert other != first


def test_bad_sampling_is_rejected(tiny_model_dir):
    engine = HFGenerator(tiny_model_dir)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([Prompt("a", "x")], Sampling(max_new_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([Prompt("a", "x")], Sampling(top_p=0.0))



def test_adopting_read_only_buckets_then_copying_again(tiny_model_dir, tiny_tokenizer, learner_model):
    """The zero-copy path of the Ray transport: parameters view read-only buckets (as Ray's
    object store maps them), greedy output equals the learner's, and a later copying load
    re-owns the memory first instead of writing into the read-only buckets."""
    import dataclasses
    import warnings

    engine = HFGenerator(tiny_model_dir)
    initial = [r.response_ids for r in engine.generate(_prompts(), GREEDY)]
    update = flatten_to_buckets(learner_model.named_parameters(), version=1, bucket_bytes=128 * 1024)
    frozen = []
    for bucket in update.buckets:
        array = bucket.numpy().copy()
        array.setflags(write=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-writable array: we only read it
            frozen.append(torch.from_numpy(array))
    engine.adopt_weights(dataclasses.replace(update, buckets=frozen))
    want = [r.response_ids for r in HFGenerator(learner_model, tiny_tokenizer).generate(_prompts(), GREEDY)]
    assert [r.response_ids for r in engine.generate(_prompts(), GREEDY)] == want
    param = next(engine.model.parameters())  # no copy was made: it lives inside a bucket
    assert any(b.data_ptr() <= param.data_ptr() < b.data_ptr() + b.numel() * b.element_size() for b in frozen)
    # back to the initial weights through the copying path (version 2): must not touch `frozen`
    start = flatten_to_buckets(HFGenerator(tiny_model_dir).model.named_parameters(), 2, 128 * 1024)
    before = [b.clone() for b in frozen]
    engine.load_weights(start)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert [r.response_ids for r in engine.generate(_prompts(), GREEDY)] == initial
    assert engine.policy_version == 2


def test_the_hf_engine_declares_its_optional_capabilities(tiny_model_dir):
    """The Ray rollout worker asks for optional engine capabilities with ``isinstance`` against
    the Protocols of ``rollout/base.py``: HF adopts buckets and is a torch policy; it has no
    engine process to check and its workers do not join a NCCL group themselves."""
    from correction_rl.rollout.base import (
        AdoptsWeights,
        ChecksHealth,
        Closeable,
        ReceivesBroadcast,
        TorchPolicy,
    )

    engine = HFGenerator(tiny_model_dir)
    assert isinstance(engine, AdoptsWeights) and isinstance(engine, TorchPolicy) and isinstance(engine, Closeable)
    assert not isinstance(engine, ChecksHealth) and not isinstance(engine, ReceivesBroadcast)
