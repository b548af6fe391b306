"""Pipeline efficiency of the Ray system, and async vs sync mode on the same actors.

One Ray cluster, one set of actors (rollout worker, teacher worker, buffer, learner rank):

1. each stage alone: generation (rollouts/s), correction (pairs/s), training (pairs/s);
2. ``sync`` mode for ``--steps`` learner steps, then ``async`` mode for as many: end-to-end
   trained pairs/s of each (repeated ``--repeats`` times, interleaved, medians).

Prints one JSON line with ``efficiency`` = async pairs/s / the slowest stage's pairs/s alone
(target >= 0.9), ``async_speedup`` = async pairs/s / sync pairs/s, and the ideal overlap bound
``(t_gen + t_teach + t_train) / max(t_gen, t_teach, t_train)`` of per-pair stage times, with
``speedup_vs_bound`` (target >= 0.9). Each is given for whole measurements (start-up of the
producers, pipeline fill, final synchronous sync and drain included) and for the steady state
(``steady_state``: pairs/s between the first and the last step's result at the driver, in each
measurement), with the mean seconds the driver spent per step in each phase (``driver/*_s``).
Each actor runs one torch thread (Ray sets OMP_NUM_THREADS to the actor's CPUs), so on a 2-core
machine the generation and training roles each get a core and the bound is reachable; more busy
roles than cores cap it lower.

Also reported: the mean batch staleness of each mode, and the learner's own phases timed on
rank 0 (``train/phase/*_s``: waiting for the batch, its transfer, collation, forward, backward,
optimizer, the export before the step, the put beside it and the optimizer's wait for that put)
alone and inside each mode, with
``learner_step_in_pipeline_vs_alone`` (its ``train_step`` inside async ÷ alone; target <= 1.15)
next to ``learner_step_beside_generation_vs_alone`` (the same step while the rollout worker
generates and nothing else runs: the hardware's share of that slowdown). The learner alone is
timed again before every repeat, and each repeat's efficiency is taken against its own timing
(medians reported): this machine's speed drifts over minutes.

And where the CPU went (``_cpu.py``, Linux ``/proc``): ``async_cpu_ms_per_step``, the CPU
milliseconds each role's processes used per async step (learner, rollout, teacher, buffer, the
driver, ``other``: Ray's own processes and the rest of the machine), and
``cores_busy_at_efficiency``: how many cores that much work per step would keep busy if the
step lasted the learner-alone step ÷ 0.85 (or 0.9). More than ``cores`` means the target cannot
be met on this machine without less work per step, however the roles overlap.

Usage: ``python benchmarks/bench_pipeline.py [--steps 8] [--repeats 3] [--size tiny]
[--pending-steps 1 --max-staleness 1] [--checkpoint-every 0] [--rows FILE] [--device cuda]``
(how far generation may run ahead: throughput against staleness; checkpoints inside the
measurement; every step's phases as JSONL; ``--device cuda`` puts the learner rank and the
rollout worker on 0.45 of one GPU each and refuses to start without CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import _cpu
import ray
from _common import add_device_argument, check_device

from correction_rl.prompts.split import train_and_held_out
from correction_rl.config import config_from_dict
from correction_rl.distributed.cluster import init_ray, start_cluster
from correction_rl.distributed.driver import Driver
from correction_rl.models import make_model


def stage_rates(cluster, batches: int) -> dict[str, float]:
    """Pairs per second of generation and correction, each run alone, on the same actors (the
    learner alone: ``train_alone``, timed again before every repeat)."""
    worker, teacher = cluster.rollout_workers[0], cluster.teachers[0]
    start = time.perf_counter()
    rollouts = [ray.get(worker.generate.remote()) for _ in range(batches)]
    t_gen = time.perf_counter() - start
    n = sum(len(r) for r in rollouts)
    start = time.perf_counter()
    pairs = [ray.get(teacher.correct.remote(r)) for r in rollouts]
    t_teach = time.perf_counter() - start
    flat = [p for lst in pairs for p in lst]
    step = cluster.cfg.learner.micro_batch_pairs
    chunks = [flat[i : i + step] for i in range(0, len(flat) - step + 1, step)]
    return {
        "gen": n / t_gen,
        "teach": len(flat) / t_teach,
        "pairs_per_rollout": len(flat) / n,
        "chunks": chunks,  # learner batches of these pairs: the learner alone is timed on them
    }


def train_alone(cluster, chunks: list, min_steps: int = 0) -> tuple[float, dict[str, float]]:
    """The learner alone on ``chunks`` (one step each, cycled until ``min_steps`` steps): pairs/s
    and its mean phases. Run again before every repeat: the efficiency's denominator is measured
    beside its numerator, not minutes earlier on a machine whose speed drifts (the learner alone
    moved by 15% between the start and the end of one run here). ``min_steps``: as many steps as
    the pipeline's measurement, so both rates average over windows of a similar length (one pass
    over 6 chunks, ~0.3 s, gave 553-778 pairs/s in ten back-to-back passes here)."""
    learner = cluster.learners[0]
    steps = [chunks[i % len(chunks)] for i in range(max(len(chunks), min_steps))]
    start = time.perf_counter()
    learner_steps = [ray.get(learner.train_step.remote(chunk)).as_metrics() for chunk in steps]
    pairs_per_s = sum(len(c) for c in steps) / (time.perf_counter() - start)
    return pairs_per_s, learner_phases(learner_steps[1:] or learner_steps)  # first: idle gap


def train_beside_generation(cluster, chunks: list) -> dict[str, float]:
    """The learner alone on ``chunks`` while the rollout worker generates without a pause (one
    ``generate`` call always in flight, nothing else running): what sharing the machine with
    generation costs the learner's step by itself, without the pipeline's driver, buffer,
    teacher or weight syncs. Compared with ``learner_step_in_pipeline_vs_alone``, it tells
    the pipeline's own cost from the hardware's."""
    learner, worker = cluster.learners[0], cluster.rollout_workers[0]
    generating = worker.generate.remote()
    ray.get(generating)  # the worker is busy from here on
    generating = worker.generate.remote()
    learner_steps = []
    for chunk in chunks:
        step = learner.train_step.remote(chunk)
        while True:
            ready, _ = ray.wait([step, generating], num_returns=1)
            if generating in ready:
                generating = worker.generate.remote()
            if step in ready:
                learner_steps.append(ray.get(step).as_metrics())
                break
    ray.get(generating)
    return learner_phases(learner_steps[1:] or learner_steps)


def learner_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each phase timed on learner rank 0 (``train/phase/*_s``) and of
    its whole ``train_step`` (``train/seconds``, the step alone without transfer or export)."""
    keys = sorted({k for r in rows for k in r if k.startswith("train/phase/")} | {"train/seconds"})
    return {k.removeprefix("train/phase/").removeprefix("train/"): round(statistics.fmean(r.get(k, 0.0) for r in rows), 4)
            for k in keys if any(k in r for r in rows)}


class PhaseSink:
    """Keeps the driver's per-step phase seconds (``driver/*_s``) and batch staleness."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.learner_rows: list[dict[str, float]] = []
        """Learner rank 0's own phase seconds per step (``train/phase/*_s``)."""
        self.steps: list[int] = []
        self.times: list[float] = []
        """When each step's result reached the driver (``TimedDriver``). Not when its row
        arrives: an async row is held until its background sync ends, so the first row of a
        measurement comes about a step late and row times would shorten the interval (the
        rounds before 2026-11-30 measured that way: async steady rates up to (n-1)/(n-2) high)."""
        self.steady: list[float] = []
        """Per measurement: trained pairs/s between its first and last step's result (pipeline
        fill and drain excluded)."""
        self.ends: list[int] = []
        """Per measurement: the end of its rows in ``learner_rows``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)
        self.rows.append({k: v for k, v in metrics.items()
                          if k.startswith("driver/") or k == "buffer/batch_staleness_mean"})
        self.learner_rows.append({k: v for k, v in metrics.items()
                                  if k.startswith("train/phase/") or k == "train/seconds"})

    def end_measurement(self, pairs_per_step: int) -> None:
        times, self.times = self.times, []
        self.steady.append((len(times) - 1) * pairs_per_step / (times[-1] - times[0]))
        self.ends.append(len(self.learner_rows))

    def measurement_learner_rows(self, index: int) -> list[dict[str, float]]:
        return self.learner_rows[(self.ends[index - 1] if index else 0):self.ends[index]]

    def close(self) -> None:
        pass

    def means(self) -> dict[str, float]:
        """Means, not medians: the phases of a step add up to ``step_s`` only in the mean (a
        phase that is usually ~0 and sometimes long has a median of ~0)."""
        keys = sorted({k for r in self.rows for k in r})
        return {k.removeprefix("driver/"): round(statistics.fmean(r.get(k, 0.0) for r in self.rows), 4)
                for k in keys}


class TimedDriver(Driver):
    """The driver, noting when each learner step's result reaches it."""

    def __init__(self, *args, step_times: list[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_times = step_times

    def finish_learn(self, batch, calls):
        metrics = super().finish_learn(batch, calls)
        self.step_times.append(time.perf_counter())
        return metrics


def end_to_end(cluster, cfg, eval_prompts, mode: str, steps: int, sink: PhaseSink) -> float:
    """Trained pairs per second over ``steps`` learner steps in ``mode``."""
    version = ray.get(cluster.learners[0].version.remote())
    run_cfg = dataclasses.replace(cfg, mode=mode, total_steps=version + steps)
    driver = TimedDriver(run_cfg, cluster, eval_prompts, step_times=sink.times)
    driver.version = version
    # stage_rates trained the learner without syncing: bring workers and buffer to its version
    driver.sync_weights()
    ray.get(cluster.buffer.set_learner_version.remote(version))
    start = time.perf_counter()
    driver.train(sink)
    sink.end_measurement(cfg.learner.micro_batch_pairs * cfg.learner.grad_accum)
    return driver.pairs_trained / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="rollouts per generation call")
    parser.add_argument("--pending-steps", type=int, default=1,
                        help="buffer.max_pending in learner steps of pairs: how far generation may run ahead")
    parser.add_argument("--max-staleness", type=int, default=1, help="buffer.max_staleness")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="checkpoint.every_steps (0: none; rounds before 2026-11-30 used the default "
                             "10, a checkpoint in each measurement, both modes)")
    parser.add_argument("--object-store-mb", type=int, default=0,
                        help="Ray's object store size (0: Ray's default), as resources.object_store_mb sets "
                             "it: the learner's export puts each version into it (docs/benchmarks.md, export)")
    parser.add_argument("--rows", type=Path, default=None,
                        help="also write every step's driver and learner phases here (JSONL), to see "
                             "which steps the means come from")
    add_device_argument(parser)  # cuda: the learner rank and the rollout worker on GPU fractions
    args = parser.parse_args()
    check_device(args.device)
    gpu = 0.45 if args.device == "cuda" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp) / "policy", args.size, seed=0)
        cfg = config_from_dict({
            "name": "bench", "output_dir": tmp, "model": {"path": str(path)},
            "task": {"names": ["addition"], "num_train": 2000, "num_eval": 8},
            "rollout": {"engine": "hf", "batch_size": args.batch, "max_new_tokens": 8},
            "objective": {"form": "logistic", "noop_policy": "keep"},
            "learner": {"backend": "deepspeed", "zero_stage": 0, "micro_batch_pairs": args.batch},
            "buffer": {"min_fresh_pairs": args.batch, "max_staleness": args.max_staleness, "sampling": "fifo",
                       "max_pending": args.pending_steps * args.batch},
            "sync": {"every_steps": 1},
            "checkpoint": {"every_steps": args.checkpoint_every},
            "eval": {"every_steps": 0, "num_prompts": 8},
            "metrics": {"wandb_mode": "disabled"},
            "resources": {"cpus_per_rollout_worker": 1, "cpus_per_teacher_worker": 0.5,
                          "cpus_per_learner_rank": 1, "gpus_per_rollout_worker": gpu,
                          "gpus_per_learner_rank": gpu},
        })
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        train, held_out = train_and_held_out(cfg)
        # actors' logs would mix into stdout, which carries only the JSON line
        ray.init(num_cpus=4, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_mb * 2**20 if args.object_store_mb else None)
        init_ray(cfg)  # already initialised: a no-op, kept so the script uses the driver's path
        cluster = start_cluster(cfg, train)
        try:
            train_alone(cluster, stage_rates(cluster, 2)["chunks"])  # warm-up: first calls pay lazy initialisation
            rates = stage_rates(cluster, 6)
            chunks = rates.pop("chunks")
            sync_rates, async_rates, alone = [], [], []
            phases = {"sync": PhaseSink(), "async": PhaseSink()}
            beside, async_cpu = [], []
            for _ in range(args.repeats):
                alone.append(train_alone(cluster, chunks, min_steps=args.steps))
                beside.append(train_beside_generation(cluster, chunks))
                sync_rates.append(end_to_end(cluster, cfg, held_out, "sync", args.steps, phases["sync"]))
                before = _cpu.snapshot()
                async_rates.append(end_to_end(cluster, cfg, held_out, "async", args.steps, phases["async"]))
                async_cpu.append(_cpu.spent(before, _cpu.snapshot()))
        finally:
            cluster.shutdown()
            ray.shutdown()
    # Per trained pair: generating it costs 1/gen per rollout / pairs_per_rollout, etc.
    t_gen = 1 / (rates["gen"] * rates["pairs_per_rollout"])
    t_teach = 1 / rates["teach"]
    t_train = 1 / statistics.median(rate for rate, _ in alone)
    bound = (t_gen + t_teach + t_train) / max(t_gen, t_teach, t_train)
    # per repeat: its async rate over the slowest stage, the learner timed just before it
    slowest = [min(1 / t_gen, 1 / t_teach, rate) for rate, _ in alone]
    whole_efficiency = [a / s for a, s in zip(async_rates, slowest)]
    steady_efficiency = [a / s for a, s in zip(phases["async"].steady, slowest)]
    learner_ratio = [learner_phases(phases["async"].measurement_learner_rows(i))["seconds"] / phases_alone["seconds"]
                     for i, (_, phases_alone) in enumerate(alone)]
    e2e_async, e2e_sync = statistics.median(async_rates), statistics.median(sync_rates)
    speedup = e2e_async / e2e_sync
    steady_async, steady_sync = (statistics.median(phases[m].steady) for m in ("async", "sync"))
    # CPU of each role per async step, and the cores that work would keep busy at a target
    # efficiency (the step then lasts learner-alone step / efficiency): above the machine's
    # cores, that target cannot be met without less work per step
    cpu_ms = {role: statistics.median(c[role] for c in async_cpu) * 1000 / args.steps for role in async_cpu[0]}
    alone_step_s = statistics.median(args.batch / rate for rate, _ in alone)
    cores_needed = {str(eff): round(cpu_ms["total"] / 1000 * eff / alone_step_s, 2) for eff in (0.85, 0.9)}
    if args.rows is not None:
        with args.rows.open("w") as f:
            for mode, sink in phases.items():
                for step, driver_row, learner_row in zip(sink.steps, sink.rows, sink.learner_rows):
                    f.write(json.dumps({"mode": mode, "step": step, **driver_row, **learner_row}) + "\n")
    print(json.dumps({
        "bench": "pipeline", "size": args.size, "steps": args.steps, "repeats": args.repeats,
        "pending_steps": args.pending_steps, "checkpoint_every": args.checkpoint_every, "object_store_mb": args.object_store_mb, "max_staleness": args.max_staleness,
        "cores": os.cpu_count(),
        "stage_pairs_per_s": {"gen": round(1 / t_gen, 1), "teach": round(1 / t_teach, 1), "train": round(1 / t_train, 1)},
        "async_pairs_per_s": round(e2e_async, 2), "sync_pairs_per_s": round(e2e_sync, 2),
        "efficiency": round(statistics.median(whole_efficiency), 3), "efficiency_target": 0.9,
        "async_speedup": round(speedup, 3), "bound": round(bound, 3),
        "speedup_vs_bound": round(speedup / bound, 3), "speedup_vs_bound_target": 0.9,
        "steady_state": {
            "async_pairs_per_s": round(steady_async, 2), "sync_pairs_per_s": round(steady_sync, 2),
            "efficiency": round(statistics.median(steady_efficiency), 3),
            "efficiency_per_repeat": [round(e, 3) for e in steady_efficiency],
            "async_pairs_per_s_per_repeat": [round(a, 1) for a in phases["async"].steady],
            "learner_alone_pairs_per_s_per_repeat": [round(rate, 1) for rate, _ in alone],
            "async_speedup": round(steady_async / steady_sync, 3),
            "speedup_vs_bound": round(steady_async / steady_sync / bound, 3),
        },
        "driver_step_phase_s_mean": {mode: sink.means() for mode, sink in phases.items()},
        "mean_batch_staleness": {mode: round(statistics.fmean(r.get("buffer/batch_staleness_mean", 0.0)
                                                             for r in sink.rows), 3) for mode, sink in phases.items()},
        "learner_step_phase_s_mean": {"alone": {k: round(statistics.fmean(p[k] for _, p in alone), 4) for k in alone[0][1]},
                                      **{mode: learner_phases(sink.learner_rows) for mode, sink in phases.items()}},
        "learner_step_in_pipeline_vs_alone": round(statistics.median(learner_ratio), 3),
        "learner_step_in_pipeline_vs_alone_per_repeat": [round(r, 3) for r in learner_ratio],
        "learner_step_beside_generation_vs_alone": round(statistics.median(
            b["seconds"] / a["seconds"] for b, (_, a) in zip(beside, alone)), 3),
        "learner_step_target": 1.15,
        "async_cpu_ms_per_step": {role: round(ms, 1) for role, ms in cpu_ms.items()},
        "cores_busy_at_efficiency": cores_needed,
        "device": args.device,
    }), flush=True)


if __name__ == "__main__":
    main()
