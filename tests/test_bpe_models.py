"""The realistic offline family (correction_rl/models/bpe.py, family.py): a byte-level BPE
tokenizer with a ChatML template, Llama and Qwen2 models, saved as HF directories that
``transformers`` and vLLM load offline and decode identically (greedy)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from _helpers import overfit

from correction_rl.cli import main as cli_main
from correction_rl.models import build_family_tokenizer, build_model, load_model, load_tokenizer, make_model, stop_ids
from correction_rl.models.bpe import ENDOFTEXT, IM_END, IM_START, PAD, chatml, train_core

TEXTS = [
    "12+34=46",
    "sort:60,63,91=60,63,91",
    "rev:sgcrknu=unkrcgs",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  \n\nand\ttabs\r\n",
    "naïve café — 漢字 🙂 ünïcödé",
    "<|not a special token|> <|im_start",
    "",
]

# Chat prompts the trained tiny model must answer confidently (greedy far from ties), and the
# stop token each answer ends with: mostly <|im_end|> (the tokenizer's eos), one <|endoftext|>
# (a stop id only the generation config declares, which vLLM must honour as HF does).
CHAT_EXAMPLES = [("12+34=", "46", IM_END), ("7+8=", "15", IM_END), ("rev:abc=", "cba", IM_END),
                 ("Say hi.", "Hi there!", IM_END), ("Say bye.", "Bye!", ENDOFTEXT)]


@pytest.fixture(scope="module")
def chat_tok():
    return build_family_tokenizer("bpe", chat=True)


def test_bpe_round_trips_any_text(chat_tok):
    for text in TEXTS:
        ids = chat_tok(text, add_special_tokens=False)["input_ids"]
        assert chat_tok.decode(ids) == text, text
        assert all(0 <= i < len(chat_tok) for i in ids)
    assert chat_tok("12+34=")["input_ids"] == chat_tok("12+34=", add_special_tokens=False)["input_ids"]  # no BOS
    digits = chat_tok("1234567890", add_special_tokens=False)["input_ids"]
    assert len(digits) == 10  # one token per digit: numbers never merge
    words = chat_tok("You are a helpful assistant.", add_special_tokens=False)["input_ids"]
    assert len(words) <= 10  # English merges were learned (28 bytes)


def test_bpe_training_is_deterministic():
    assert train_core(512).to_str() == train_core(512).to_str()


def test_special_ids_and_stop_ids(chat_tok):
    ids = {t: chat_tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END, PAD)}
    assert ids == {ENDOFTEXT: 0, IM_START: 1, IM_END: 2, PAD: 3}
    assert (chat_tok.eos_token, chat_tok.pad_token, chat_tok.bos_token) == (IM_END, PAD, None)
    assert stop_ids(chat_tok) == [2, 0]
    base = build_family_tokenizer("bpe", chat=False)
    assert base.eos_token == ENDOFTEXT and base.chat_template is None and stop_ids(base) == [0]
    assert base.get_vocab() == chat_tok.get_vocab()  # base and chat models share ids


def test_chat_template_renders_manual_chatml_ids(chat_tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "12+34="},
                {"role": "assistant", "content": "46"},
                {"role": "user", "content": "Now 7+8=?"}]
    manual = chatml(messages)
    assert manual.endswith("<|im_start|>user\nNow 7+8=?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == manual
    rendered = chat_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert rendered == chat_tok(manual, add_special_tokens=False)["input_ids"]
    assert rendered.count(1) == 5 and rendered.count(2) == 4  # each turn marker is one special id
    without = chat_tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == chatml(messages, add_generation_prompt=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_directory_loads_with_auto_classes(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = make_model(tmp_path / arch, "tiny", seed=1, tokenizer="bpe", chat=True, arch=arch)
    record = json.loads((path / "correction_rl.json").read_text())
    assert record == {"size": "tiny", "seed": 1, "tokenizer": "bpe", "chat": True, "arch": arch, "vocab_size": 1024}
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch and model.config.vocab_size == len(tok) == 1024
    assert GenerationConfig.from_pretrained(path).eos_token_id == [2, 0]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False) == chatml(
        [{"role": "user", "content": "hi"}])
    original = build_model("tiny", seed=1, tokenizer=tok, arch=arch)
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        assert torch.equal(p, q), name
    ids = tok.apply_chat_template([{"role": "user", "content": "12+34="}], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 5


def test_make_model_cli_bpe_chat(tmp_path, capsys):
    assert cli_main(["make-model", str(tmp_path / "m"), "--tokenizer", "bpe", "--chat", "--arch", "qwen2"]) == 0
    assert "wrote tiny qwen2 bpe chat model (591,232 parameters)" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "m").chat_template is not None
    with pytest.raises(SystemExit):
        cli_main(["make-model", str(tmp_path / "x"), "--chat"])  # the char tokenizer has no turns
    assert "--chat and --vocab-size need --tokenizer bpe" in capsys.readouterr().err


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"]


def train_chat(model, tok, steps: int = 100, lr: float = 3e-3) -> None:
    """Overfit ``CHAT_EXAMPLES`` rendered with the template, each answer ending in its stop
    token, so greedy outputs are far from ties."""
    overfit(model, tok, [chat_ids(tok, p) + tok(a + stop, add_special_tokens=False)["input_ids"]
                         for p, a, stop in CHAT_EXAMPLES], steps, lr)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New tokens of HF greedy decoding, up to and including the first stop id."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained_chat_dir(request, tmp_path_factory):
    """A tiny BPE chat model of each architecture, trained on ``CHAT_EXAMPLES`` and saved."""
    path = make_model(tmp_path_factory.mktemp(f"bpe_{request.param}") / "model", "tiny", seed=0,
                      tokenizer="bpe", chat=True, arch=request.param)
    model, tok = load_model(path), load_tokenizer(path)
    train_chat(model, tok)
    model.save_pretrained(path)
    return path


def test_trained_hf_model_answers_and_stops_on_every_stop_id(trained_chat_dir):
    model, tok = load_model(trained_chat_dir), load_tokenizer(trained_chat_dir)
    for prompt, answer, stop in CHAT_EXAMPLES:
        new = hf_greedy(model, chat_ids(tok, prompt), 12)
        assert new[-1] == tok.convert_tokens_to_ids(stop), (prompt, tok.decode(new))
        assert tok.decode(new, skip_special_tokens=True) == answer


@pytest.mark.slow
def test_vllm_greedy_equals_hf(trained_chat_dir):
    """vLLM (CPU build) loads the same directory; its greedy tokens equal HF's, including the
    stops on <|im_end|> (eos) and on <|endoftext|> (declared by the generation config only), and
    the project's generator tokenizes a rendered chat prompt to the template's ids."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from correction_rl.rollout.vllm import VLLMGenerator
    from correction_rl.types import Prompt, Sampling

    model, tok = load_model(trained_chat_dir), load_tokenizer(trained_chat_dir)
    prompts = [p for p, _, _ in CHAT_EXAMPLES] + ["rev:hello="]  # untrained prompts can near-tie
    prompt_ids = [chat_ids(tok, p) for p in prompts]
    expected = [hf_greedy(model, ids, 12) for ids in prompt_ids]
    # the prompts below are already rendered ChatML text: ``none`` tokenizes them as they are
    # (``auto`` would wrap them in the template again; tests/test_chat_template.py covers ``auto``)
    engine = VLLMGenerator(trained_chat_dir, max_model_len=256, kv_cache_gb=1, seed=0, chat_template="none")
    try:
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                                   SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        assert got == expected
        for (prompt, _, _), out in zip(CHAT_EXAMPLES, outs):
            assert out.outputs[0].finish_reason == "stop", prompt
        assert got[len(CHAT_EXAMPLES) - 1][-1] == tok.convert_tokens_to_ids(ENDOFTEXT)
        rollouts = engine.generate([Prompt(prompt_id=f"p{i}", text=chatml([{"role": "user", "content": p}]))
                                    for i, p in enumerate(prompts)], Sampling(max_new_tokens=12, temperature=0.0))
        assert [r.prompt_ids for r in rollouts] == prompt_ids
        # the generator cuts at every declared stop id and records which one it met
        assert [r.response_text for r in rollouts[:5]] == [a for _, a, _ in CHAT_EXAMPLES]
        assert [r.stop_id for r in rollouts[:5]] == [tok.convert_tokens_to_ids(s) for _, _, s in CHAT_EXAMPLES]
    finally:
        engine.close()
