"""LoRA in the vLLM engine (CPU build here): each adapter sync is a versioned ``LoRARequest``,
greedy decoding equals the learner's, and only ``lora_keep`` versions stay loaded (issue 18).

One engine of its own (LoRA is an engine start-up setting), ~60 s; ``slow``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from correction_rl.rollout.hf import HFGenerator
from correction_rl.weights.sync import InProcessSync
from test_lora_sync import GREEDY, LORA, PROMPTS, trained_lora_learner
from test_learner import PAIRS, with_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_vllm_engine(tiny_model_dir):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from correction_rl.rollout.vllm import VLLMGenerator

    engine = VLLMGenerator(tiny_model_dir, max_model_len=256, kv_cache_gb=1, seed=0, lora=LORA, lora_keep=2)
    yield engine
    engine.close()


def test_adapter_versions_in_vllm_match_the_learner_and_old_ones_unload(lora_vllm_engine, tiny_model_dir,
                                                                        tiny_tokenizer):
    engine = lora_vllm_engine
    base = HFGenerator(tiny_model_dir).generate(PROMPTS, GREEDY)
    assert [r.response_ids for r in engine.generate(PROMPTS, GREEDY)] == [r.response_ids for r in base]
    learner = trained_lora_learner(tiny_model_dir)
    sync = InProcessSync([engine], timeout_s=120, source=learner)
    pairs = with_reference(PAIRS)
    for round_ in range(3):
        if round_:
            learner.model.train()
            learner.train_step(pairs)
        sync.start(learner.version).wait()
        learner.model.eval()
        want = HFGenerator(learner.model, tiny_tokenizer).generate(PROMPTS, GREEDY)
        got = engine.generate(PROMPTS, GREEDY)
        assert [r.response_ids for r in got] == [r.response_ids for r in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-3, rtol=0)
        assert all(r.policy_version == learner.version for r in got)
    assert [r.response_ids for r in got] != [r.response_ids for r in base]  # the adapter mattered
    loaded = set(engine.llm.llm_engine.list_loras())
    assert loaded == {learner.version - 1, learner.version}  # lora_keep=2: the oldest was unloaded
    assert [v for v, _ in engine.adapters.loaded] == [learner.version - 1, learner.version]
