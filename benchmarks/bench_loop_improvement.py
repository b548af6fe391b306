"""Does correction optimization work? The in-process loop against the warm-started policy.

For each (task, seed): warm-start a tiny policy into the 30-60% accuracy band
(``correction-rl warmstart``), run the in-process loop with the oracle teacher for ``--steps``
learner steps, and print one JSON line with the held-out greedy correction rate before and
after, ``reduction`` = 1 - after / before (target >= 1/3), and the loop's wall seconds
(target: within 10 minutes on 2 cores). Extra ``--dotted.overrides`` go to the run config.

Usage: ``python benchmarks/bench_loop_improvement.py --tasks reverse sorting --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import sys
import time
from pathlib import Path

from correction_rl.config import load_config
from correction_rl.run.inprocess import run
from correction_rl.tools.warmstart import WarmStartConfig, warm_start

REPO = Path(__file__).resolve().parents[1]

# The loop settings used for the figures in docs/benchmarks.md.
DEFAULTS = [
    "--mode", "inprocess", "--total_steps", "100", "--eval.every_steps", "0",
    "--objective.form", "logistic", "--objective.beta", "0.5", "--objective.anchor_weight", "1.0",
    "--objective.noop_policy", "anchor_only",
    "--learner.backend", "torch", "--learner.lr", "3e-4", "--learner.micro_batch_pairs", "64",
    "--rollout.batch_size", "128", "--rollout.max_new_tokens", "24",
    "--buffer.min_fresh_pairs", "64", "--metrics.wandb_mode", "disabled",
    "--metrics.console_every_steps", "1000",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["reverse", "sorting"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            for seed in args.seeds:
                policy = Path(tmp) / "policies" / f"{task}-{seed}"  # run directories go to runs/
                warm = warm_start(WarmStartConfig(task=task, seed=seed), policy, log=lambda *_: None)
                cfg = load_config(
                    REPO / "configs" / "demo.yaml",
                    DEFAULTS + [
                        "--name", f"{task}-{seed}", "--output_dir", str(Path(tmp) / "runs"), "--seed", str(seed),
                        "--model.path", str(policy), "--task.names", f"[{task}]",
                    "--checkpoint.resume", "never",
                    ] + overrides,
                )
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
                    result = run(cfg)
                seconds = time.perf_counter() - start
                before = result.before.modes["greedy"].correction_rate
                after = result.after.modes["greedy"].correction_rate
                print(json.dumps({
                    "bench": "loop_improvement", "task": task, "seed": seed,
                    "objective": cfg.objective.form, "beta": cfg.objective.beta,
                    "anchor_weight": cfg.objective.anchor_weight, "steps": result.steps,
                    "warm_start_accuracy": warm.accuracy,
                    "correction_rate_before": before, "correction_rate_after": after,
                    "reduction": round(1 - after / before, 3) if before else None,
                    "reduction_target": 0.333,
                    "edit_distance_before": result.before.modes["greedy"].mean_edit_distance,
                    "edit_distance_after": result.after.modes["greedy"].mean_edit_distance,
                    "kl_sampled_after": result.after.modes["sampled"].kl,
                    "loop_seconds": round(seconds, 1), "seconds_target": 600,
                }), flush=True)


if __name__ == "__main__":
    main()
