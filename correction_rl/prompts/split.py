"""The prompts of a run: its training prompts and its held-out prompts, from one ``RunConfig``.

One function for both drivers (in-process and Ray), so every mode trains and evaluates on the
same prompts. Held-out prompts always come from the tasks' disjoint ``eval`` split (a prompts
file has no split of its own, and evaluating on training prompts would measure memorisation).
"""

from __future__ import annotations

from typing import NamedTuple

from correction_rl.config import RunConfig
from correction_rl.types import Prompt


class RunPrompts(NamedTuple):
    train: list[Prompt]
    """What the rollout stream draws from: ``task.prompts_file`` if set, else ``task.num_train``
    generated prompts per task."""
    held_out: list[Prompt]
    """What evaluation measures: ``min(task.num_eval, eval.num_prompts)`` per task, ``eval`` split."""


def train_and_held_out(cfg: RunConfig) -> RunPrompts:
    """``RunPrompts`` of ``cfg`` (unpacks as ``train, held_out = train_and_held_out(cfg)``)."""
    from correction_rl.prompts.files import read_prompt_file
    from correction_rl.tasks.registry import make_prompts

    task = cfg.task
    per_task = min(task.num_eval, cfg.eval.num_prompts)
    held_out = make_prompts(task.names, task.difficulty, per_task, "eval", cfg.seed)
    if task.prompts_file:
        return RunPrompts(read_prompt_file(task.prompts_file), held_out)
    return RunPrompts(make_prompts(task.names, task.difficulty, task.num_train, "train", cfg.seed), held_out)
