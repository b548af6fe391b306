"""Verifiable tasks: seeded prompts, checkers and oracle correctors (docs/tasks.md)."""

from correction_rl.tasks.base import SPLITS, Split, Task, TaskError
from correction_rl.tasks.registry import (
    TASKS,
    get_task,
    make_prompts,
    parse_difficulty,
    register_task,
    task_names,
)

__all__ = [
    "SPLITS",
    "Split",
    "TASKS",
    "Task",
    "TaskError",
    "get_task",
    "make_prompts",
    "parse_difficulty",
    "register_task",
    "task_names",
]
