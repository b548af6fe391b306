"""The free-form ``spelling`` task, the ``over_edit`` validation rule, and (slow) a training run
whose corrections come from a vLLM teacher on that task (docs/models.md, "A free-form task")."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from correction_rl.edits import normalized_edit_distance
from correction_rl.tasks import TaskError, get_task
from correction_rl.tasks.spelling import PREFIX, inject_typos, sentences
from correction_rl.teachers.templates import BUILTIN
from correction_rl.teachers.validation import ValidationRules, validate
from correction_rl.types import Prompt, Rollout

# -- the task ------------------------------------------------------------------------------------


def test_prompts_are_misspelt_sample_sentences_with_their_clean_answer():
    task = get_task("spelling")
    prompts = task.generate(100, "train", seed=0)
    assert len({p.text for p in prompts}) == 100
    for p in prompts:
        assert p.text.startswith(PREFIX) and p.answer in sentences() and p.meta["split"] == "train"
        typoed = p.text[len(PREFIX):]
        assert typoed != p.answer
        # at most 2 typos (default), each one a change of at most 2 characters
        assert 0 < normalized_edit_distance(typoed, p.answer) * max(len(typoed), len(p.answer)) <= 4
        assert task.solve(p.text) == p.answer and task.check(p, p.answer)
        assert not task.check(p, typoed) and not task.check(p, p.answer + " ")


def test_generation_is_deterministic_by_seed_and_the_splits_are_disjoint():
    task = get_task("spelling")
    a, b, c = (task.generate(60, "train", seed=s) for s in (0, 0, 1))
    assert [p.text for p in a] == [p.text for p in b] and [p.text for p in a] != [p.text for p in c]
    held = task.generate(60, "eval", seed=0)
    assert {p.text for p in held}.isdisjoint({p.text for q in (a, c) for p in q})
    assert all(task.split_of(p.text) == "eval" for p in held)


def test_typos_are_the_four_kinds_inside_words_and_the_knobs_bound_them():
    rng = random.Random(0)
    for _ in range(500):
        clean = rng.choice(sentences())
        typoed = inject_typos(clean, 1, rng)
        assert typoed != clean and abs(len(typoed) - len(clean)) <= 1
        assert [c for c in typoed if not c.isalpha()] == [c for c in clean if not c.isalpha()]
    task = get_task("spelling", min_typos=3, max_typos=3, max_chars=60)
    for p in task.generate(30, "train", seed=2):
        assert len(p.answer) <= 60 and normalized_edit_distance(p.text[len(PREFIX):], p.answer) > 0
    with pytest.raises(TaskError, match="min_typos <= max_typos"):
        get_task("spelling", min_typos=3, max_typos=2)
    with pytest.raises(TaskError, match="max_chars=10 leaves no sentence"):
        get_task("spelling", max_chars=10)
    with pytest.raises(TaskError, match="unknown difficulty knob"):
        get_task("spelling", typos=2)


def test_any_text_is_a_response_and_the_oracle_gives_the_clean_sentence():
    task = get_task("spelling")
    p = task.generate(1, "eval", seed=0)[0]
    for response in ("", "zzz", p.text, p.answer.upper(), "x" * 500):
        assert not task.check(p, response)
        assert task.minimal_correction(p, response) == p.answer
    assert task.minimal_correction(p, p.answer) == p.answer
    with pytest.raises(TaskError, match="not a spelling prompt"):
        task.solve("rev:abc=")
    with pytest.raises(TaskError, match="not a misspelling"):
        task.solve(PREFIX + "Something entirely different that the sample never says.")
    # a prompt that carries its own answer needs no sample sentence
    own = Prompt("own", PREFIX + "Helo world.", "spelling", answer="Hello world.")
    assert task.check(own, "Hello world.") and task.minimal_correction(own, "Helo world.") == "Hello world."


# -- the over-edit rule --------------------------------------------------------------------------


def _rollout(y: str) -> Rollout:
    return Rollout(Prompt("p", PREFIX + "The cat sat on teh mat.", "spelling"), [1], [2], y, policy_version=0)


def test_over_edit_refuses_rewrites_and_keeps_minimal_corrections():
    rules = ValidationRules(max_edit_ratio=0.3)
    y = "The cat sat on teh mat."
    ok = validate("<corrected>The cat sat on the mat.</corrected>", _rollout(y), BUILTIN["instruct"], rules)
    assert ok.accepted and ok.text == "The cat sat on the mat."
    noop = validate(f"<corrected>{y}</corrected>", _rollout(y), BUILTIN["instruct"], rules)
    assert noop.accepted
    rewrite = validate("<corrected>A dog lay under a warm rug.</corrected>", _rollout(y), BUILTIN["instruct"], rules)
    assert rewrite.reason == "over_edit" and rewrite.text is None
    # the bound is on the normalized character distance: exactly at the bound passes
    y2 = "abcdefghij"
    at = validate("abcdefgXYZ", _rollout(y2), BUILTIN["task_answer"], rules)
    over = validate("abcdefWXYZ", _rollout(y2), BUILTIN["task_answer"], rules)
    assert at.accepted and over.reason == "over_edit"
    # off by default: the same rewrite passes, so existing runs are unchanged
    assert validate("<corrected>A dog lay under a warm rug.</corrected>", _rollout(y), BUILTIN["instruct"],
                    ValidationRules()).accepted
    with pytest.raises(ValueError, match="max_edit_ratio"):
        ValidationRules(max_edit_ratio=0.0)


def test_max_edit_ratio_is_a_teacher_config_field():
    from correction_rl.config import config_from_dict
    from correction_rl.config.loading import ConfigError

    assert config_from_dict({}).teacher.max_edit_ratio is None
    assert config_from_dict({"teacher": {"max_edit_ratio": 0.25}}).teacher.max_edit_ratio == 0.25
    with pytest.raises(ConfigError, match="teacher.max_edit_ratio"):
        config_from_dict({"teacher": {"max_edit_ratio": 2}})


# -- the teacher's training examples (tools/freeform.py) ------------------------------------------


def test_teacher_examples_cover_each_kind_of_answer_and_always_target_the_clean_sentence():
    from correction_rl.tools.freeform import DEFAULT_TEMPLATE_FILE, TEMPLATE_NAME, Y_KINDS, FreeformModels, teacher_pairs
    from correction_rl.teachers.templates import load_template_file

    cfg = FreeformModels(y_mix=(0.0, 1, 1, 1, 1, 1, 1))
    examples = teacher_pairs(300, 0, cfg, policy_dir=None, split="eval")
    assert examples == teacher_pairs(300, 0, cfg, policy_dir=None, split="eval")  # deterministic by seed
    assert {e.kind for e in examples} == set(Y_KINDS) - {"policy"}
    for e in examples:
        x, y = e.rollout.prompt, e.rollout.response_text
        assert x.meta["split"] == "eval" and e.target == x.answer
        if e.kind == "clean":
            assert y == e.target
        elif e.kind == "copy":
            assert y == x.text[len(PREFIX):] != e.target
        elif e.kind == "typos":
            assert y != e.target and normalized_edit_distance(y, e.target) < 0.3
        elif e.kind == "other":
            assert y in sentences() and y != e.target
        elif e.kind == "cut":
            assert e.target.startswith(y + " ")
        else:
            assert len(y) > len(e.target) and y.replace(" ", "") != e.target.replace(" ", "")
    # the request shows the teacher the prompt x and the answer y: a clean but different answer
    # is not "already correct" to it (the counter-example spelling_fix showed only y)
    template = load_template_file(DEFAULT_TEMPLATE_FILE)[TEMPLATE_NAME]
    other = next(e for e in examples if e.kind == "other")
    user = template.messages(other.rollout)[-1]["content"]
    assert other.rollout.prompt.text in user and other.rollout.response_text in user


# -- end to end: a vLLM teacher corrects a BPE chat policy on the spelling task -------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_training_run_with_a_vllm_teacher_on_the_free_form_task(tmp_path):
    """Tiny teacher and policy built here (``tools/freeform.py``, ~25 s), then 3 steps of the
    in-process loop whose only teacher is vLLM: every logged pair is a vLLM correction that
    passes validation with the over-edit bound, and held-out metrics come from the teacher."""
    from correction_rl.buffer.correction_log import read
    from correction_rl.config import config_from_dict
    from correction_rl.models import load_tokenizer
    from correction_rl.run.inprocess import run
    from correction_rl.teachers.templates import load_template_file
    from correction_rl.tools.freeform import DEFAULT_TEMPLATE_FILE, TEMPLATE_NAME, FreeformModels, make_models

    models = tmp_path / "models"
    record = make_models(models, FreeformModels(teacher_size="tiny", teacher_steps=200, policy_steps=80,
                                                num_examples=1500, num_eval=20), log=lambda *_: None)
    assert record["teacher"]["held_out"]["n"] == 20
    cfg = config_from_dict({
        "name": "freeform", "output_dir": str(tmp_path / "runs"), "mode": "inprocess", "total_steps": 3,
        "model": {"path": str(models / "policy"), "max_seq_len": 128},
        "task": {"names": ["spelling"], "num_train": 200, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 16, "max_new_tokens": 40},
        "teacher": {"kind": "vllm", "vllm": {"model_path": str(models / "teacher"), "max_model_len": 256},
                    "template_file": str(DEFAULT_TEMPLATE_FILE), "templates_by_task": {"spelling": TEMPLATE_NAME},
                    "max_new_tokens": 48, "max_concurrency": 16, "max_edit_ratio": 0.5},
        "objective": {"form": "logistic", "beta": 0.5, "anchor_weight": 1.0, "noop_policy": "drop"},
        "learner": {"backend": "torch", "lr": 5e-4, "micro_batch_pairs": 16},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False, "teacher": "run"},
        "metrics": {"wandb_mode": "disabled"},
    })
    result = run(cfg)
    assert result.steps == 3
    after = result.after.modes["greedy"]
    assert after.num_prompts == 8 and after.accuracy is not None and after.rejection_rate < 1
    assert after.mean_normalized_edit_distance is not None
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["teacher/accepted"] >= 4 and last["teacher/completion_tokens"] > 0
    # the saved policy is a whole HF directory: its tokenizer and chat template came along
    assert load_tokenizer(result.run_dir / "policy").chat_template == load_tokenizer(models / "policy").chat_template
    pairs = list(read(result.run_dir / "corrections.jsonl"))
    assert len(pairs) >= 4 and {p.teacher for p in pairs} == {"vllm"}
    tok = load_tokenizer(models / "policy")
    template = load_template_file(DEFAULT_TEMPLATE_FILE)[TEMPLATE_NAME]
    rules = ValidationRules(max_edit_ratio=0.5)
    for p in pairs:
        y = tok.decode(p.rejected_ids, skip_special_tokens=True)
        fixed = tok.decode(p.chosen_ids, skip_special_tokens=True)
        prompt = Prompt(p.prompt_id, PREFIX + "x", "spelling")
        assert validate(fixed, Rollout(prompt, [], [], y, 0), template, rules).text == fixed
        assert normalized_edit_distance(y, fixed) <= 0.5


def test_the_demo_refuses_a_free_form_config_whose_models_it_cannot_make_together(tmp_path):
    """``make demo CONFIG=configs/freeform_demo.yaml`` makes the policy and the teacher into one
    directory (the teacher is trained on samples of that policy): a config that puts them apart
    is refused before anything is trained."""
    from correction_rl.errors import UserError
    from correction_rl.tools.demo import _make_freeform_models

    with pytest.raises(UserError, match="teacher.vllm.model_path"):
        _make_freeform_models(tmp_path / "a" / "policy", tmp_path / "b" / "teacher")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
