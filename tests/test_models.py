"""Offline tiny models: deterministic, the right sizes, a tokenizer covering the tasks' alphabet,
a standard HF directory. (vLLM loading the same directory and agreeing with HF greedy decoding is
tests/test_rollout_vllm.py::test_untrained_engine_matches_hf_greedy_and_logprobs; the BPE / chat /
Qwen2 members of the family are tests/test_bpe_models.py.)"""

from __future__ import annotations

import json
import string

import pytest
import torch

from correction_rl.cli import main as cli_main
from correction_rl.models import (
    SHAPES,
    build_model,
    build_tokenizer,
    count_parameters,
    load_model,
    load_tokenizer,
    make_model,
)


def test_sizes_and_head_dim():
    counts = {size: count_parameters(build_model(size)) for size in SHAPES}
    assert counts["tiny"] < 1_000_000
    assert 20_000_000 <= counts["small"] <= 50_000_000
    assert counts["tiny"] < counts["base"] < counts["small"]
    assert all(shape.head_dim == 64 for shape in SHAPES.values())  # vLLM CPU refuses 16


def test_deterministic_for_a_seed():
    a, b, c = build_model("tiny", seed=3), build_model("tiny", seed=3), build_model("tiny", seed=4)
    for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for (_, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()))


def test_tokenizer_covers_the_task_alphabet_one_char_per_token():
    tok = build_tokenizer()
    text = string.digits + string.ascii_letters + string.punctuation + " \n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok("12+34=")["input_ids"][0] == tok.bos_token_id
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("\t", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_saved_directory_reloads_identically(tmp_path):
    path = make_model(tmp_path / "m", "tiny", seed=1)
    assert json.loads((path / "correction_rl.json").read_text()) == {"size": "tiny", "seed": 1}
    model, tok = load_model(path), load_tokenizer(path)
    original = build_model("tiny", seed=1)
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), name
    ids = tok(["37+85="], return_tensors="pt")
    a = model.generate(**ids, max_new_tokens=6, do_sample=False)
    b = original.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_make_model_cli(tmp_path, capsys):
    assert cli_main(["make-model", str(tmp_path / "cli"), "--size", "tiny", "--seed", "2"]) == 0
    assert "353,920 parameters" in capsys.readouterr().out
    assert (tmp_path / "cli" / "config.json").exists() and (tmp_path / "cli" / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge")


def test_cli_rejects_unknown_commands(capsys):
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
