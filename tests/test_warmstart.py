"""Warm start: batches mask the prompt, knobs parse, and (slow) landing in the band."""

from __future__ import annotations

import json

import pytest

from correction_rl.models import load_model, load_tokenizer, vocab
from correction_rl.rollout.hf import HFGenerator
from correction_rl.tasks import get_task
from correction_rl.types import Prompt
from correction_rl.tools.warmstart import (
    WarmStartConfig,
    _batch,
    cli,
    greedy_accuracy,
    train,
    warm_start,
)


def test_batch_labels_cover_answer_and_eos_only():
    table = vocab()
    prompts = [Prompt("a", "1+1=", "addition", "2"), Prompt("b", "10+10=", "addition", "20")]
    ids, mask, labels = _batch(prompts, table)
    assert ids.tolist()[0] == [1] + [table[c] for c in "1+1="] + [table["2"], 2, 0, 0, 0]
    assert mask.tolist()[0] == [1] * 7 + [0, 0, 0]
    assert labels.tolist()[0] == [-100] * 5 + [table["2"], 2, -100, -100, -100]
    assert labels.tolist()[1] == [-100] * 7 + [table["2"], table["0"], 2]


def test_stopping_rules_and_saved_directory(tmp_path):
    """A few tiny steps: the target rule stops at the first check, an overshoot of the band goes
    back to the last check and checks every step, and the saved directory reloads."""
    small = dict(task="reverse", batch_size=8, num_eval=8, warmup_steps=1)
    lines: list[str] = []
    _, _, hit = train(WarmStartConfig(**small, eval_every=2, target_accuracy=0.0), log=lines.append)
    assert hit.reached and hit.steps == 2 and len(hit.history) == 1 and len(lines) == 1
    # every accuracy is above this band: step 4 overshoots, back to step 0, then step 1 overshoots
    _, _, over = train(WarmStartConfig(**small, eval_every=4, band=(-1.0, -0.5), aim=-1.0), log=lines.append)
    assert [s for s, _ in over.history] == [4, 1] and over.steps == 1 and not over.reached
    assert any("back to step 0, checking every 1 steps" in line for line in lines)
    result = warm_start(WarmStartConfig(**small, eval_every=3, max_steps=3), tmp_path / "m", log=lines.append)
    assert not result.reached and result.steps == 3  # accuracy 0 after 3 steps: below the band
    saved = json.loads((tmp_path / "m" / "warmstart.json").read_text())
    assert saved["accuracy"] == result.accuracy and saved["config"]["knobs"]["alphabet"] == 26
    model, tok = load_model(tmp_path / "m").eval(), load_tokenizer(tmp_path / "m")
    held_out = get_task("reverse").generate(8, "eval", 0)
    assert greedy_accuracy(HFGenerator(model, tok), get_task("reverse"), held_out, 9) == result.accuracy


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
    assert greedy_accuracy(HFGenerator(model, tok), get_task("reverse"), held_out, max_new) == pytest.approx(
        record["accuracy"]
    )


def test_several_tasks_train_one_policy_and_record_each_accuracy(tmp_path):
    """``--task reverse sorting``: batches interleave the tasks, each task is checked on its own
    held-out prompts, the stopping rule reads their mean, and the knobs reach the right task."""
    lines: list[str] = []
    out = tmp_path / "two"
    cfg = WarmStartConfig(task="reverse", extra_tasks=("sorting",), difficulty={"sorting.max_len": 3},
                          batch_size=8, num_eval=6, warmup_steps=1, eval_every=2, max_steps=2)
    result = warm_start(cfg, out, log=lines.append)
    assert set(result.accuracy_by_task) == {"reverse", "sorting"}
    assert result.accuracy == pytest.approx(sum(result.accuracy_by_task.values()) / 2)
    assert "(reverse " in lines[0] and ", sorting " in lines[0]
    saved = json.loads((out / "correction_rl.json").read_text())
    assert saved["tasks"] == ["reverse", "sorting"]
    knobs = json.loads((out / "warmstart.json").read_text())["config"]["knobs"]
    assert knobs["sorting"]["max_len"] == 3 and knobs["reverse"]["max_len"] == 7
    # one batch holds both tasks, alternating
    from correction_rl.tools.warmstart import _interleave
    import itertools
    mixed = list(itertools.islice(_interleave([get_task("reverse").stream("train", 0),
                                               get_task("sorting").stream("train", 0)]), 4))
    assert [p.task for p in mixed] == ["reverse", "sorting", "reverse", "sorting"]
    with pytest.raises(ValueError, match="named twice"):
        train(WarmStartConfig(task="reverse", extra_tasks=("reverse",)))
    from correction_rl.errors import UserError
    with pytest.raises(UserError, match="sortng"):
        cli(["--task", "reverse", "sortng", "--out", str(tmp_path / "bad")])
