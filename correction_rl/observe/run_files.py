"""Reading a run directory back for ``correction-rl report``: the files a run leaves behind
(docs/run_directory.md), and the series the report derives from them.

Only ``metrics.jsonl`` is required. Everything else is optional, and what is missing or cannot
be read is recorded in ``RunData.notes`` (shown on the page) rather than failing the report: a
report is most wanted for the run that went wrong. That includes ``metrics.jsonl`` lines that
are not JSON records (a torn write from a run killed mid-line, on a file from before the sink
repaired its tail): they are skipped and counted (``skipped_metric_lines``), not fatal.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from correction_rl.types import CorrectionPair

Series = tuple[list[float], list[float]]


@dataclass
class RunData:
    """Everything the report reads from a run directory (missing optional files are noted)."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    eval_before: dict[str, Any] | None = None
    eval_after: dict[str, Any] | None = None
    pairs: list[CorrectionPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What was missing or unreadable, shown on the page."""
    skipped_metric_lines: list[int] = field(default_factory=list)
    """Lines of ``metrics.jsonl`` that were not a JSON record (e.g. a torn write), skipped."""

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.run_dir.name)


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        notes.append(f"{path.name} not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"{path.name}: not valid JSON ({exc})")
        return None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory. ``metrics.jsonl`` is required (raises ``FileNotFoundError`` naming
    it); the other files are optional and their absence is recorded in ``notes``."""
    from correction_rl.buffer.correction_log import read as read_log
    from correction_rl.observe.metrics import load_jsonl_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{metrics_path}: no metrics.jsonl, so not a run directory (docs/run_directory.md)")
    with warnings.catch_warnings(record=True) as caught:  # a partial last line: noted, skipped
        warnings.simplefilter("always")
        metrics = load_jsonl_metrics(metrics_path)
    data = RunData(run_dir=run_dir, metrics=metrics.records, skipped_metric_lines=metrics.bad_lines,
                   notes=[f"metrics.jsonl: {w.message}" for w in caught])
    if metrics.bad_lines:
        shown = ", ".join(map(str, metrics.bad_lines[:10])) + (" ..." if len(metrics.bad_lines) > 10 else "")
        data.notes.append(f"metrics.jsonl: skipped {len(metrics.bad_lines)} line(s) that are not a JSON "
                          f"metrics record (line {shown})")
    config_path = run_dir / "config.yaml"
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            loaded = None
            data.notes.append(f"config.yaml: not readable YAML ({str(exc).splitlines()[0]})")
        data.config = loaded if isinstance(loaded, dict) else {}
    else:
        data.notes.append("config.yaml not found")
    data.eval_before = _read_json(run_dir / "eval_before.json", data.notes)
    data.eval_after = _read_json(run_dir / "eval_after.json", data.notes)
    log_path = run_dir / "corrections.jsonl"
    if log_path.exists():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.pairs = list(read_log(log_path))
        data.notes += [f"corrections.jsonl: {w.message}" for w in caught]
    else:
        data.notes.append("corrections.jsonl not found")
    return data


def series(rows: Sequence[dict[str, Any]], key: str) -> Series:
    """(steps, values) of ``key`` over the metric rows that hold a finite value for it."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(float(row["step"]))
            ys.append(float(value))
    return xs, ys


def derived_series(data: RunData) -> dict[str, Series]:
    """Series the run does not log directly but its files determine:

    * ``report/pairs_per_s``: learner throughput end to end, ``train/num_pairs`` of each step
      over the wall time since the previous step's record (everything included: generation,
      correction, waiting, sync, evaluation);
    * ``report/rollout_tokens_per_s``: generated tokens per second from the Ray rollout
      workers' cumulative ``rollout/worker<i>/tokens`` counters (the in-process loop logs
      ``rollout/tokens_per_s`` itself);
    * ``report/log_edit_distance``, ``report/log_noop_rate``: mean token edit distance and the
      fraction of y' == y over the correction log's pairs, grouped by the policy version that
      produced y — the teacher's view of the training data, in both drivers.
    """
    out: dict[str, Series] = {}
    xs, ys = [], []
    prev_time = None
    for row in data.metrics:
        t = row.get("time")
        if "train/num_pairs" in row and prev_time is not None and t is not None and t > prev_time:
            xs.append(float(row["step"]))
            ys.append(float(row["train/num_pairs"] or 0.0) / (t - prev_time))
        if t is not None:
            prev_time = t
    out["report/pairs_per_s"] = (xs, ys)
    xs, ys = [], []
    prev: tuple[float, float] | None = None
    for row in data.metrics:  # the Ray driver logs cumulative tokens per rollout worker
        counts = [v for k, v in row.items() if k.startswith("rollout/worker") and k.endswith("/tokens")
                  and isinstance(v, (int, float))]
        t = row.get("time")
        if counts and isinstance(t, (int, float)):
            if prev is not None and t > prev[0]:
                xs.append(float(row["step"]))
                ys.append((sum(counts) - prev[1]) / (t - prev[0]))
            prev = (t, sum(counts))
    out["report/rollout_tokens_per_s"] = (xs, ys)
    by_version: dict[int, list[CorrectionPair]] = {}
    for pair in data.pairs:
        by_version.setdefault(pair.policy_version, []).append(pair)
    versions = sorted(by_version)
    out["report/log_edit_distance"] = (
        [float(v) for v in versions],
        [sum(p.edit_distance for p in by_version[v]) / len(by_version[v]) for v in versions],
    )
    out["report/log_noop_rate"] = (
        [float(v) for v in versions],
        [sum(p.is_noop for p in by_version[v]) / len(by_version[v]) for v in versions],
    )
    return out
