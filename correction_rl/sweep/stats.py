"""Numbers of the sweep report: mean ± std over seeds per arm, gains, the matched-gain comparison
and what is within seed noise. Pure functions of ``TrialResult`` rows (tested on hand-made rows).

Conventions (docs/sweeps.md, "The report"):

* **gain** is the improvement from before to after training: ``before - after`` for metrics
  where lower is better (correction rate, edit distances), ``after - before`` for accuracy;
* std is the sample standard deviation over seeds (``n - 1``; undefined for one seed);
* two arms differ **within seed noise** when ``|mean_a - mean_b| < pooled std``
  (``sqrt((s_a^2 + s_b^2) / 2)``), the spread one seed to the next already shows;
* **matched gain**: curves of the same seed's evaluations during training, ``(gain, KL)`` and
  ``(gain, teacher calls)``, are read at the largest gain every trial of the compared arms
  reaches (linear interpolation at the first evaluation reaching it). Arms are then compared at
  the same improvement, not only at the end, where they may have improved by different amounts.
  Arms with a trial that never improves are left out of that comparison (and named).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

from correction_rl.sweep.results import TrialResult

LOWER_IS_BETTER = ("correction_rate", "mean_normalized_edit_distance", "mean_edit_distance")
HIGHER_IS_BETTER = ("accuracy", "exact_match")
DEFAULT_METRICS = ("greedy/correction_rate", "sampled/correction_rate", "greedy/mean_normalized_edit_distance",
                   "greedy/accuracy", "sampled/kl")
HEADLINE = "greedy/correction_rate"


def direction(metric: str) -> int:
    """+1: gain = before - after; -1: gain = after - before; 0: no gain (KL)."""
    name = metric.rsplit("/", 1)[-1]
    return 1 if name in LOWER_IS_BETTER else -1 if name in HIGHER_IS_BETTER else 0


def gain(before: float | None, value: float | None, metric: str) -> float | None:
    sign = direction(metric)
    if before is None or value is None or sign == 0:
        return None
    return sign * (before - value)


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> "Stat":
        xs = [v for v in values if v is not None and math.isfinite(v)]
        if not xs:
            return cls(None, None, 0)
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def text(self, fmt: str = ".3f") -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:{fmt}}" + (f" ± {self.std:{fmt}}" if self.std is not None else "")


def within_noise(a: Stat, b: Stat) -> bool | None:
    """``|a - b| < pooled std``; None when either lacks a std (one seed)."""
    if a.mean is None or b.mean is None or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) < math.sqrt((a.std ** 2 + b.std ** 2) / 2)


@dataclass
class ArmSummary:
    """One arm under one condition."""

    condition: str
    arm: str
    ok: list[TrialResult]
    failed: int
    after: dict[str, Stat] = field(default_factory=dict)
    gain: dict[str, Stat] = field(default_factory=dict)
    teacher_calls: Stat = Stat(None, None, 0)
    wall_s: Stat = Stat(None, None, 0)


def group(rows: Sequence[TrialResult]) -> dict[tuple[str, str], list[TrialResult]]:
    """Rows by (condition, arm), in the order they first appear."""
    out: dict[tuple[str, str], list[TrialResult]] = {}
    for row in rows:
        out.setdefault((row.condition, row.arm), []).append(row)
    return out


def summarize(rows: Sequence[TrialResult], metrics: Sequence[str] = DEFAULT_METRICS) -> list[ArmSummary]:
    out = []
    for (condition, arm), members in group(rows).items():
        ok = [r for r in members if r.status == "ok"]
        s = ArmSummary(condition, arm, ok, failed=len(members) - len(ok))
        for m in metrics:
            s.after[m] = Stat.of([r.after.get(m) for r in ok])
            if direction(m):
                s.gain[m] = Stat.of([gain(r.before.get(m), r.after.get(m), m) for r in ok])
        s.teacher_calls = Stat.of([r.teacher_calls for r in ok])
        s.wall_s = Stat.of([r.wall_s for r in ok])
        out.append(s)
    return out


def best_arm(arms: Sequence[ArmSummary], metric: str) -> ArmSummary | None:
    """The arm with the largest mean gain in ``metric`` (None when no arm has one)."""
    scored = [a for a in arms if a.gain.get(metric) and a.gain[metric].mean is not None]
    return max(scored, key=lambda a: a.gain[metric].mean) if scored else None


# ---------------------------------------------------------------------------------------------
# Curves over a run's evaluations


def gain_curve(row: TrialResult, metric: str, y: str) -> list[tuple[float, float]]:
    """``(gain in metric, y)`` at each evaluation of the run, in time order; ``y`` is a metric
    name (``sampled/kl``) or ``teacher_calls``. The first evaluation is the "before"."""
    if not row.history:
        return []
    before = row.history[0].metrics.get(metric, row.before.get(metric))
    out = []
    for point in row.history:
        g = gain(before, point.metrics.get(metric), metric)
        value = point.teacher_calls if y == "teacher_calls" else point.metrics.get(y)
        if g is not None and value is not None:
            out.append((g, float(value)))
    return out


def read_at(curve: Sequence[tuple[float, float]], level: float) -> float | None:
    """``y`` where the curve first reaches gain ``level`` (linear between the two evaluations
    around the crossing); None when it never does."""
    prev = None
    for g, y in curve:
        if g >= level:
            if prev is None or g == prev[0]:
                return y
            t = (level - prev[0]) / (g - prev[0])
            return prev[1] + t * (y - prev[1])
        prev = (g, y)
    return None


@dataclass
class MatchedGain:
    """The arms of one condition read at one common gain level."""

    condition: str
    metric: str
    level: float | None
    """The largest gain every trial of the compared arms reaches (None: no arm improved)."""
    kl: dict[str, Stat] = field(default_factory=dict)
    teacher_calls: dict[str, Stat] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    """Arms left out: some trial of theirs never improved (or has no evaluation history)."""


def matched_gain(arms: Sequence[ArmSummary], metric: str = HEADLINE, kl: str = "sampled/kl") -> MatchedGain:
    """KL and teacher calls of each arm at the largest gain all trials of the improving arms reach.
    An arm with a trial that never improves cannot be read at any positive gain: it is listed in
    ``excluded`` rather than dragging the common level down to zero for everyone."""
    condition = arms[0].condition if arms else ""
    curves = {a.arm: [(gain_curve(r, metric, kl), gain_curve(r, metric, "teacher_calls")) for r in a.ok]
              for a in arms}
    reach = {arm: [max((g for g, _ in c_kl), default=0.0) for c_kl, _ in runs] for arm, runs in curves.items()}
    eligible = [arm for arm, r in reach.items() if r and min(r) > 0]
    out = MatchedGain(condition, metric, None, excluded=[a for a in curves if a not in eligible])
    if not eligible:
        return out
    out.level = min(min(reach[arm]) for arm in eligible)
    for arm in eligible:
        out.kl[arm] = Stat.of([read_at(c_kl, out.level) for c_kl, _ in curves[arm]])
        out.teacher_calls[arm] = Stat.of([read_at(c_calls, out.level) for _, c_calls in curves[arm]])
    return out


def mean_curve(rows: Sequence[TrialResult], metric: str, points: int = 50) -> tuple[list[float], list[float], list[float]]:
    """``metric`` against teacher calls, mean and std over seeds: each seed's curve interpolated
    on a common grid up to the smallest final teacher-call count of the seeds (std 0 for one)."""
    curves = []
    for r in rows:
        pts = [(p.teacher_calls, p.metrics[metric]) for p in r.history
               if p.teacher_calls is not None and metric in p.metrics]
        if len(pts) >= 2:
            curves.append(sorted(pts))
    if not curves:
        return [], [], []
    end = min(c[-1][0] for c in curves)
    if end <= 0:
        return [], [], []
    xs = [end * i / (points - 1) for i in range(points)]
    at = [[_interp(c, x) for c in curves] for x in xs]
    return xs, [statistics.fmean(v) for v in at], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in at]


def _interp(curve: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return curve[-1][1] if x > curve[-1][0] else curve[0][1]
