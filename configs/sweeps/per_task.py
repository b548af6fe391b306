"""Per-task view of a sweep whose runs train on one task and are evaluated on two (experiment 2,
configs/sweeps/regularization.yaml; docs/results.md).

``correction-rl report`` compares arms on the overall held-out metrics (all evaluated tasks
pooled). The regularization claim needs them per task: the gain on the trained task, the
accuracy kept on the other one, and the KL drift, compared at a *matched gain*. This reads the
trials' own files (``eval_before.json``, ``eval_after.json``, ``metrics.jsonl``: every eval row
carries ``eval/<mode>/<task>/<metric>`` and ``eval/sampled/kl``) and prints two markdown tables;
``--plot`` also writes ``per_task.png``.

    python configs/sweeps/per_task.py runs/sweeps/regularization --trained sorting --other reverse \
        --plot docs/img/results/regularization_per_task.png

Matched gain: the gain G is the drop of the trained task's greedy correction rate from its value
before training. G* is the largest gain every arm's mean curve reaches; each trial's KL and
other-task accuracy are read where its own curve first reaches G* (linear interpolation between
evaluations), then averaged over the trials that reach it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def _rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for line in (sweep_dir / "results.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if row.get("status") == "ok":
            rows.append(row)
    return rows


def _curve(run_dir: Path, trained: str, other: str) -> list[tuple[float, float, float, float]]:
    """(teacher calls, gain on ``trained``, accuracy on ``other``, KL) at every evaluation."""
    points, calls, base = [], 0.0, None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        calls = row.get("teacher/calls", calls)
        corr = row.get(f"eval/greedy/{trained}/correction_rate")
        if corr is None:
            continue
        base = corr if base is None else base
        points.append((calls, base - corr, row.get(f"eval/greedy/{other}/accuracy", math.nan),
                       row.get("eval/sampled/kl", math.nan)))
    return points


def _at_gain(curve, target: float) -> tuple[float, float] | None:
    """(other-task accuracy, KL) where the curve first reaches ``target`` gain."""
    if curve and curve[0][1] >= target:
        return curve[0][2:]
    for (_, g0, a0, k0), (_, g1, a1, k1) in zip(curve, curve[1:]):
        if g1 >= target > g0:
            t = (target - g0) / (g1 - g0)
            return a0 + t * (a1 - a0), k0 + t * (k1 - k0)
    return None


MIN_GAIN = 0.02
"""An arm whose mean curve never lowers the trained task's correction rate by this much is left
out of the matched-gain table (matching at gain 0 compares nothing)."""


def _ms(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--trained", required=True, help="the task the runs train on")
    p.add_argument("--other", required=True, help="the evaluated task they do not train on")
    p.add_argument("--plot", type=Path, default=None, help="write the per-task plot here (PNG)")
    a = p.parse_args(argv)
    arms: dict[str, list[dict]] = {}
    for row in _rows(a.sweep_dir):
        run_dir = Path(row["run_dir"])
        before = json.loads((run_dir / "eval_before.json").read_text())["by_task"]
        after = json.loads((run_dir / "eval_after.json").read_text())
        arms.setdefault(row["arm"], []).append({
            "seed": row["seed"], "calls": row.get("teacher_calls"), "wall": row.get("wall_s"),
            "corr0": before["greedy"][a.trained]["correction_rate"],
            "corr1": after["by_task"]["greedy"][a.trained]["correction_rate"],
            "acc0": before["greedy"][a.other]["accuracy"],
            "acc1": after["by_task"]["greedy"][a.other]["accuracy"],
            "kl": after["modes"]["sampled"].get("kl"),
            "kl_other": after["by_task"]["sampled"][a.other].get("kl"),
            "curve": _curve(run_dir, a.trained, a.other),
        })
    print(f"### End of budget: trained on `{a.trained}`, also evaluated on `{a.other}`\n")
    print(f"| arm | n | {a.trained} greedy correction before → after | gain | {a.other} greedy accuracy "
          f"before → after | kept (after − before) | KL(pi‖pi_init), both tasks | KL on {a.other} | teacher calls | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, trials in arms.items():
        t = trials
        print(f"| {arm} | {len(t)} | {_ms([x['corr0'] for x in t])} → {_ms([x['corr1'] for x in t])} | "
              f"{_ms([x['corr0'] - x['corr1'] for x in t])} | {_ms([x['acc0'] for x in t])} → "
              f"{_ms([x['acc1'] for x in t])} | {_ms([x['acc1'] - x['acc0'] for x in t])} | "
              f"{_ms([x['kl'] for x in t])} | {_ms([x['kl_other'] for x in t])} | "
              f"{_ms([x['calls'] for x in t], 0)} | {_ms([x['wall'] for x in t], 1)} |")
    best = {arm: max((statistics.mean(c) for c in zip(*[[p[1] for p in x["curve"]] for x in t])), default=0.0)
            for arm, t in arms.items()}
    gaining = {arm: g for arm, g in best.items() if g >= MIN_GAIN}
    target = min(gaining.values()) if gaining else 0.0
    print(f"\n### At matched gain: {a.trained} greedy correction rate down by G* = {target:.3f}\n")
    print(f"(G*: the largest gain every arm's mean curve reaches, among arms whose mean curve gains at "
          f"least {MIN_GAIN}; values read where each seed's curve first reaches it, linear between "
          f"evaluations. Arms that never gain: {', '.join(sorted(set(best) - set(gaining))) or 'none'}.)\n")
    print(f"| arm | seeds reaching G* | {a.other} accuracy − before | KL(pi‖pi_init) |")
    print("| --- | --- | --- | --- |")
    for arm, t in arms.items():
        if arm not in gaining:
            print(f"| {arm} | never gains (best mean gain {best[arm]:.3f}) | - | - |")
            continue
        hits = [(h, x) for x in t if (h := _at_gain(x["curve"], target)) is not None]
        print(f"| {arm} | {len(hits)}/{len(t)} | {_ms([h[0] - x['acc0'] for h, x in hits])} | "
              f"{_ms([h[1] for h, _ in hits])} |")
    if a.plot:
        _plot(arms, a, target)
        print(f"\nwrote {a.plot}")
    return 0


def _plot(arms: dict, a, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, trials in arms.items():
        n = min(len(x["curve"]) for x in trials)
        mean = [tuple(statistics.mean(x["curve"][i][j] for x in trials) for j in range(4)) for i in range(n)]
        line, = left.plot([m[1] for m in mean], [m[3] for m in mean], marker="o", ms=3, label=arm)
        right.plot([m[1] for m in mean], [m[2] for m in mean], marker="o", ms=3, color=line.get_color(), label=arm)
        for x in trials:
            left.plot([p[1] for p in x["curve"]], [p[3] for p in x["curve"]], color=line.get_color(), alpha=0.2, lw=0.8)
            right.plot([p[1] for p in x["curve"]], [p[2] for p in x["curve"]], color=line.get_color(), alpha=0.2, lw=0.8)
    for ax in (left, right):
        ax.axvline(target, color="grey", ls=":", lw=1)
        ax.set_xlabel(f"gain on {a.trained}: greedy correction rate before − now")
        ax.grid(alpha=0.3)
    left.set_ylabel("KL(pi || pi_init), sampled, both tasks")
    right.set_ylabel(f"greedy accuracy on {a.other} (not trained)")
    left.legend(fontsize=8)
    fig.suptitle(f"{a.sweep_dir.name}: mean over seeds (faint: single seeds); dotted: matched gain G*")
    fig.tight_layout()
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
