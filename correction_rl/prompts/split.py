"""The prompts of a run: its training prompts and its held-out prompts, from one ``RunConfig``.

One function for both drivers (in-process and Ray), so every mode trains and evaluates on the
same prompts. Held-out prompts come from the tasks' disjoint ``eval`` split (a prompts file has
no split of its own, and evaluating on training prompts would measure memorisation), or, for a
``task.dataset``, from the dataset's own seeded split (``prompts/datasets.py``).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from correction_rl.config import RunConfig
from correction_rl.types import Prompt


class RunPrompts(NamedTuple):
    train: Sequence[Prompt]
    """What the rollout stream draws from: ``task.prompts_file`` if set, else ``task.num_train``
    generated prompts per task (lists); for ``task.dataset``, ``indexed.DatasetPrompts`` (row
    numbers of the training rows, each prompt read when drawn: a large set is never in memory)."""
    held_out: list[Prompt]
    """What evaluation measures: ``min(task.num_eval, eval.num_prompts)`` per task of
    ``eval.tasks`` (default: ``task.names``), ``eval`` split."""


def train_and_held_out(cfg: RunConfig) -> RunPrompts:
    """``RunPrompts`` of ``cfg`` (unpacks as ``train, held_out = train_and_held_out(cfg)``)."""
    from correction_rl.prompts.files import read_prompt_file
    from correction_rl.tasks.registry import make_prompts

    task = cfg.task
    if task.dataset:  # a dataset's own seeded split: training rows and held-out rows
        from correction_rl.prompts.indexed import dataset_run_prompts

        return RunPrompts(*dataset_run_prompts(cfg))
    per_task = min(task.num_eval, cfg.eval.num_prompts)
    if cfg.eval.tasks:  # other tasks too: what training on one does to another
        held_out = make_prompts(cfg.eval.tasks, _knobs_for(cfg.eval.tasks, task.difficulty), per_task,
                                "eval", cfg.seed)
    else:
        held_out = make_prompts(task.names, task.difficulty, per_task, "eval", cfg.seed)
    if task.prompts_file:
        return RunPrompts(read_prompt_file(task.prompts_file), held_out)
    return RunPrompts(make_prompts(task.names, task.difficulty, task.num_train, "train", cfg.seed), held_out)


def _knobs_for(names: list[str], difficulty: dict[str, int]) -> dict[str, int]:
    """``task.difficulty`` restricted to what the tasks in ``names`` accept: a plain knob only
    a trained-but-not-evaluated task has, or a knob scoped to such a task, would otherwise be
    refused as unknown (the training prompts already checked every knob)."""
    import dataclasses

    from correction_rl.tasks.registry import TASKS

    own = {n: {f.name for f in dataclasses.fields(TASKS[n].Knobs)} for n in names if n in TASKS}
    out = {}
    for key, value in difficulty.items():
        scope, dot, knob = key.partition(".")
        if (knob in own.get(scope, ())) if dot else any(key in k for k in own.values()):
            out[key] = value
    return out
