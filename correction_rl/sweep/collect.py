"""What a finished run directory says, reduced to a sweep row: eval before/after, the eval
history with the teacher calls made by each evaluation, and the total teacher calls.

Teacher calls are the rollouts sent to the teacher. No driver logs that count under one name
today, so ``teacher_calls`` takes the first of these a metrics row has (all cumulative):

1. ``teacher/calls``: an explicit counter, if the run logs one;
2. ``teacher/rollouts``: rollouts an LLM teacher handled (``teachers/metrics.py``);
3. the Ray drivers: the sum of ``teacher/worker<i>/pairs`` plus every ``teacher/skipped/<reason>``;
4. the in-process loop: ``buffer/added`` plus every ``teacher/skipped/<reason>``.

A resumed run continues the same counters, so the count covers the whole run.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from correction_rl.observe.metrics import load_jsonl_metrics
from correction_rl.sweep.results import EvalPoint

MODES = ("greedy", "sampled")
EVAL_METRICS = ("correction_rate", "mean_normalized_edit_distance", "mean_edit_distance",
                "accuracy", "exact_match", "kl")
"""Per decoding mode, what a row keeps from each evaluation (``kl`` only exists for sampled)."""


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def eval_summary(report: dict[str, Any] | None) -> dict[str, float | None]:
    """``eval_*.json`` -> ``{"greedy/correction_rate": 0.4, "greedy/reverse/accuracy": 0.7, ...}``:
    each mode overall, then per task (``by_task``) when the run evaluated several."""
    out: dict[str, float | None] = {}
    report = report or {}
    for mode, metrics in (report.get("modes") or {}).items():
        if mode in MODES and isinstance(metrics, dict):
            out.update(_pick(metrics, f"{mode}/"))
    for mode, tasks in (report.get("by_task") or {}).items():
        if mode in MODES and isinstance(tasks, dict) and len(tasks) > 1:
            for task, metrics in tasks.items():
                if isinstance(metrics, dict):
                    out.update(_pick(metrics, f"{mode}/{task}/"))
    return out


def _pick(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{key}": v for key in EVAL_METRICS if (v := _finite(metrics.get(key))) is not None}


def teacher_calls(row: dict[str, Any]) -> float | None:
    """The cumulative teacher calls one metrics row implies (module docstring), or None."""
    for key in ("teacher/calls", "teacher/rollouts"):
        if _finite(row.get(key)) is not None:
            return float(row[key])
    skipped = sum(v for k, v in row.items() if k.startswith("teacher/skipped/") and _finite(v) is not None)
    workers = [v for k, v in row.items() if k.startswith("teacher/worker") and k.endswith("/pairs")
               and _finite(v) is not None]
    if workers:
        return float(sum(workers) + skipped)
    if _finite(row.get("buffer/added")) is not None:
        return float(row["buffer/added"] + skipped)
    return None


def eval_history(rows: list[dict[str, Any]]) -> list[EvalPoint]:
    """Every row holding held-out metrics, with the teacher calls made up to it (carried forward
    from the last row that had them; 0 before the first)."""
    calls: float | None = 0.0
    out = []
    for row in rows:
        now = teacher_calls(row)
        if now is not None:
            calls = now
        metrics = {k[len("eval/"):]: v for k, raw in row.items() if k.startswith("eval/")
                   and k.rsplit("/", 1)[-1] in EVAL_METRICS and k.split("/")[1] in MODES
                   and (v := _finite(raw)) is not None}
        if len({k.split("/")[1] for k in metrics if k.count("/") == 2}) < 2:  # one task: its totals suffice
            metrics = {k: v for k, v in metrics.items() if k.count("/") == 1}
        if metrics:
            out.append(EvalPoint(step=int(row.get("step") or 0), teacher_calls=calls, metrics=metrics))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def collect(run_dir: str | Path) -> dict[str, Any]:
    """``before``, ``after``, ``history`` and ``teacher_calls`` of a run directory (each empty /
    None when its file is missing: a failed run is still recorded with what it left)."""
    run_dir = Path(run_dir)
    rows: list[dict[str, Any]] = []
    if (run_dir / "metrics.jsonl").exists():
        with warnings.catch_warnings():  # a torn last line: skipped, as the run report does
            warnings.simplefilter("ignore")
            rows = load_jsonl_metrics(run_dir / "metrics.jsonl").records
    total = None
    for row in rows:
        total = teacher_calls(row) if teacher_calls(row) is not None else total
    return {
        "before": eval_summary(_read_json(run_dir / "eval_before.json")),
        "after": eval_summary(_read_json(run_dir / "eval_after.json")),
        "history": eval_history(rows),
        "teacher_calls": total,
    }
