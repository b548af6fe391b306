"""``correction-rl report SWEEP_DIR``: the sweep's comparison as markdown and PNG plots.

``correction_rl/cli.py`` sends ``report`` here when its directory holds ``spec.yaml`` and
``results.jsonl`` (a run directory still gets the run report, ``observe/report.py``). It reads
``results.jsonl`` alone, so it works on a copied sweep directory and on a sweep still running.

Written to ``SWEEP_DIR/report.md`` (also printed) and ``SWEEP_DIR/report/``:

* the table: per arm (within each grid condition), n ok, failed, mean ± std over seeds of each
  chosen metric after training and of its gain, teacher calls and wall time; the arm with the
  largest headline gain is marked **best**, arms within seed noise of it ``≈`` (``stats.py``);
* the matched-gain table: KL and teacher calls of each arm at the largest gain all reach;
* ``correction_vs_teacher_calls.png``: held-out correction rate against teacher calls per arm
  (mean ± std over seeds of the evaluation history, shaded; faint lines: single seeds);
* ``kl_vs_gain.png``: each trial's final (gain, KL) and each arm's mean (gain, KL) path.

matplotlib is imported lazily with the Agg backend.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from correction_rl.errors import UserError
from correction_rl.sweep.plan import SweepDir, is_sweep_dir
from correction_rl.sweep.results import TrialResult, read_results
from correction_rl.sweep.stats import (DEFAULT_METRICS, HEADLINE, ArmSummary, MatchedGain, best_arm, direction,
                                       gain_curve, matched_gain, mean_curve, summarize, within_noise)

PLOTS = ("correction_vs_teacher_calls.png", "kl_vs_gain.png")


class SweepReportError(ValueError, UserError):
    """Not a sweep directory, or nothing to report."""


def _conditions(arms: Sequence[ArmSummary]) -> dict[str, list[ArmSummary]]:
    out: dict[str, list[ArmSummary]] = {}
    for a in arms:
        out.setdefault(a.condition, []).append(a)
    return out


def _mark(arm: ArmSummary, best: ArmSummary | None, metric: str) -> str:
    if best is None or not arm.gain.get(metric) or arm.gain[metric].mean is None:
        return ""
    if arm is best:
        return " **best**"
    same = within_noise(arm.gain[metric], best.gain[metric])
    return " ≈" if same else "" if same is False else " (n<2)"


SHORT = {"correction_rate": "corr", "mean_normalized_edit_distance": "norm edit", "mean_edit_distance": "edit",
         "accuracy": "acc", "exact_match": "exact", "kl": "KL"}


def short(metric: str) -> str:
    """``greedy/correction_rate`` -> ``greedy corr`` (table headers)."""
    mode, _, name = metric.rpartition("/")
    return f"{mode} {SHORT.get(name, name)}".strip()


def arm_table(arms: Sequence[ArmSummary], metrics: Sequence[str], headline: str) -> str:
    best = best_arm(arms, headline)
    head = ["arm", "n", "failed"]
    for m in metrics:
        head.append(short(m))
        if direction(m):
            head.append(f"{short(m)} gain")
    head += ["teacher calls", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        cells = [a.arm, str(len(a.ok)), str(a.failed)]
        for m in metrics:
            cells.append(a.after[m].text())
            if direction(m):
                cells.append(a.gain[m].text() + (_mark(a, best, m) if m == headline else ""))
        cells += [a.teacher_calls.text(".0f"), a.wall_s.text(".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_table(match: MatchedGain) -> str:
    left_out = (f" Left out (a trial never improved {match.metric}, or logged no evaluation): "
                f"{', '.join(match.excluded)}." if match.excluded else "")
    if match.level is None:
        return (f"Not available: no arm improved {match.metric} in every trial's evaluations (they "
                "need evaluations during training, eval.every_steps, with KL measured: sampled/kl).")
    lines = [f"At {match.metric} gain = {match.level:.3f} (the largest every trial of these arms "
             f"reaches).{left_out}", "",
             "| arm | KL at matched gain | teacher calls at matched gain |", "|---|---|---|"]
    kl_means = [s for s in match.kl.values() if s.mean is not None]
    lowest = min(kl_means, key=lambda s: s.mean) if kl_means else None  # type: ignore[arg-type,return-value]
    for arm, kl in match.kl.items():
        mark = ""
        if lowest is not None and kl.mean is not None:
            same = within_noise(kl, lowest)
            mark = " **lowest**" if kl is lowest else " ≈" if same else "" if same is False else " (n<2)"
        lines.append(f"| {arm} | {kl.text()}{mark} | {match.teacher_calls[arm].text('.0f')} |")
    return "\n".join(lines)


def render_markdown(name: str, rows: Sequence[TrialResult], notes: Sequence[str], metrics: Sequence[str],
                    headline: str, plots: Sequence[Path]) -> str:
    arms = summarize(rows, metrics)
    parts = [f"# Sweep {name}", "",
             f"{len(rows)} trial rows ({sum(r.status == 'ok' for r in rows)} ok), generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Metrics after training, mean ± std over seeds "
             "(ok trials); gain = before − after (acc: after − before); corr = correction rate, "
             "norm edit = normalized edit distance, KL = KL(pi || pi_init) on sampled answers. On the headline gain "
             f"({headline}), **best** marks the largest mean, ≈ an arm within seed noise of it "
             "(|difference| < pooled std); unmarked arms differ from it by more than that; (n<2) where "
             "one seed cannot tell.", ""]
    parts += [f"> note: {n}" for n in notes] + ([""] if notes else [])
    for condition, members in _conditions(arms).items():
        if condition:
            parts += [f"## {condition}", ""]
        parts += [arm_table(members, metrics, headline), "", "**Matched gain.** " +
                  matched_table(matched_gain(members, headline)), ""]
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        parts += ["## Failed trials", ""]
        for r in failed:
            first = (r.error or "").strip().splitlines()[:1]
            parts.append(f"- `{r.trial_id}` ({r.status}): {first[0] if first else ''}")
        parts.append("")
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}](report/{p.name})" for p in plots] + [""]
    return "\n".join(parts)


def render_plots(rows: Sequence[TrialResult], out: Path, headline: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    arms = summarize(rows, (headline, "sampled/kl"))
    conditions = _conditions(arms)
    paths = []
    fig, axes = plt.subplots(1, len(conditions), figsize=(6 * len(conditions), 4.2), squeeze=False)
    for ax, (condition, members) in zip(axes[0], conditions.items()):
        for i, a in enumerate(members):
            color = f"C{i % 10}"
            for r in a.ok:
                pts = [(p.teacher_calls, p.metrics[headline]) for p in r.history
                       if p.teacher_calls is not None and headline in p.metrics]
                if pts:
                    ax.plot(*zip(*sorted(pts)), color=color, alpha=0.25, linewidth=0.8)
            xs, ys, sd = mean_curve(a.ok, headline)
            ax.plot(xs, ys, color=color, linewidth=2, label=f"{a.arm} (n={len(a.ok)})")
            if xs and any(sd):
                ax.fill_between(xs, [m - d for m, d in zip(ys, sd)], [m + d for m, d in zip(ys, sd)],
                                color=color, alpha=0.12, linewidth=0)
        _finish_panel(ax, "teacher calls", f"held-out {headline}", condition)
    paths.append(_save(fig, out / PLOTS[0]))
    fig, axes = plt.subplots(1, len(conditions), figsize=(6 * len(conditions), 4.2), squeeze=False)
    for ax, (condition, members) in zip(axes[0], conditions.items()):
        for i, a in enumerate(members):
            color = f"C{i % 10}"
            curves = [c for r in a.ok if (c := gain_curve(r, headline, "sampled/kl"))]
            finals = [c[-1] for c in curves]
            if finals:
                ax.scatter(*zip(*finals), color=color, label=f"{a.arm} (n={len(finals)})", zorder=3)
            for c in curves:
                if len(c) > 1:
                    ax.plot(*zip(*c), color=color, alpha=0.3, linewidth=0.8)
        _finish_panel(ax, f"gain in {headline} (before − after)", "KL(pi || pi_init), sampled", condition)
    paths.append(_save(fig, out / PLOTS[1]))
    return paths


def _finish_panel(ax, xlabel: str, ylabel: str, condition: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=condition or "all arms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | Path, metrics: Sequence[str] = DEFAULT_METRICS, headline: str = HEADLINE,
                 plots: bool = True) -> tuple[Path, str, list[Path]]:
    """Write ``report.md`` and the plots; returns (markdown path, markdown, plot paths)."""
    sweep = SweepDir(Path(sweep_dir))
    if not is_sweep_dir(sweep.root):
        raise SweepReportError(f"{sweep.root}: not a sweep directory (no spec.yaml)")
    found = read_results(sweep.results)
    if not found.rows:
        raise SweepReportError(f"{sweep.results}: no finished trial yet" + (f" ({'; '.join(found.notes)})"
                                                                             if found.notes else ""))
    paths = render_plots(found.rows, sweep.root / "report", headline) if plots else []
    text = render_markdown(sweep.root.name, found.rows, found.notes, metrics, headline, paths)
    md = sweep.root / "report.md"
    md.write_text(text, encoding="utf-8")
    return md, text, paths


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="correction-rl report",
                                description="The comparison table and plots of a sweep directory (docs/sweeps.md).")
    p.add_argument("sweep_dir")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated eval metrics for the table (default {','.join(DEFAULT_METRICS)})")
    p.add_argument("--headline", default=HEADLINE, help=f"the metric whose gain ranks the arms (default {HEADLINE})")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    md, text, paths = write_report(a.sweep_dir, [m for m in a.metrics.split(",") if m], a.headline, not a.no_plots)
    print(text)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote {md}")
    return 0
