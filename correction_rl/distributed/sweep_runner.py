"""The Ray half of ``correction-rl sweep``: one Ray task per trial, each with the trial's resources.

Why plain Ray tasks and not Ray Tune (docs/sweeps.md has the whole comparison): a trial here is
a whole ``correction-rl train`` process that keeps its own checkpoints, metrics and W&B run, and
in async/sync mode places its own actors on the same cluster. Tune's value is in what it would
drive *inside* a trainable (reporting, schedulers, search, Tune-managed checkpoints), none of
which a subprocess trial uses; its resume state would be a second record of the sweep next to
``results.jsonl``, and its placement group would have to contain the async run's actors, which
place themselves. Plain tasks give the scheduling (resources, queueing, any node of a remote
cluster) and leave resume to the one file that is the sweep's result.

Every wait is bounded: a task is given ``start_timeout_s + timeout_s`` (plus the stop grace)
from its submission; past that it is cancelled and recorded as ``timeout``. A task that dies
(its worker or node lost) is recorded as ``failed`` with Ray's error. SIGINT/SIGTERM cancel the
running trials (their runs die with their workers) and return; those trials get no row, so the
next ``--resume`` reruns them from a clean directory.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import ray

from correction_rl.distributed.cluster import PlacementError
from correction_rl.errors import one_line
from correction_rl.sweep.execute import STOP_GRACE_S, TrialJob, execute_trial, lost_trial
from correction_rl.sweep.results import TrialResult, append_row

POLL_S = 1.0
GET_TIMEOUT_S = 60.0
"""A finished task's result is fetched within this (it is a few KB)."""


@dataclass
class SweepOutcome:
    results: list[TrialResult] = field(default_factory=list)
    interrupted: str | None = None
    """The signal that stopped the sweep, or None."""
    unfinished: list[str] = field(default_factory=list)
    """Trials cancelled by the interruption (no row: rerun by the next --resume)."""


def _run_trial(job: TrialJob) -> TrialResult:
    return execute_trial(job)


def join_cluster(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` / ``RAY_ADDRESS``, or start a local Ray (``num_cpus`` logical CPUs,
    default the machine's); returns the GCS address the trials' own Ray runs join."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {} if address else {"include_dashboard": False, "num_cpus": num_cpus}
        ray.init(address=address or None, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **kwargs)
    return ray.get_runtime_context().gcs_address


def capacity(num_cpus: float, num_gpus: float) -> int | None:
    """How many trials of this size fit at once; refuses one that fits on no node."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [min(math.floor(r.get("CPU", 0) / num_cpus) if num_cpus else 1 << 30,
                math.floor(r.get("GPU", 0) / num_gpus) if num_gpus else 1 << 30) for r in nodes]
    if not any(fits):
        best = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise PlacementError(f"a trial asks for num_cpus={num_cpus:g}, num_gpus={num_gpus:g} (spec resources), "
                             f"but no node of the cluster has that much (largest: CPU {best.get('CPU', 0):g}, "
                             f"GPU {best.get('GPU', 0):g})")
    total = sum(fits)
    return None if total >= 1 << 30 else total


class _Signals:
    """SIGINT/SIGTERM set ``received``; the loop cancels the running trials and returns."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_trials(jobs: list[TrialJob], results_path, *, max_concurrent: int | None, start_timeout_s: float,
               ray_address: str | None = None, num_cpus: int | None = None,
               on_result: Callable[[TrialResult], None] = lambda r: None,
               on_start: Callable[[TrialJob], None] = lambda j: None) -> SweepOutcome:
    """Run ``jobs`` on the cluster, appending each finished trial's row to ``results_path``."""
    outcome = SweepOutcome()
    if not jobs:
        return outcome
    address = join_cluster(ray_address, num_cpus)
    res = jobs[0].trial.resources
    fit = capacity(res.num_cpus, res.num_gpus)
    limit = min(x for x in (max_concurrent, fit, len(jobs)) if x is not None)
    remote = ray.remote(_run_trial)
    pending = deque(jobs)
    running: dict[ray.ObjectRef, tuple[TrialJob, float]] = {}

    def record(result: TrialResult) -> None:
        append_row(results_path, result)
        outcome.results.append(result)
        on_result(result)

    with _Signals() as signals:
        while (pending or running) and not signals.received:
            while pending and len(running) < limit:
                job = pending.popleft()
                job = TrialJob(job.trial, job.config_yaml, job.run_dir, job.log_path, job.cwd,
                               {**job.env, "RAY_ADDRESS": address})
                ref = remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0,
                                     name=f"trial:{job.trial.trial_id}").remote(job)
                running[ref] = (job, time.time())
                on_start(job)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                job, started = running.pop(ref)
                try:
                    result = ray.get(ref, timeout=GET_TIMEOUT_S)
                except (ray.exceptions.RayError, TimeoutError) as exc:
                    if signals.received:  # Ctrl-C reached the workers too: interrupted, not failed
                        outcome.unfinished.append(job.trial.trial_id)
                        continue
                    result = lost_trial(job.trial, "failed", f"the trial's Ray task failed: {one_line(exc)}",
                                        time.time() - started, job.run_dir)
                record(result)
            now = time.time()
            for ref, (job, started) in list(running.items()):
                allowed = start_timeout_s + job.trial.timeout_s + STOP_GRACE_S + GET_TIMEOUT_S
                if now - started > allowed:
                    ray.cancel(ref, force=True)
                    del running[ref]
                    record(lost_trial(job.trial, "timeout",
                                      f"no result {allowed:g} s after submission (start_timeout_s + timeout_s "
                                      "+ grace): waiting for resources, or its worker hung; cancelled",
                                      now - started, job.run_dir))
        if signals.received:
            outcome.interrupted = signals.received
            outcome.unfinished += [job.trial.trial_id for job, _ in running.values()]
            for ref in running:
                ray.cancel(ref, force=True)  # the worker dies, and its train with it (PDEATHSIG)
    return outcome
