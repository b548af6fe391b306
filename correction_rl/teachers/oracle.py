"""The oracle teacher: a program that knows each task's answer returns the minimal correction.

It is the first ``Teacher`` implementation and the reference the LLM and HTTP teachers are
measured against: it never fails on a rollout of a known task, so corrections differ from the
response exactly where the response is wrong (``Task.minimal_correction``).

``correction="reference"`` (``teacher.oracle_correction``) returns the task's reference answer
instead, whatever y was: the *full rewrite* a minimal correction is compared against in the
regularization experiment (docs/results.md, experiment 2). It is what SFT on gold (with
``objective.form: sft``) and preference pairs (gold, y) (with ``dpo``) train on.
"""

from __future__ import annotations

import time
from typing import Literal, Sequence

from correction_rl.tasks import Task, TaskError, get_task
from correction_rl.types import Correction, Rollout


class OracleTeacher:
    """``correct(rollouts)`` with the task registry, by ``rollout.prompt.task``.

    A rollout whose task is unknown (or whose prompt the task cannot parse and carries no
    answer) is a configuration error, not a bad sample, so it raises ``TaskError`` naming the
    prompt instead of being counted as a rejection. A response cut at the token limit
    (``finish_reason == "length"``) is corrected like any other: the oracle deletes the excess.
    """

    def __init__(self, name: str = "oracle", correction: Literal["minimal", "reference"] = "minimal") -> None:
        if correction not in ("minimal", "reference"):
            raise ValueError(f"teacher.oracle_correction must be 'minimal' or 'reference', got {correction!r}")
        self.name = name
        self.correction = correction
        self._tasks: dict[str, Task] = {}

    def _task(self, rollout: Rollout) -> Task:
        name = rollout.prompt.task
        if name not in self._tasks:
            try:
                self._tasks[name] = get_task(name)
            except TaskError as exc:
                raise TaskError(
                    f"oracle teacher: prompt {rollout.prompt.prompt_id!r}: {exc}"
                ) from None
        return self._tasks[name]

    def correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        out = []
        for rollout in rollouts:
            start = time.perf_counter()
            task = self._task(rollout)
            if self.correction == "reference":
                fixed = task.canonical(rollout.prompt)
            else:
                fixed = task.minimal_correction(rollout.prompt, rollout.response_text)
            out.append(
                Correction(
                    rollout=rollout,
                    corrected_text=fixed,
                    teacher=self.name,
                    latency_s=time.perf_counter() - start,
                )
            )
        return out
