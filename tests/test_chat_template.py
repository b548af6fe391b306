"""Chat templates on the policy side (prompts/render.py): one rendering of a prompt into ids for
the HF and vLLM rollouts, evaluation and the teachers; every declared stop id honoured; the
pair puts back the stop token the policy actually produced.

The model is the offline family's tiny BPE + ChatML Llama, trained here on a few chat examples
(answers ending in ``<|im_end|>``, one in ``<|endoftext|>``) so greedy outputs are far from
ties and both stop tokens occur."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from _helpers import overfit

from correction_rl.config import ConfigError, load_config
from correction_rl.models import load_model, load_tokenizer, make_model
from correction_rl.models.bpe import ENDOFTEXT, IM_END, chatml
from correction_rl.pairs.make import make_pair
from correction_rl.prompts.files import PromptFileError, parse_prompt
from correction_rl.prompts.render import PromptRenderer, RenderError, conversation_text, generation_eos_of
from correction_rl.rollout.hf import HFGenerator
from correction_rl.run.evaluation import score_responses
from correction_rl.teachers.templates import BUILTIN
from correction_rl.types import Correction, Prompt, Rollout, Sampling

SYSTEM = "You answer briefly."
# (prompt, answer, the stop token the answer ends with)
EXAMPLES = [("12+34=", "46", IM_END), ("rev:abc=", "cba", IM_END), ("Say hi.", "Hi there!", IM_END),
            ("Say bye.", "Bye!", ENDOFTEXT)]
CONVERSATION = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"},
                {"role": "user", "content": "Say bye."}]


def _prompts() -> list[Prompt]:
    out = [Prompt(prompt_id=f"p{i}", text=p) for i, (p, _, _) in enumerate(EXAMPLES)]
    return out + [Prompt(prompt_id="conv", text="Say bye.", messages=CONVERSATION)]


def _train(model, tok, renderer: PromptRenderer, steps: int = 120, lr: float = 3e-3) -> None:
    """Overfit the examples as the renderer renders them (system prompt included), each answer
    followed by its stop token; the conversation prompt answers like "Say bye."."""
    targets = [(p, a, s) for p, (_, a, s) in zip(_prompts(), EXAMPLES + [EXAMPLES[-1]])]
    overfit(model, tok, [renderer.ids(p) + tok(a + s, add_special_tokens=False)["input_ids"] for p, a, s in targets],
            steps, lr)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("chat") / "model", "tiny", seed=0, tokenizer="bpe", chat=True)
    model, tok = load_model(path), load_tokenizer(path)
    _train(model, tok, PromptRenderer.build(tok, "auto", SYSTEM, generation_eos_of(path)))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_tok(chat_dir):
    return load_tokenizer(chat_dir)


# --- rendering -------------------------------------------------------------------------------


def test_auto_renders_the_tokenizers_template_with_the_system_prompt(chat_dir, chat_tok):
    r = PromptRenderer.build(chat_tok, "auto", SYSTEM, generation_eos_of(chat_dir))
    plain = Prompt(prompt_id="a", text="12+34=")
    expected = chatml([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "12+34="}])
    assert r.text(plain) == expected
    assert r.ids(plain) == chat_tok(expected, add_special_tokens=False)["input_ids"]
    assert r.ids(plain) == chat_tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "12+34="}], add_generation_prompt=True)["input_ids"]
    # a conversation is rendered whole; its own system turn wins over the configured one
    conv = Prompt(prompt_id="c", text="Say bye.", messages=[{"role": "system", "content": "Own."}, *CONVERSATION])
    assert r.text(conv) == chatml([{"role": "system", "content": "Own."}, *CONVERSATION])
    assert r.stop_ids == (2, 0) and r.eos_id == chat_tok.convert_tokens_to_ids(IM_END)


def test_none_keeps_the_plain_text_behaviour(chat_tok, tiny_tokenizer):
    prompt = Prompt(prompt_id="a", text="12+34=")
    none = PromptRenderer.build(chat_tok, "none")
    assert none.ids(prompt) == chat_tok(prompt.text)["input_ids"]
    # the character models have no template: auto is the plain text with <bos>, as always
    auto = PromptRenderer.build(tiny_tokenizer, "auto")
    assert auto.template is None and auto.ids(prompt) == tiny_tokenizer(prompt.text)["input_ids"]
    assert auto.ids(prompt)[0] == tiny_tokenizer.bos_token_id and auto.stop_ids == (tiny_tokenizer.eos_token_id,)
    with pytest.raises(RenderError, match="conversation of 3 turns but there is no chat template"):
        none.ids(Prompt(prompt_id="c", text="Say bye.", messages=CONVERSATION))
    with pytest.raises(RenderError, match="model.system_prompt is set but model.chat_template='none'"):
        PromptRenderer.build(chat_tok, "none", SYSTEM)


def test_a_template_file_is_used(tmp_path, chat_tok):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}### assistant:{% endif %}")
    r = PromptRenderer.build(chat_tok, str(path), SYSTEM)
    prompt = Prompt(prompt_id="a", text="12+34=")
    assert r.text(prompt) == f"### system: {SYSTEM}\n### user: 12+34=\n### assistant:"
    assert r.ids(prompt) == chat_tok(r.text(prompt), add_special_tokens=False)["input_ids"]
    cfg = load_config(overrides={"model": {"chat_template": str(path), "system_prompt": SYSTEM}}, check_paths=True)
    assert cfg.model.chat_template == str(path)


def test_bad_template_is_an_error_naming_the_field(tmp_path, chat_tok):
    with pytest.raises(ConfigError, match=r"model\.chat_template: no such file or directory"):
        load_config(overrides={"model": {"chat_template": str(tmp_path / "missing.jinja")}}, check_paths=True)
    with pytest.raises(RenderError, match=r"model\.chat_template: '.*missing.jinja' is neither auto, none nor a template file"):
        PromptRenderer.build(chat_tok, str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(RenderError, match=r"model\.chat_template: the template does not render"):
        PromptRenderer.build(chat_tok, str(broken))


def test_prompt_files_carry_conversations():
    prompt = parse_prompt({"prompt_id": "x", "messages": CONVERSATION}, "f.jsonl:1")
    assert prompt.messages == CONVERSATION and prompt.text == "Say bye."
    assert "messages" not in Prompt(prompt_id="y", text="t").to_json()  # old files stay the same
    with pytest.raises(PromptFileError, match="f.jsonl:2: field 'messages': messages must end with a 'user' turn"):
        parse_prompt({"messages": CONVERSATION[:2]}, "f.jsonl:2")


def test_teachers_read_the_conversation_not_a_template_string():
    rollout = Rollout(Prompt(prompt_id="c", text="Say bye.", messages=CONVERSATION), [1], [5], "Bye", 0)
    assert conversation_text(rollout.prompt) == "user: Say hi.\n\nassistant: Hi there!\n\nuser: Say bye."
    user = BUILTIN["instruct"].messages(rollout)[-1]["content"]
    assert "assistant: Hi there!" in user and "<|im_start|>" not in user
    single = Rollout(Prompt(prompt_id="s", text="12+34="), [1], [5], "46", 0)
    assert BUILTIN["task_answer"].completion_prompt(single) == "12+34=" and BUILTIN["task_answer"].answers_prompt
    assert BUILTIN["task_answer"].messages(rollout) == CONVERSATION  # x as the chat it is, turn by turn


# --- the HF rollout, the pair, evaluation ------------------------------------------------------


def test_hf_rollouts_render_and_stop_on_every_stop_id(chat_dir, chat_tok):
    gen = HFGenerator(chat_dir, system_prompt=SYSTEM)
    prompts = _prompts()
    rollouts = gen.generate(prompts, Sampling(max_new_tokens=12, temperature=0.0))
    assert [r.prompt_ids for r in rollouts] == [gen.renderer.ids(p) for p in prompts]
    answers = [a for _, a, _ in EXAMPLES] + ["Bye!"]
    stops = [chat_tok.convert_tokens_to_ids(s) for _, _, s in EXAMPLES] + [0]
    assert [r.response_text for r in rollouts] == answers
    assert [r.finish_reason for r in rollouts] == ["stop"] * len(prompts)
    assert [r.stop_id for r in rollouts] == stops and set(stops) == {0, 2}  # both stop tokens occurred
    assert all(s not in r.response_ids for r in rollouts for s in (0, 2))
    cut = gen.generate(prompts[:1], Sampling(max_new_tokens=1, temperature=0.0))[0]
    assert cut.finish_reason == "length" and cut.stop_id is None


def test_the_pair_puts_back_the_stop_the_policy_produced(chat_dir, chat_tok):
    gen = HFGenerator(chat_dir, system_prompt=SYSTEM)
    bye = gen.generate([_prompts()[3]], Sampling(max_new_tokens=12, temperature=0.0))[0]
    assert bye.stop_id == 0 and chat_tok.eos_token_id == 2
    pair = make_pair(Correction(bye, "Bye now!", "t"), chat_tok)
    assert pair.rejected_ids[-1] == 0 and pair.chosen_ids[-1] == 0  # <|endoftext|>, not the eos <|im_end|>
    noop = make_pair(Correction(bye, bye.response_text, "t"), chat_tok)
    assert noop.is_noop and noop.edit_distance == 0
    cut = gen.generate([_prompts()[2]], Sampling(max_new_tokens=2, temperature=0.0))[0]
    pair = make_pair(Correction(cut, "Hi there!", "t"), chat_tok)
    assert cut.finish_reason == "length" and pair.chosen_ids[-1] == 2  # a finished y' ends with eos


def test_evaluation_scores_the_rendered_prompt(chat_dir, chat_tok):
    gen = HFGenerator(chat_dir, system_prompt=SYSTEM)
    rollouts = gen.generate(_prompts(), Sampling(max_new_tokens=12, temperature=0.0))
    scores = score_responses(gen.model, chat_tok, rollouts, renderer=gen.renderer)
    for r, score in zip(rollouts, scores):
        full = r.prompt_ids + r.response_ids + [r.stop_id]
        with torch.no_grad():
            logp = torch.log_softmax(gen.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        n = len(r.prompt_ids)
        expected = sum(logp[n - 1 + i, t].item() for i, t in enumerate(full[n:]))
        assert score == pytest.approx(expected, abs=1e-4)
    assert min(scores) > -1.0  # trained answers, rendered as trained: confident


@pytest.mark.slow
def test_vllm_renders_and_decodes_like_hf(chat_dir, chat_tok):
    """The vLLM rollout gets the same prompt ids (it is handed ids), stops on both stop tokens,
    and its greedy rollouts equal HF's; the vLLM teacher answers the conversation rendered by
    the same renderer with its own template (``task_answer``)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from correction_rl.rollout.vllm import VLLMGenerator
    from correction_rl.teachers.templates import TemplateSet
    from correction_rl.teachers.vllm_teacher import VLLMTeacher

    prompts = _prompts()
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    hf = HFGenerator(chat_dir, system_prompt=SYSTEM).generate(prompts, greedy)
    engine = VLLMGenerator(chat_dir, max_model_len=256, kv_cache_gb=1, seed=0, system_prompt=SYSTEM)
    try:
        got = engine.generate(prompts, greedy)
    finally:
        engine.close()
    assert [r.prompt_ids for r in got] == [r.prompt_ids for r in hf]
    assert [(r.response_ids, r.stop_id, r.finish_reason) for r in got] == [
        (r.response_ids, r.stop_id, r.finish_reason) for r in hf]
    assert {r.stop_id for r in got} == {0, 2}
    teacher = VLLMTeacher(chat_dir, TemplateSet("task_answer"), max_new_tokens=12, max_model_len=256,
                          dtype="float32", system_prompt=SYSTEM)
    try:
        job = teacher._job(0, hf[0], 1)
        assert job.prompt_ids == hf[0].prompt_ids
        corrections = teacher.correct(hf)
    finally:
        teacher.close()
    assert [c.corrected_text for c in corrections] == [r.response_text for r in hf]
