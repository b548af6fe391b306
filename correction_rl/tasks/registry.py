"""Task names -> task classes, and prompts for a ``TaskConfig``."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from correction_rl.tasks.addition import AdditionTask
from correction_rl.tasks.base import Split, Task, TaskError
from correction_rl.tasks.reverse import ReverseTask
from correction_rl.tasks.sorting import SortingTask
from correction_rl.tasks.spelling import SpellingTask
from correction_rl.types import Prompt

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task available by ``cls.name`` (usable as a class decorator)."""
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise TaskError(f"task name {cls.name!r} is already registered by {TASKS[cls.name]}")
    TASKS[cls.name] = cls
    return cls


for _cls in (AdditionTask, SortingTask, ReverseTask, SpellingTask):
    register_task(_cls)


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, **knobs: int) -> Task:
    """An instance of the task called ``name`` with the given difficulty knobs."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {task_names()}") from None
    return cls(**knobs)


def knobs_for(name: str, difficulty: dict[str, int]) -> dict[str, int]:
    """The knobs of ``difficulty`` that belong to task ``name``.

    ``TaskConfig.difficulty`` is one flat dict shared by all configured tasks; a knob may be
    written plain (``max_digits: 2``, used by every task that has it) or scoped to one task
    (``addition.max_digits: 2``). A knob no configured task knows is an error (``make_prompts``).
    """
    own = {f.name for f in dataclasses.fields(TASKS[name].Knobs)}
    out = {k: v for k, v in difficulty.items() if "." not in k and k in own}
    for key, value in difficulty.items():
        scope, dot, knob = key.partition(".")
        if dot and scope == name:
            out[knob] = value
    return out


def make_prompts(
    names: list[str], difficulty: dict[str, int], n: int, split: Split, seed: int
) -> list[Prompt]:
    """``n`` distinct prompts of ``split`` per task, tasks in the given order."""
    for name in names:
        get_task(name)  # unknown task names fail first, with the list of known ones
    own = {name: {f.name for f in dataclasses.fields(TASKS[name].Knobs)} for name in names}
    known = set().union(*own.values()) if own else set()
    for key in difficulty:
        scope, dot, knob = key.partition(".")
        if (knob not in own.get(scope, ())) if dot else (key not in known):
            raise TaskError(
                f"task.difficulty: unknown knob {key!r} for tasks {names}; known: {sorted(known)}"
                " (scope one task's knob as '<task>.<knob>')"
            )
    prompts: list[Prompt] = []
    for name in names:
        prompts.extend(get_task(name, **knobs_for(name, difficulty)).generate(n, split, seed))
    return prompts


def parse_difficulty(items: Sequence[str]) -> dict[str, int]:
    """Command-line difficulty knobs: ``["max_digits=2", "addition.min_digits=1"]`` ->
    ``{"max_digits": 2, "addition.min_digits": 1}`` (the ``TaskConfig.difficulty`` form); a bad
    item is an error naming it. Which knobs exist is checked by ``make_prompts``."""
    out: dict[str, int] = {}
    for item in items:
        key, eq, value = item.partition("=")
        try:
            if not eq or not key:
                raise ValueError
            out[key] = int(value)
        except ValueError:
            raise TaskError(f"--difficulty: expected KNOB=INT, got {item!r}") from None
    return out
