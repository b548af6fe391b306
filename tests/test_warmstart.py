"""Warm start: batches mask the prompt, the minimal generator, and (slow) landing in the band."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from correction_rl.models import build_model, build_tokenizer, load_model, load_tokenizer, vocab
from correction_rl.tasks import TaskError, get_task
from correction_rl.types import Prompt, Sampling, WeightUpdate
from correction_rl.warmstart import (
    SimpleHFGenerator,
    WarmStartConfig,
    _batch,
    cli,
    greedy_accuracy,
    parse_difficulty,
)


def test_batch_labels_cover_answer_and_eos_only():
    table = vocab()
    prompts = [Prompt("a", "1+1=", "addition", "2"), Prompt("b", "10+10=", "addition", "20")]
    ids, mask, labels = _batch(prompts, table)
    assert ids.tolist()[0] == [1] + [table[c] for c in "1+1="] + [table["2"], 2, 0, 0, 0]
    assert mask.tolist()[0] == [1] * 7 + [0, 0, 0]
    assert labels.tolist()[0] == [-100] * 5 + [table["2"], 2, -100, -100, -100]
    assert labels.tolist()[1] == [-100] * 7 + [table["2"], table["0"], 2]


def test_parse_difficulty():
    assert parse_difficulty(["max_digits=2", "addition.min_digits=1"]) == {
        "max_digits": 2,
        "addition.min_digits": 1,
    }
    with pytest.raises(TaskError, match="expected KNOB=INT, got 'max_digits'"):
        parse_difficulty(["max_digits"])
    with pytest.raises(TaskError, match="got 'max_digits=two'"):
        parse_difficulty(["max_digits=two"])


def test_simple_generator_greedy_is_deterministic_and_loads_weights():
    tok = build_tokenizer()
    model = build_model("tiny", seed=0).eval()
    gen = SimpleHFGenerator(model, tok)
    prompts = get_task("addition").generate(4, "eval", seed=0)
    greedy = Sampling(max_new_tokens=5, temperature=0.0)
    first = gen.generate(prompts, greedy)
    assert [r.prompt for r in first] == prompts
    for r in first:
        assert len(r.response_ids) <= 5 and 2 not in r.response_ids and 0 not in r.response_ids
        assert r.response_text == tok.decode(r.response_ids)
        assert r.finish_reason == ("length" if len(r.response_ids) == 5 else "stop")
        assert r.prompt_ids == tok(r.prompt.text)["input_ids"]
    # one batch-padded call equals per-prompt calls (left padding is handled)
    assert [gen.generate([p], greedy)[0].response_text for p in prompts[:2]] == [
        r.response_text for r in first[:2]
    ]
    sampled = Sampling(max_new_tokens=5, temperature=1.0, seed=3)
    assert gen.generate(prompts, sampled) == gen.generate(prompts, sampled)
    # adopting another model's weights through a flat bucket reproduces that model's outputs
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    layout, flat, offset = [], [], 0
    for name, p in other.named_parameters():
        layout.append((name, 0, offset, tuple(p.shape), "float32"))
        flat.append(p.detach().reshape(-1))
        offset += p.numel()
    gen.load_weights(WeightUpdate(version=4, layout=layout, buckets=[torch.cat(flat)]))
    assert gen.policy_version == 4
    expected = SimpleHFGenerator(other.eval(), tok).generate(prompts, greedy)
    assert [r.response_text for r in gen.generate(prompts, greedy)] == [r.response_text for r in expected]


@pytest.mark.slow
def test_warm_start_lands_in_the_band(tmp_path):
    """Fixed seed: training stops with held-out accuracy in [0.2, 0.6], and the saved directory
    reloads with transformers and reproduces that accuracy."""
    out = tmp_path / "policy"
    code = cli(["--task", "reverse", "--seed", "0", "--out", str(out), "--max-steps", "3000"])
    record = json.loads((out / "warmstart.json").read_text())
    assert code == 0 and record["reached"] is True
    assert 0.2 <= record["accuracy"] <= 0.6
    assert record["history"][-1] == [record["steps"], record["accuracy"]]
    cfg = WarmStartConfig(task="reverse", seed=0)
    held_out = get_task("reverse").generate(cfg.num_eval, "eval", cfg.seed)
    model, tok = load_model(out).eval(), load_tokenizer(out)
    max_new = max(len(p.answer) for p in held_out) + 2
    assert greedy_accuracy(SimpleHFGenerator(model, tok), get_task("reverse"), held_out, max_new) == pytest.approx(
        record["accuracy"]
    )
