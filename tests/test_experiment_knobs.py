"""The knobs the experiments of docs/results.md need, on real in-process sessions with the tiny
model: held-out tasks other than the trained ones (``eval.tasks``), offline corrections of the
starting policy (``rollout.policy: initial``), and a teacher-call budget (``teacher.max_calls``,
the cumulative ``teacher/calls`` counter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from correction_rl.buffer.correction_log import read
from correction_rl.config import ConfigError, load_config
from correction_rl.distributed.settings import check_settings
from correction_rl.observe.metrics import read_jsonl_metrics
from correction_rl.prompts.split import train_and_held_out
from correction_rl.run.inprocess import InProcessSession, run


def _config(tmp: Path, model_dir: Path, name: str = "knobs", **sections) -> Path:
    tree = {
        "name": name, "output_dir": str(tmp / "runs"), "mode": "inprocess", "seed": 0, "total_steps": 3,
        "model": {"path": str(model_dir)},
        "task": {"names": ["reverse"], "num_train": 64, "num_eval": 4},
        "rollout": {"engine": "hf", "batch_size": 4, "max_new_tokens": 8},
        "objective": {"form": "logistic", "beta": 0.5},
        "learner": {"backend": "torch", "lr": 1e-3, "micro_batch_pairs": 4},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 4, "sampled": False},
        "metrics": {"wandb_mode": "disabled", "progress": "lines", "table_every_steps": 0},
        "checkpoint": {"every_steps": 0},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_eval_tasks_hold_out_prompts_of_tasks_not_trained_on(tmp_path, tiny_model_dir):
    cfg = load_config(_config(tmp_path, tiny_model_dir, eval={"tasks": ["reverse", "sorting"]},
                              task={"difficulty": {"reverse.max_len": 5, "max_len": 4}}))
    train, held_out = train_and_held_out(cfg)
    assert {p.task for p in train} == {"reverse"}
    assert [p.task for p in held_out] == ["reverse"] * 4 + ["sorting"] * 4
    # the scoped knob reached reverse only; the plain one both tasks (sorting: at most 4 items)
    assert all(len(p.answer) <= 5 for p in held_out if p.task == "reverse")
    assert all(p.answer.count(",") <= 3 for p in held_out if p.task == "sorting")
    # a knob only the trained task has is not an error for an evaluated task without it
    cfg = load_config(_config(tmp_path, tiny_model_dir, eval={"tasks": ["sorting"]},
                              task={"difficulty": {"alphabet": 5}}))
    assert {p.task for p in train_and_held_out(cfg).held_out} == {"sorting"}
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_config(_config(tmp_path, tiny_model_dir, eval={"tasks": ["reverse", "sortng"]}))


def test_offline_policy_never_reaches_the_training_engine(tmp_path, tiny_model_dir):
    """``rollout.policy: initial``: every pair is pi_init's (version 0) and stays admissible
    however old it gets, while the evaluation engine follows the learner."""
    cfg = load_config(_config(tmp_path, tiny_model_dir, rollout={"policy": "initial"}))
    session = InProcessSession(cfg, tmp_path / "offline")
    try:
        assert session.eval_generator is not session.generator
        for _ in range(4):  # past max_staleness 1: the pairs must not be evicted as stale
            session.learn(sink=None)
            session.sync_weights()
        assert session.generator.policy_version == 0
        assert session.eval_generator.policy_version == session.version == 4
        assert session.counters["teacher/calls"] == 16
        assert sum(session.buffer.stats().evicted.values()) == 0
    finally:
        session.close()
    versions = [p.policy_version for p in read(tmp_path / "offline" / "corrections.jsonl")]
    assert len(versions) == 16 and set(versions) == {0}
    online = load_config(_config(tmp_path, tiny_model_dir, name="online"))
    session = InProcessSession(online, tmp_path / "online")
    try:
        assert session.eval_generator is session.generator
        for _ in range(2):
            session.learn(sink=None)
            session.sync_weights()
        assert session.generator.policy_version == 2
    finally:
        session.close()
    versions = [p.policy_version for p in read(tmp_path / "online" / "corrections.jsonl")]
    assert versions == [0] * 4 + [1] * 4


def test_ray_modes_refuse_the_inprocess_only_knobs(tmp_path, tiny_model_dir):
    for extra, field in (({"rollout": {"policy": "initial"}}, "rollout.policy"),
                         ({"teacher": {"max_calls": 8}}, "teacher.max_calls")):
        cfg = load_config(_config(tmp_path, tiny_model_dir, mode="async", **extra))
        with pytest.raises(ConfigError, match=field):
            check_settings(cfg)


@pytest.mark.parametrize(
    "objective",
    [
        {"form": "logistic", "noop_policy": "drop"},  # no-ops not admitted: more rounds per step
        {"form": "sft", "noop_policy": "keep"},
        {"form": "dpo", "noop_policy": "keep"},
    ],
)
def test_teacher_call_budget_stops_every_arm_at_the_same_calls(tmp_path, tiny_model_dir, objective):
    """``teacher.max_calls`` ends the run at the budget (one round of overshoot at most), not at
    ``total_steps``, and ``teacher/calls`` counts every rollout sent to the teacher."""
    path = _config(tmp_path, tiny_model_dir, total_steps=50, objective=objective,
                   teacher={"max_calls": 12}, eval={"every_steps": 1})
    result = run(load_config(path))
    rows = read_jsonl_metrics(result.run_dir / "metrics.jsonl")
    calls = [r["teacher/calls"] for r in rows if "teacher/calls" in r]
    assert calls == sorted(calls) and 12 <= calls[-1] < 12 + 4
    assert result.steps < 50
    if objective["noop_policy"] == "keep":  # every pair is one batch slot: 4 calls per step
        assert result.steps == 3 and calls == [4, 8, 12]
    evals = [r for r in rows if "eval/greedy/correction_rate" in r]
    assert len(evals) >= 2  # before, every step but the last, and after
