"""The vLLM engine (CPU build here): rollouts, log-probs vs HF, and weights after a sync.

All tests share the session's ``vllm_engine`` (one ~40 s start-up); they are ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRAIN_EXAMPLES

from correction_rl.rollout import Generator
from correction_rl.rollout.hf import HFGenerator
from correction_rl.weights.sync import InProcessSync, StaleWeightsError, flatten_to_buckets
from correction_rl.types import Prompt, Sampling

pytestmark = pytest.mark.slow

GREEDY = Sampling(max_new_tokens=8, temperature=0.0)


def _prompts() -> list[Prompt]:
    return [Prompt(f"p{i}", text) for i, (text, _) in enumerate(TRAIN_EXAMPLES)]


def test_untrained_engine_matches_hf_greedy_and_logprobs(vllm_engine_reset, tiny_model_dir):
    """Same initial weights in both engines: same tokens, log-probs equal within float noise."""
    assert isinstance(vllm_engine_reset, Generator)
    hf = HFGenerator(tiny_model_dir)
    prompts = _prompts() + [Prompt("e", "")]
    got = vllm_engine_reset.generate(prompts, GREEDY)
    want = hf.generate(prompts, GREEDY)
    assert [r.prompt_ids for r in got] == [r.prompt_ids for r in want]
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-3, rtol=0)


def test_greedy_after_sync_equals_the_learner_in_both_engines(vllm_engine_reset, tiny_model_dir, tiny_tokenizer, learner_model):
    engine = vllm_engine_reset
    hf = HFGenerator(tiny_model_dir)
    before = [r.response_text for r in engine.generate(_prompts(), GREEDY)]

    version = engine.policy_version + 1
    update = flatten_to_buckets(learner_model.named_parameters(), version=version, bucket_bytes=128 * 1024)
    report = InProcessSync([hf, engine], timeout_s=120).publish(update)
    assert report.num_messages == len(update.buckets) + 1 and report.num_targets == 2

    learner = HFGenerator(learner_model, tiny_tokenizer)
    want = learner.generate(_prompts(), GREEDY)
    for engine_rollouts in (engine.generate(_prompts(), GREEDY), hf.generate(_prompts(), GREEDY)):
        assert [r.response_ids for r in engine_rollouts] == [r.response_ids for r in want]
        assert all(r.policy_version == version for r in engine_rollouts)
    got = engine.generate(_prompts(), GREEDY)
    assert [r.response_text for r in got] == [a for _, a in TRAIN_EXAMPLES]
    assert [r.response_text for r in got] != before
    assert all(r.finish_reason == "stop" for r in got)
    # engine-side log-probs of the two engines agree for the same weights
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-3, rtol=0)


def test_length_empty_prompt_and_seeds(vllm_engine_reset):
    vllm_engine = vllm_engine_reset  # the random initial weights: samples vary a lot
    cut = vllm_engine.generate([Prompt("a", "12+34="), Prompt("e", "")], Sampling(max_new_tokens=1, temperature=0))
    assert all(r.finish_reason == "length" and len(r.response_ids) == 1 == len(r.logprobs) for r in cut)
    assert cut[1].prompt_ids == [1]
    s = Sampling(max_new_tokens=12, temperature=1.0, seed=5)
    prompts = [Prompt("a", "1+"), Prompt("b", "1+")]
    first = vllm_engine.generate(prompts, s)
    assert [r.response_ids for r in first] == [r.response_ids for r in vllm_engine.generate(prompts, s)]
    assert first[0].response_ids != first[1].response_ids  # per-request seeds differ
    assert all(lp <= 0 for r in first for lp in r.logprobs)


def test_version_regression_is_refused(vllm_engine, learner_weights):
    stale = flatten_to_buckets(learner_weights.items(), version=vllm_engine.policy_version - 1, bucket_bytes=1 << 22)
    current = vllm_engine.policy_version
    with pytest.raises(StaleWeightsError, match=f"version {current}"):
        vllm_engine.load_weights(stale)
    assert vllm_engine.policy_version == current


def test_partial_or_renamed_update_is_refused(vllm_engine, learner_weights):
    version = vllm_engine.policy_version + 1
    partial = flatten_to_buckets(list(learner_weights.items())[:-1], version, bucket_bytes=1 << 22)
    with pytest.raises(ValueError, match="does not cover 1 parameters"):
        vllm_engine.load_weights(partial)
    renamed = flatten_to_buckets([("module." + n, t) for n, t in learner_weights.items()], version, 1 << 22)
    with pytest.raises(KeyError, match=r"'module\.\S+' does not exist in the checkpoint"):
        vllm_engine.load_weights(renamed)
    assert vllm_engine.policy_version == version - 1


def test_too_long_prompt_is_a_clear_error(vllm_engine):
    with pytest.raises(ValueError, match="'long'.*max_model_len"):
        vllm_engine.generate([Prompt("long", "x" * 300)], GREEDY)


@pytest.mark.gpu
def test_nccl_broadcast_into_vllm_matches_the_learner(tiny_model_dir, tiny_tokenizer, learner_model):
    """GPU only, 2 devices (NCCL refuses two ranks on one): the engine's workers join a NCCL
    weight group (``join_broadcast``) whose rank 0 is the learner's side (``WeightGroup``, as
    learner rank 0 holds it under ``sync.transport: collective``); the buckets arrive by broadcast
    (``receive_broadcast``) and the engine decodes like the learner."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from correction_rl.rollout.vllm import VLLMGenerator
    from correction_rl.weights.group import GroupAddress, WeightGroup, WeightLayout

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one device; needs 2 GPUs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = VLLMGenerator(tiny_model_dir, max_model_len=256, gpu_memory_utilization=0.2)
    try:
        model = learner_model.to("cuda:1")
        update = flatten_to_buckets(model.named_parameters(), version=1, bucket_bytes=128 * 1024)
        address = GroupAddress("127.0.0.1", port, 1 + engine.num_workers, "nccl", generation=1)
        with ThreadPoolExecutor(1) as pool:  # both ends must run at once
            joined = pool.submit(engine.join_broadcast, address.host, port, 1, address.world_size, 120.0)
            group = WeightGroup.join(address, 0, timeout_s=120.0, device="cuda:1")
            joined.result(timeout=120)
            received = pool.submit(engine.receive_broadcast, WeightLayout.of(update).describe(1))
            group.send(update, timeout_s=120.0)
            received.result(timeout=120)
        assert engine.policy_version == 1
        want = HFGenerator(model, tiny_tokenizer, device="cuda:1").generate(_prompts(), GREEDY)
        got = engine.generate(_prompts(), GREEDY)
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        engine.leave_broadcast()
        group.close()
    finally:
        engine.close()
