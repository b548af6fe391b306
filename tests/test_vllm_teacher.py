"""The vLLM teacher: a frozen local engine over a stronger tiny model the project trained."""

from __future__ import annotations

import importlib.util
import json

import pytest

from correction_rl.teachers.templates import TemplateSet
from correction_rl.types import Rollout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]


@pytest.fixture(scope="module")
def vllm_teacher(reverse_teacher_dir):
    from correction_rl.teachers.vllm_teacher import VLLMTeacher

    teacher = VLLMTeacher(reverse_teacher_dir, TemplateSet("task_answer"), max_concurrency=4,
                          max_new_tokens=16, max_model_len=256, timeout_s=60.0)
    yield teacher
    teacher.close()


def held_out_rollouts(n: int) -> list[Rollout]:
    from correction_rl.tasks import get_task

    prompts = get_task("reverse").generate(n, "eval", seed=3)
    return [Rollout(p, [1], [2], p.text[4:6], policy_version=0) for p in prompts]


def test_corrects_a_batch_with_a_concurrency_limit_and_reports_metrics(vllm_teacher):
    from correction_rl.tasks import get_task

    task = get_task("reverse")
    rollouts = held_out_rollouts(12)
    out = vllm_teacher.correct(rollouts)
    assert [c.rollout for c in out] == rollouts and all(c.teacher == "vllm" for c in out)
    right = sum(c.corrected_text == task.canonical(c.rollout.prompt) for c in out)
    assert right >= 9, [(c.rollout.prompt.text, c.corrected_text, c.rejection) for c in out]
    m = vllm_teacher.metrics()
    assert m["teacher/requests"] == 12 and m["teacher/rollouts"] == 12
    assert m["teacher/accepted"] + sum(v for k, v in m.items() if k.startswith("teacher/rejected/")) == 12
    assert m["teacher/completion_tokens"] >= 12 * 3 and m["teacher/prompt_tokens"] >= 12 * 8
    assert 0 < m["teacher/latency_p50_s"] <= m["teacher/latency_p99_s"]
    assert m["teacher/corrections_per_s"] > 0


def test_per_request_timeout_aborts_and_the_engine_keeps_working(vllm_teacher):
    rollouts = held_out_rollouts(3)
    before = vllm_teacher.metrics().get("teacher/rejected/timeout", 0)
    vllm_teacher.timeout_s = 1e-6  # every request is past its deadline after one engine step
    try:
        out = vllm_teacher.correct(rollouts)
    finally:
        vllm_teacher.timeout_s = 60.0
    assert [c.rejection for c in out] == ["timeout"] * 3
    assert vllm_teacher.metrics()["teacher/rejected/timeout"] == before + 3
    again = vllm_teacher.correct(rollouts)
    assert all(c.accepted for c in again) or sum(c.accepted for c in again) >= 2


def test_a_prompt_too_long_for_the_engine_is_a_counted_rejection(vllm_teacher):
    from correction_rl.types import Prompt

    long = Rollout(Prompt("long", "rev:" + "a" * 300 + "=", "reverse"), [1], [2], "a", 0)
    [out] = vllm_teacher.correct([long])
    assert out.rejection == "prompt_too_long" and out.corrected_text is None


def test_training_run_with_a_vllm_teacher(tmp_path, reverse_policy_dir, reverse_teacher_dir):
    from correction_rl.config import config_from_dict
    from correction_rl.buffer.correction_log import read
    from correction_rl.run.inprocess import run

    cfg = config_from_dict({
        "name": "vllm-teacher", "output_dir": str(tmp_path), "mode": "inprocess", "total_steps": 3,
        "model": {"path": str(reverse_policy_dir)},
        "task": {"names": ["reverse"], "num_train": 300, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 16, "max_new_tokens": 10},
        "teacher": {"kind": "vllm", "vllm": {"model_path": str(reverse_teacher_dir), "max_model_len": 256},
                    "template": "task_answer", "max_new_tokens": 16, "max_concurrency": 16},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 8, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False},
        "metrics": {"wandb_mode": "disabled"},
    })
    result = run(cfg)
    assert result.steps == 3
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["teacher/accepted"] >= 24 and last["teacher/completion_tokens"] > 0
    pairs = list(read(result.run_dir / "corrections.jsonl"))
    assert len(pairs) >= 8 and {p.teacher for p in pairs} == {"vllm"}
